"""``facenet-hf evaluate``: score a model, or precomputed embeddings, on LFW's verification protocol.

Read-only: the model's config is never changed (``facenet-hf calibrate`` fits and stores thresholds)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facenet_hf.cli.common import progress_enabled, setup_logging
from facenet_hf.constants import DISTANCES, FLIP_MODES

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facenet-hf evaluate",
        description="Score a model (or precomputed embeddings) on LFW's verification protocol. Read-only: "
        "the model is not changed (store a threshold and calibrated score with `facenet-hf calibrate`).",
        epilog="example:\n  facenet-hf evaluate runs/r18/model --lfw-dir lfw/lfw-deepfunneled --pairs lfw/pairs.txt "
        "--folds 10",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "model", nargs="?", help="model folder or Hub repo id (cached); omit with --embeddings"
    )
    parser.add_argument(
        "--embeddings", help="npz/parquet file of precomputed embeddings (path + vector per image)"
    )
    parser.add_argument("--lfw-dir", help="folder of Name/Name_NNNN.jpg images (needed with a model)")
    parser.add_argument("--pairs", required=True, help="LFW pairs.txt")
    parser.add_argument("--folds", type=int, nargs="*", help="score only these folds (default: all)")
    parser.add_argument("--flip", choices=FLIP_MODES, default="sum", help="flip test-time augmentation")
    parser.add_argument("--distance", choices=DISTANCES, default=None)
    parser.add_argument("--far", type=float, default=1e-3, help="FAR target for TAR@FAR")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding worker processes")
    parser.add_argument("--revision", default=None, help="Hub revision of MODEL")
    parser.add_argument("--out", default=None, help="output folder for the report and plots")
    parser.add_argument(
        "--skip-alignment-check",
        action="store_true",
        help="score images that are not what the model expects (e.g. unaligned photos for a five-point model)",
    )
    # scoring is read-only: `facenet-hf calibrate` stores thresholds; the old opt-out is accepted and ignored
    parser.add_argument("--no-write-threshold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if bool(args.model) == bool(args.embeddings):
        parser.error("give either MODEL or --embeddings FILE")
    if args.model and not args.lfw_dir:
        parser.error("--lfw-dir is needed to embed images with MODEL")

    from facenet_hf.data.lfw import read_pairs
    from facenet_hf.evaluation.lfw_eval import evaluate_lfw, write_report

    setup_logging()
    pairs = read_pairs(args.pairs)
    if args.folds:
        pairs = pairs.select_folds(args.folds)
    if args.embeddings:
        report, distances = _evaluate_embeddings(args, pairs)
        out = Path(args.out or Path(args.embeddings).with_suffix("").as_posix() + "_lfw")
    else:
        from facenet_hf.export.runtime import is_export
        from facenet_hf.model import FaceNet, InvalidConfigError

        try:
            if is_export(args.model):  # `facenet-hf export` output (DIR/model.int8.onnx: int8): read-only
                from facenet_hf.export.module import OnnxFaceNet

                model = OnnxFaceNet(args.model)
            else:
                model = FaceNet.from_pretrained(args.model, revision=args.revision)
        except (FileNotFoundError, InvalidConfigError, KeyError, ImportError, ValueError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"facenet-hf evaluate: cannot load model {args.model}: {msg}", file=sys.stderr)
            return 1
        distance = args.distance or model.distance
        try:
            report, distances = evaluate_lfw(
                model,
                args.lfw_dir,
                pairs,
                flip=args.flip,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                squared=distance == "squared_euclidean",
                far_target=args.far,
                check_alignment=not args.skip_alignment_check,
                progress=progress_enabled(),
            )
        except ValueError as e:
            print(f"facenet-hf evaluate: {e}", file=sys.stderr)
            return 1
        local = Path(args.model).is_dir()
        out = Path(args.out or (Path(args.model) / "eval" if local else "eval"))
    paths = write_report(report, distances, pairs.is_same, out)
    print(
        f"{report['protocol']}: accuracy {100 * report['accuracy_mean']:.2f} +- {100 * report['accuracy_std']:.2f}%"
        f" (stderr {100 * report['accuracy_stderr']:.2f}), AUC {report['auc']:.4f}, "
        f"TAR@FAR={report['far_target']:g} {100 * report['tar_at_far']:.2f}%, EER {100 * report['eer']:.2f}%, "
        f"threshold {report['threshold']:.4f}"
    )
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _evaluate_embeddings(args: argparse.Namespace, pairs):
    from facenet_hf.evaluation.embeddings_io import load_embeddings, pair_distances
    from facenet_hf.evaluation.verification import verification_protocol

    paths, emb = load_embeddings(args.embeddings)
    squared = (args.distance or "squared_euclidean") == "squared_euclidean"
    p1, p2 = pairs.paths()
    distances = pair_distances(paths, emb, p1, p2, squared=squared)
    report = verification_protocol(distances, pairs.is_same, pairs.fold, far_target=args.far)
    report["distance"] = "squared_euclidean" if squared else "euclidean"
    return report, distances

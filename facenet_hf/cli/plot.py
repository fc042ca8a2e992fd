"""``facenet-hf plot map|errors``: a 2-D map of embeddings by identity, and the pictures of a model's worst errors."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from facenet_hf.cli.common import load_model_or_error, message_naming, progress_enabled, setup_logging
from facenet_hf.constants import DISTANCES, FLIP_MODES

__all__ = ["main"]

EPILOG = """examples:
  facenet-hf plot map people.parquet --out map.png                         # t-SNE, coloured by identity
  facenet-hf plot map photos.parquet --out map.png --method pca --assignments clusters/assignments.csv
  facenet-hf plot errors --model runs/r18/model --lfw-dir lfw/lfw-deepfunneled --pairs lfw/pairs.txt --out errors.png
  facenet-hf plot errors --embeddings lfw.parquet --lfw-dir lfw/lfw-deepfunneled --pairs lfw/pairs.txt --folds 10 \\
      --out errors.png --json

`map` draws every row of an embeddings table (at most --max-points, drawn at random) in 2-D, the --top most
frequent identities (or, with --assignments, clusters of `facenet-hf cluster`) in colour. `errors` scores the LFW
pairs (embedding their images with --model, or looking them up in --embeddings) and shows the different-person
pairs the model finds closest and the same-person pairs it finds farthest, at the model's stored threshold
(without one: the protocol's best-accuracy threshold on these pairs; --threshold overrides)."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facenet-hf plot",
        description="Pictures of an embedder at work: an embedding map, the worst verification errors.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="plot", required=True, metavar="{map,errors}")
    m = sub.add_parser(
        "map",
        help="2-D map (t-SNE or PCA) of an embeddings table, coloured by identity",
        epilog="example:\n  facenet-hf plot map people.parquet --out map.png --method tsne --top 12",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("embeddings", help="embeddings file (.parquet with an identity column, or .npz)")
    m.add_argument("--out", required=True, help="output .png")
    m.add_argument("--method", choices=("tsne", "pca"), default="tsne")
    m.add_argument("--top", type=int, default=10, help="identities (or clusters) in colour, by frequency")
    m.add_argument("--max-points", type=int, default=5000, help="draw at most this many rows (at random)")
    m.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--assignments", default=None, help="colour by the clusters of this assignments.csv")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    e = sub.add_parser(
        "errors",
        help="grid of the worst false accepts and false rejects on LFW pairs",
        epilog="example:\n  facenet-hf plot errors --model runs/r18/model --lfw-dir lfw/lfw-deepfunneled "
        "--pairs lfw/pairs.txt --out errors.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = e.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model folder or Hub repo id: embeds the pair images")
    src.add_argument("--embeddings", help="precomputed embeddings file covering the pair images")
    e.add_argument("--lfw-dir", required=True, help="folder of Name/Name_NNNN.jpg (the images shown)")
    e.add_argument("--pairs", required=True, help="LFW pairs.txt")
    e.add_argument("--folds", type=int, nargs="*", help="only these folds (default: all)")
    e.add_argument("--out", required=True, help="output .png")
    e.add_argument("--n", type=int, default=8, help="pairs of each kind (default 8)")
    e.add_argument("--threshold", type=float, default=None, help="decide at this distance")
    e.add_argument("--distance", choices=DISTANCES, default=None, help="with --embeddings (default squared)")
    e.add_argument("--flip", choices=FLIP_MODES, default=None, help="flip TTA (default: as calibrated)")
    e.add_argument("--batch-size", type=int, default=128)
    e.add_argument("--num-workers", type=int, default=0, help="image decoding worker processes")
    e.add_argument("--revision", default=None, help="Hub revision of --model")
    e.add_argument(
        "--skip-alignment-check", action="store_true", help="score images that are not what the model expects"
    )
    e.add_argument("--json", action="store_true", help="print one JSON object (the pairs shown)")
    return p


def _fail(message: str) -> int:
    print(f"facenet-hf plot: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    setup_logging()
    return _map(args) if args.plot == "map" else _errors(args)


def _read_assignments(path: str) -> dict[tuple[str, int], int]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "face_index", "cluster"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing column(s) {sorted(missing)}; expected an assignments.csv")
        return {(row["path"], int(row["face_index"])): int(row["cluster"]) for row in reader}


def _map(args: argparse.Namespace) -> int:
    if args.top < 0 or args.max_points < 3:
        return _fail(f"--top must be >= 0 and --max-points >= 3, got {args.top} and {args.max_points}")
    import numpy as np

    from facenet_hf.evaluation.embeddings_io import read_table
    from facenet_hf.evaluation.plots_apps import plot_embedding_map

    try:
        table = read_table(args.embeddings)
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        return _fail(message_naming(args.embeddings, e))
    labels: list[Any] | None = table.identities
    colour = "identity" if labels is not None else None
    if args.assignments:
        try:
            clusters = _read_assignments(args.assignments)
        except (OSError, ValueError) as e:
            return _fail(message_naming(args.assignments, e))
        face = table.face_index if table.face_index is not None else np.full(len(table), -1)
        keys = [(p, int(f)) for p, f in zip(table.paths, face, strict=True)]
        absent = [k for k in keys if k not in clusters]
        if absent:
            return _fail(
                f"{args.assignments} has no cluster for {len(absent)} row(s) of {args.embeddings}, e.g. {absent[0]}"
            )
        labels = ["noise" if clusters[k] < 0 else f"cluster {clusters[k]}" for k in keys]
        colour = "cluster"
    rows = np.arange(len(table))
    if len(table) > args.max_points:
        rows = np.sort(np.random.default_rng(args.seed).choice(len(table), args.max_points, replace=False))
    start = time.perf_counter()
    try:
        out = plot_embedding_map(
            table.embeddings[rows],
            None if labels is None else [labels[i] for i in rows],
            args.out,
            method=args.method,
            top=args.top,
            seed=args.seed,
            perplexity=args.perplexity,
        )
    except ValueError as e:
        return _fail(message_naming(args.embeddings, e))
    result = {
        "out": str(out),
        "method": args.method,
        "points": int(rows.size),
        "rows": len(table),
        "colour_by": colour,
        "groups": None if labels is None else len({str(v) for v in labels}),
        "seconds": round(time.perf_counter() - start, 3),
    }
    if args.json:
        print(json.dumps(result))
    else:
        what = f", coloured by {colour} ({result['groups']})" if colour else ""
        print(f"wrote {out}: {args.method} map of {rows.size} of {len(table)} embeddings{what}")
    return 0


def _errors(args: argparse.Namespace) -> int:
    if args.n < 1:
        return _fail(f"--n must be >= 1, got {args.n}")
    from facenet_hf.data.lfw import read_pairs
    from facenet_hf.evaluation.plots_apps import plot_worst_pairs, worst_pairs

    try:
        pairs = read_pairs(args.pairs)
        if args.folds:
            pairs = pairs.select_folds(args.folds)
    except (FileNotFoundError, ValueError) as e:
        return _fail(message_naming(args.pairs, e))
    p1, p2 = pairs.paths()
    if args.embeddings:
        try:
            report, distances, distance = _from_embeddings(args, pairs, p1, p2)
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            return _fail(message_naming(args.embeddings, e))
        threshold, source = report["threshold"], "best-accuracy threshold on these pairs"
    else:
        from facenet_hf.evaluation.lfw_eval import evaluate_lfw

        model = load_model_or_error("plot", args.model, revision=args.revision)
        if model is None:
            return 1
        distance = model.distance
        try:
            report, distances = evaluate_lfw(
                model,
                args.lfw_dir,
                pairs,
                flip=args.flip or model.threshold_flip,
                batch_size=args.batch_size,
                num_workers=args.num_workers,
                squared=distance == "squared_euclidean",
                progress=progress_enabled(),
                check_alignment=not args.skip_alignment_check,
            )
        except (FileNotFoundError, ValueError) as e:
            return _fail(str(e))
        if model.threshold is not None:
            threshold, source = float(model.threshold), "the model's stored threshold"
        else:
            threshold, source = report["threshold"], "best-accuracy threshold on these pairs (model has none)"
    if args.threshold is not None:
        threshold, source = args.threshold, "--threshold"
    out = plot_worst_pairs(
        list(zip(p1, p2, strict=True)),
        distances,
        pairs.is_same,
        threshold,
        args.out,
        n=args.n,
        image_root=args.lfw_dir,
    )
    fa, fr = worst_pairs(distances, pairs.is_same, threshold, args.n)
    same = pairs.is_same
    n_fa = int(((distances <= threshold) & ~same).sum())
    n_fr = int(((distances > threshold) & same).sum())

    def listed(idx) -> list[dict[str, Any]]:
        return [{"a": p1[i], "b": p2[i], "distance": float(distances[i])} for i in idx]

    result = {
        "out": str(out),
        "pairs": len(pairs),
        "distance": distance,
        "threshold": float(threshold),
        "threshold_source": source,
        "accuracy_at_threshold": float(((distances <= threshold) == same).mean()),
        "false_accepts": n_fa,
        "false_rejects": n_fr,
        "cv_accuracy": report["accuracy_mean"],
        "worst_false_accepts": listed(fa),
        "worst_false_rejects": listed(fr),
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{len(pairs)} pairs at {distance} threshold {threshold:.4g} ({source}): {n_fa} false accepts, "
        f"{n_fr} false rejects (accuracy {100 * result['accuracy_at_threshold']:.2f}%; cross-validated "
        f"{100 * report['accuracy_mean']:.2f}%)"
    )
    print(f"wrote {out}: the worst {fa.size} false accepts and {fr.size} false rejects")
    return 0


def _from_embeddings(args: argparse.Namespace, pairs, p1: list[str], p2: list[str]):
    from facenet_hf.evaluation.embeddings_io import load_embeddings, pair_distances
    from facenet_hf.evaluation.verification import verification_protocol

    paths, emb = load_embeddings(args.embeddings)
    root = Path(args.lfw_dir)
    # a table of the LFW folder made by `facenet-hf embed` holds paths under --lfw-dir: pairs name them relatively
    paths = [Path(p).relative_to(root).as_posix() if Path(p).is_relative_to(root) else p for p in paths]
    distance = args.distance or "squared_euclidean"
    distances = pair_distances(paths, emb, p1, p2, squared=distance == "squared_euclidean")
    report = verification_protocol(distances, pairs.is_same, pairs.fold)
    return report, distances, distance

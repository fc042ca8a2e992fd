"""The ``facenet-hf`` command: train, evaluate, push. Every entry point is ``main(argv=None)``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from facenet_hf.config import Config, ConfigError, all_keys, config_to_dict, load_config

logger = logging.getLogger("facenet_hf")


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for noisy in ("accelerate", "httpx", "urllib3", "PIL", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def overrides_from_argv(rest: list[str]) -> list[str]:
    """``["--train.lr", "1e-3", "--data.p=8", "loss.margin=0.3"]`` -> ``["train.lr=1e-3", "data.p=8", ...]``."""
    out: list[str] = []
    i = 0
    while i < len(rest):
        tok = rest[i]
        key = tok[2:] if tok.startswith("--") else tok
        if "=" in key:
            out.append(key)
            i += 1
        elif tok.startswith("--") and i + 1 < len(rest):
            out.append(f"{key}={rest[i + 1]}")
            i += 2
        else:
            raise ConfigError(f"argument {tok!r} needs a value: use --{key} VALUE or {key}=VALUE")
    return out


def _keys_epilog() -> str:
    defaults = config_to_dict(Config())
    lines = ["config keys (override any with --section.key VALUE or section.key=VALUE):"]
    for key in all_keys():
        value = defaults
        for part in key.split("."):
            value = value[part]
        if isinstance(value, list) and len(json.dumps(value)) > 60:
            value = "[...]"
        lines.append(f"  {key} = {json.dumps(value)}")
    return "\n".join(lines)


def train_parser(
    prog: str | None = None, default_config: str | Path | None = None
) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train a FaceNet embedder with triplet loss (run under `accelerate launch` for several GPUs).",
        epilog=_keys_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--config",
        default=str(default_config) if default_config else None,
        help=f"YAML config file (default: {default_config})",
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def parse_train_config(
    argv: list[str] | None, parser: argparse.ArgumentParser
) -> tuple[Config, argparse.Namespace]:
    args, rest = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides_from_argv(rest))
    except ConfigError as e:
        parser.error(str(e))
    return cfg, args


def run_training(cfg: Config, args: argparse.Namespace) -> int:
    """Train, then print the held-out verification figures; shared by ``facenet-hf train`` and the recipes."""
    import yaml

    from facenet_hf.engine import train

    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    setup_logging()
    try:
        result = train(cfg, progress=not args.quiet)
    except KeyboardInterrupt:
        from accelerate.state import PartialState

        if PartialState().is_main_process:
            print(_interrupted_message(cfg), file=sys.stderr)
        return 130  # 128 + SIGINT, what a shell reports for a Ctrl-C
    from accelerate.state import PartialState

    if PartialState().is_main_process:
        s = result.state
        print(
            f"trained {s.step} steps, {s.images} images in {s.elapsed / 60:.1f} min ({result.images_per_second:.1f} img/s)"
        )
        if result.report is not None:
            r = result.report
            print(
                f"{r['protocol']}: accuracy {100 * r['accuracy_mean']:.2f} +- {100 * r['accuracy_std']:.2f}%, "
                f"AUC {r['auc']:.4f}, TAR@FAR={r['far_target']:g} {100 * r['tar_at_far']:.2f}%, "
                f"threshold {r['threshold']:.4f} ({r['n_pairs']} pairs)"
            )
        if result.model_dir:
            print(f"model written to {result.model_dir}")
    return 0


def _interrupted_message(cfg: Config) -> str:
    from facenet_hf.checkpoint import list_checkpoints

    saved = list_checkpoints(Path(cfg.output_dir) / "checkpoints")
    if saved:
        return f"interrupted: checkpoint {saved[-1]} saved; continue with resume=latest (same output_dir)"
    return f"interrupted before the first checkpoint: nothing to resume in {cfg.output_dir}"


def train_main(argv: list[str] | None = None) -> int:
    parser = train_parser(prog="facenet-hf train")
    cfg, args = parse_train_config(argv, parser)
    return run_training(cfg, args)


def evaluate_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facenet-hf evaluate",
        description="Score a model (or precomputed embeddings) on LFW's verification protocol.",
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
    parser.add_argument(
        "--flip", choices=["off", "sum", "concat"], default="sum", help="flip test-time augmentation"
    )
    parser.add_argument("--distance", choices=["squared_euclidean", "euclidean"], default=None)
    parser.add_argument("--far", type=float, default=1e-3, help="FAR target for TAR@FAR")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding worker processes")
    parser.add_argument("--revision", default=None, help="Hub revision of MODEL")
    parser.add_argument("--out", default=None, help="output folder for the report and plots")
    parser.add_argument(
        "--no-write-threshold",
        action="store_true",
        help="do not store the calibrated threshold in MODEL/config.json",
    )
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
        from facenet_hf.model import FaceNet, InvalidConfigError

        try:
            model = FaceNet.from_pretrained(args.model, revision=args.revision)
        except (FileNotFoundError, InvalidConfigError, KeyError) as e:  # e.g. pickle-only weights: refused
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            print(f"facenet-hf evaluate: cannot load model {args.model}: {msg}", file=sys.stderr)
            return 1
        distance = args.distance or model.distance
        report, distances = evaluate_lfw(
            model,
            args.lfw_dir,
            pairs,
            flip=args.flip,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            squared=distance == "squared_euclidean",
            far_target=args.far,
        )
        local = Path(args.model).is_dir()
        out = Path(args.out or (Path(args.model) / "eval" if local else "eval"))
        if local and not args.no_write_threshold:
            model.threshold = float(report["threshold"])
            model.distance = distance
            model.threshold_flip = args.flip
            model.write_config(args.model)
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


def push_main(argv: list[str] | None = None) -> int:
    """``facenet-hf push MODEL_DIR REPO_ID``: publish a saved model folder to the Hugging Face Hub."""
    parser = argparse.ArgumentParser(
        prog="facenet-hf push",
        description="Upload a model folder (model.safetensors, config.json, README.md, PNG plots; never "
        "checkpoints) to a Hub repo, creating the repo (and the branch) if needed. Prints the commit URL.",
    )
    parser.add_argument("model_dir", help="folder written by FaceNet.save_pretrained (e.g. runs/x/model)")
    parser.add_argument("repo_id", help="Hub repo id, e.g. your-name/facenet-r18-lfw")
    parser.add_argument("--private", action="store_true", help="create the repo as private (a new repo only)")
    parser.add_argument("--revision", default=None, help="branch to push to (created from main if missing)")
    parser.add_argument("--token", default=None, help="write token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    args = parser.parse_args(argv)

    from facenet_hf.hub import PushError, push_model

    try:
        url = push_model(
            args.model_dir,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            token=args.token,
            commit_message=args.commit_message,
        )
    except PushError as e:
        print(f"facenet-hf push: {e}", file=sys.stderr)
        return 1
    print(url)
    return 0


COMMANDS = {"train": train_main, "evaluate": evaluate_main, "push": push_main}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        names = ", ".join(COMMANDS)
        msg = f"usage: facenet-hf {{{names}}} ...\n  run `facenet-hf COMMAND --help` for a command's options"
        if argv and argv[0] not in ("-h", "--help"):
            print(f"facenet-hf: unknown command {argv[0]!r}; choose one of: {names}", file=sys.stderr)
            print(msg, file=sys.stderr)
            return 2
        print(msg)
        return 0
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())

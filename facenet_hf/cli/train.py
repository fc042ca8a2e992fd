"""``facenet-hf train`` and the recipes' shared parser: a config file, ``--section.key VALUE`` overrides."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from facenet_hf.cli.common import overrides_from_argv, setup_logging
from facenet_hf.config import Config, ConfigError, all_keys, config_to_dict, load_config

__all__ = ["main", "parse_train_config", "run_training", "train_parser"]


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


def run_training(cfg: Config, args: argparse.Namespace, **train_kwargs: Any) -> int:
    """Train, then print the held-out verification figures; shared by ``facenet-hf train`` and the recipes.

    ``train_kwargs`` go to :func:`facenet_hf.training.train` (``loss_fn``, ``step_fn``, ``callbacks``)."""
    import yaml

    from facenet_hf.training import train

    if args.print_config:
        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    setup_logging()
    try:
        result = train(cfg, progress=not args.quiet, **train_kwargs)
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
    from facenet_hf.training.checkpoint import list_checkpoints

    saved = list_checkpoints(Path(cfg.output_dir) / "checkpoints")
    if saved:
        return f"interrupted: checkpoint {saved[-1]} saved; continue with resume=latest (same output_dir)"
    return f"interrupted before the first checkpoint: nothing to resume in {cfg.output_dir}"


def main(argv: list[str] | None = None) -> int:
    parser = train_parser(prog="facenet-hf train")
    cfg, args = parse_train_config(argv, parser)
    return run_training(cfg, args)

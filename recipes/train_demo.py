"""`make demo`: train on the bundled LFW sample for a few minutes, score its held-out fold, save the model.

python recipes/train_demo.py [--train.epochs 8 ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from facenet_hf.cli.train import parse_train_config, run_training, train_parser

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "demo" / "lfw_sample.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = train_parser(prog="train_demo.py", default_config=DEFAULT_CONFIG)
    cfg, args = parse_train_config(argv, parser)
    return run_training(cfg, args)


if __name__ == "__main__":
    sys.exit(main())

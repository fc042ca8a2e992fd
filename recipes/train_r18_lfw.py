"""Train ResNet-18 FaceNet on LFW (people outside the held-out fold), then score the held-out fold.

    accelerate launch recipes/train_r18_lfw.py \
        --data.lfw_dir /path/to/lfw-deepfunneled --data.pairs /path/to/pairs.txt

Default config: configs/lfw/r18_lfw_112_cpu30m.yaml (CPU, 30 minutes). For a GPU use
--config configs/lfw/r18_lfw_224_e2_adam_g1.yaml; any key can be overridden (--train.lr 3e-4);
--help lists them all.
"""

from __future__ import annotations

import sys
from pathlib import Path

from facenet_hf.cli.train import parse_train_config, run_training, train_parser

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "lfw" / "r18_lfw_112_cpu30m.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = train_parser(prog="train_r18_lfw.py", default_config=DEFAULT_CONFIG)
    cfg, args = parse_train_config(argv, parser)
    return run_training(cfg, args)


if __name__ == "__main__":
    sys.exit(main())

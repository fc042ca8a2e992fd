"""``facenet-hf verify``: are two photos the same person? The distance, the decision and a calibrated score."""

from __future__ import annotations

import argparse
import json
import sys

from facenet_hf.cli.common import load_model_or_error, setup_logging
from facenet_hf.constants import FLIP_MODES

__all__ = ["main"]

EPILOG = """example:
  facenet-hf verify runs/r18/model alice_1.jpg alice_2.jpg --far 1e-3
  facenet-hf verify runs/r18/model a.jpg b.jpg --json

The decision uses the threshold stored in the model (calibrated by `facenet-hf calibrate` or at the end of
training), or with --far the threshold at which the calibration pairs had at most that false-accept rate.
Photos are detected and aligned when the model was trained on aligned faces (--detect/--no-detect override)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facenet-hf verify",
        description="Compare two face images: distance, same-person decision, calibrated probability.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model folder or Hub repo id (cached)")
    parser.add_argument("image_a")
    parser.add_argument("image_b")
    parser.add_argument(
        "--far", type=float, default=None, help="decide at this false-accept rate (e.g. 1e-3)"
    )
    parser.add_argument("--flip", choices=FLIP_MODES, default=None, help="flip TTA (default: as calibrated)")
    detect = parser.add_mutually_exclusive_group()
    detect.add_argument("--detect", dest="detect", action="store_true", default=None, help="detect and align")
    detect.add_argument(
        "--no-detect", dest="detect", action="store_false", help="images already are face crops"
    )
    parser.add_argument("--revision", default=None, help="Hub revision of MODEL")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    setup_logging()

    from facenet_hf.apps.verify import verify_pair
    from facenet_hf.model import NoFaceError

    model = load_model_or_error("verify", args.model, revision=args.revision)
    if model is None:
        return 1
    try:
        v = verify_pair(model, args.image_a, args.image_b, far=args.far, flip=args.flip, detect=args.detect)
    except (NoFaceError, FileNotFoundError, ValueError) as e:  # BadImageError is a ValueError
        print(f"facenet-hf verify: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"image_a": args.image_a, "image_b": args.image_b, **v.to_dict()}))
        return 0
    prob = "no calibration" if v.probability is None else f"P(same) {v.probability:.3f}"
    word = "SAME person" if v.same else "DIFFERENT people"
    print(
        f"{word}: {v.distance_kind} distance {v.distance:.4f} {'<=' if v.same else '>'} threshold "
        f"{v.threshold:.4f} ({v.threshold_source}); {prob}"
    )
    return 0

"""``facenet-hf enrol GALLERY SOURCE...``: add people to a gallery file (append-only) for ``facenet-hf identify``."""

from __future__ import annotations

import argparse
import json
import os
import sys

from facenet_hf.cli.common import load_model_or_error, progress_enabled, setup_logging
from facenet_hf.constants import FLIP_MODES

__all__ = ["main", "model_id_of"]

EPILOG = """examples:
  facenet-hf enrol staff.parquet people/ --model runs/r18/model     # people/Name/*.jpg: one person per folder
  facenet-hf enrol staff.parquet ada_1.jpg ada_2.jpg --identity "Ada Lovelace"   # the gallery's model
  facenet-hf enrol staff.parquet people_embeddings.parquet          # `facenet-hf embed` of a people folder

GALLERY (.parquet) is created on first use and only ever appended to: new people and new images of enrolled
people are added, rows already there are skipped, and a file enrolled as another person is refused. It records
the model (and flip mode) that made its vectors; identify refuses queries from another model. Images are
detected and aligned when the model was trained on aligned faces (--detect/--no-detect override); the largest
face of each image is enrolled, and images that cannot be used are listed (they stop nothing)."""


def model_id_of(text: str) -> str:
    """How a gallery records the model: a local folder as its absolute path, a Hub repo id as it is."""
    return os.path.abspath(text) if os.path.isdir(text) else text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facenet-hf enrol",
        description="Add people to a gallery file: folders of people, images of one person, or embeddings files.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("gallery", help="gallery file (.parquet), created if missing")
    parser.add_argument(
        "sources",
        nargs="+",
        help="folders of people (Person/img.jpg), images or folders with --identity, embeddings files (.parquet "
        "with an identity column, .npz with --identity)",
    )
    parser.add_argument(
        "--model", default=None, help="model folder or Hub repo id (default: the gallery's, for images)"
    )
    parser.add_argument("--identity", default=None, help="enrol every row of the sources as this person")
    parser.add_argument(
        "--flip",
        choices=FLIP_MODES,
        default=None,
        help="flip TTA (default: the gallery's, else as calibrated)",
    )
    detect = parser.add_mutually_exclusive_group()
    detect.add_argument("--detect", dest="detect", action="store_true", default=None, help="detect and align")
    detect.add_argument(
        "--no-detect", dest="detect", action="store_false", help="the images already are face crops"
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--revision", default=None, help="Hub revision of MODEL")
    parser.add_argument("--json", action="store_true", help="print one JSON summary")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be >= 1")
    setup_logging()

    from facenet_hf.apps.gallery import enrol, is_embeddings_file, read_gallery_info

    def fail(message: object) -> int:
        print(f"facenet-hf enrol: {message}", file=sys.stderr)
        return 1

    model_name = args.model
    needs_model = any(not is_embeddings_file(s) for s in args.sources)
    if model_name is None and needs_model:
        try:
            model_name = read_gallery_info(args.gallery).model_id if os.path.exists(args.gallery) else None
        except (ValueError, OSError) as e:
            return fail(e)
        if model_name is None:
            image = next(s for s in args.sources if not is_embeddings_file(s))
            if not os.path.exists(image):
                return fail(f"{image}: no such file or folder")
            return fail(
                f"{image} holds images (or is not an embeddings file), which need a model to embed them: "
                "pass --model MODEL"
            )
    model = None
    if model_name is not None:
        model = load_model_or_error("enrol", model_name, revision=args.revision)
        if model is None:
            return 1
    try:
        summary = enrol(
            args.gallery,
            args.sources,
            model=model,
            model_id=None if model_name is None else model_id_of(model_name),
            identity=args.identity,
            flip=args.flip,
            detect=args.detect,
            batch_size=args.batch_size,
            progress=progress_enabled(),
        )
    except (ValueError, FileNotFoundError, OSError) as e:  # BadImageError, NoFaceError are ValueErrors
        return fail(e)
    except KeyError as e:  # an embeddings file without its columns
        return fail(e.args[0] if e.args else e)
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    people = []
    if summary.new_people:
        people.append(
            f"{len(summary.new_people)} new {_plural(len(summary.new_people))} ({_names(summary.new_people)})"
        )
    if summary.more_images:
        people.append(f"more images of {len(summary.more_images)} ({_names(summary.more_images)})")
    print(
        f"enrolled {summary.added} row(s) into {summary.gallery}"
        + (f": {', '.join(people)}" if people else "")
        + f"; skipped {summary.skipped} already enrolled; {len(summary.failures)} image(s) failed"
    )
    vectors = "vector" if summary.rows == 1 else "vectors"
    print(f"the gallery holds {summary.rows} {vectors} of {summary.people} {_plural(summary.people)}")
    for path, reason in summary.failures[:5]:
        print(f"  not enrolled: {path}: {reason}")
    if len(summary.failures) > 5:
        print(f"  ... and {len(summary.failures) - 5} more (--json lists them all)")
    for warning in summary.warnings:
        print(f"note: {warning}")
    return 0


def _plural(n: int) -> str:
    return "person" if n == 1 else "people"


def _names(names: list[str], shown: int = 5) -> str:
    return ", ".join(names[:shown]) + (f", ... ({len(names) - shown} more)" if len(names) > shown else "")

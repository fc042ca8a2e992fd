"""``facenet-hf embed``: images, folders or a dataset -> an embeddings table (parquet), resumable."""

from __future__ import annotations

import argparse
import json
import sys

from facenet_hf.cli.common import load_model_or_error, progress_enabled, setup_logging
from facenet_hf.constants import FLIP_MODES

__all__ = ["main"]

EPILOG = """examples:
  facenet-hf embed runs/r18/model ~/Photos --out photos.parquet           # every face of every photo
  facenet-hf embed runs/r18/model people/ --out people.parquet --flip sum  # people/Name/*.jpg: identities
  facenet-hf embed runs/r18/model data.parquet --out emb.parquet --no-detect

The table has one row per image (per face when faces are detected): path, identity (from a Person/img.jpg
layout or a dataset's label column), face_index and box, embedding. Run it again to resume or to add new
files: what the table holds is skipped. Files that cannot be used are listed in OUT's .failures.csv."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facenet-hf embed",
        description="Embed images, folders or a dataset source into a parquet embeddings table.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model folder or Hub repo id (cached)")
    parser.add_argument("sources", nargs="+", help="image files, folders, parquet files or Hub dataset ids")
    parser.add_argument("--out", required=True, help="output .parquet file")
    parser.add_argument("--flip", choices=FLIP_MODES, default="off", help="flip test-time augmentation")
    detect = parser.add_mutually_exclusive_group()
    detect.add_argument("--detect", dest="detect", action="store_true", default=None, help="detect and align")
    detect.add_argument("--no-detect", dest="detect", action="store_false", help="the images are face crops")
    parser.add_argument(
        "--faces",
        choices=("auto", "all", "largest", "central"),
        default="auto",
        help="detected faces kept per image (auto: largest for labelled sources, else all)",
    )
    parser.add_argument("--no-identities", action="store_true", help="do not take identities from the source")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=256, help="images per resumable part file")
    parser.add_argument(
        "--no-resume", action="store_true", help="refuse an existing OUT instead of extending it"
    )
    parser.add_argument("--retry-failed", action="store_true", help="try the files that failed before again")
    parser.add_argument("--revision", default=None, help="Hub revision of MODEL")
    parser.add_argument("--json", action="store_true", help="print one JSON summary")
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.chunk_size < 1:
        parser.error("--batch-size and --chunk-size must be >= 1")
    setup_logging()

    from facenet_hf.apps.embed_folder import embed_sources

    model = load_model_or_error("embed", args.model, revision=args.revision)
    if model is None:
        return 1
    try:
        summary = embed_sources(
            model,
            args.sources,
            args.out,
            flip=args.flip,
            detect=args.detect,
            faces=args.faces,
            identities="none" if args.no_identities else "auto",
            batch_size=args.batch_size,
            chunk_size=args.chunk_size,
            resume=not args.no_resume,
            retry_failed=args.retry_failed,
            progress=progress_enabled(),
        )
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"facenet-hf embed: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(summary.to_dict()))
        return 0
    print(
        f"wrote {summary.out}: {summary.rows} rows; embedded {summary.embedded} image(s) now, skipped "
        f"{summary.skipped} already done, {summary.failed} failed"
        + (f" (listed in {summary.failures_path})" if summary.failures_path else "")
    )
    for path, reason in summary.failures[:5]:
        print(f"  not embedded: {path}: {reason}")
    return 0

"""``facenet-hf pack``: an image source -> parquet shards (image bytes + identity), resumable and shardable."""

from __future__ import annotations

import argparse
import json
import sys

from facenet_hf.cli.common import progress_enabled, setup_logging, shard_arg

__all__ = ["main"]

EPILOG = """examples:
  facenet-hf pack /data/vggface2-112/train /data/vggface2-112-parquet/train
  facenet-hf pack /data/vggface2-112/train /data/vggface2-112-parquet/train --shard 0/4   # one of 4 machines
  facenet-hf pack /data/celeba/img_align_celeba /data/celeba-parquet --labels-file identity_CelebA.txt

Writes DST/train-KKKKK-of-NNNNN.parquet (columns image {bytes, path}, label = identity, path) and pack.json;
train with --data.train_source DST: no file is listed or opened on start. Run it again to resume (finished
shards are skipped); with --shard i/n each process writes every n-th shard. --resize S re-encodes images whose
short side is above S px (pre-resized shards, for when decoding starves the GPUs: docs/scaling.md)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facenet-hf pack",
        description="Pack an image folder (or any source) into parquet shards for fast training starts.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="Identity/image folder, labels-file folder, or parquet/Hub source")
    parser.add_argument("dst", help="output folder of parquet shards")
    parser.add_argument("--rows-per-shard", type=int, default=10_000)
    parser.add_argument(
        "--shard", type=shard_arg, default=(0, 1), metavar="i/n", help="write every n-th shard from i"
    )
    parser.add_argument(
        "--resize", type=int, default=None, help="re-encode images with a short side above this"
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of re-encoded images")
    parser.add_argument(
        "--labels-file", default=None, help="labels file for an image folder (CelebA, CSV, TSV)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary")
    args = parser.parse_args(argv)
    setup_logging()

    from tqdm.auto import tqdm

    from facenet_hf.data.pack import pack_source
    from facenet_hf.data.sources import SourceError

    bar = tqdm(desc="packing", unit="img", disable=not progress_enabled(), leave=False)

    def on_row(done: int) -> None:
        bar.update(done - bar.n)

    try:
        report = pack_source(
            args.src,
            args.dst,
            rows_per_shard=args.rows_per_shard,
            shard=args.shard,
            resize=args.resize,
            quality=args.quality,
            labels_file=args.labels_file,
            on_row=on_row,
        )
    except (FileNotFoundError, SourceError, ValueError) as e:
        print(f"facenet-hf pack: {e}", file=sys.stderr)
        return 1
    finally:
        bar.close()
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0
    i, n = report.worker
    print(
        f"{report.dst}: {report.rows} images of {report.identities} identities in {report.shards} shards; "
        f"worker {i}/{n} wrote {len(report.written)} ({report.bytes_written / 1e6:.1f} MB), skipped "
        f"{len(report.skipped)} already done, {report.failed} file(s) failed"
    )
    return 0

"""``facenet-hf align SRC DST``: an aligned copy of an image folder, with a manifest of every file."""

from __future__ import annotations

import argparse
import json
import sys

from facenet_hf.cli.common import setup_logging, shard_arg

__all__ = ["main"]

EXAMPLE = """example:
  facenet-hf align /data/lfw/lfw-deepfunneled /data/lfw-aligned112 --select central --no-face center_crop
  # 4 machines (or processes), each one share; rerun the same command to resume:
  facenet-hf align /data/vggface2/train /data/vggface2-112 --shard 0/4
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facenet-hf align",
        description="Detect (MTCNN), choose and 5-point-align the face of every image under SRC, writing the same "
        "tree of files under DST and DST/manifest.csv (source, output, status, reason, box, score, landmarks).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="folder of images (Name/file.jpg or any depth)")
    p.add_argument("dst", help="output folder (created); rerunning resumes from its manifest")
    p.add_argument(
        "--size", type=int, default=112, help="crop side in px (default 112: the ArcFace template)"
    )
    p.add_argument("--margin", type=float, default=0.0, help="extra border around the template, in [0, 1)")
    p.add_argument(
        "--template",
        choices=("arcface", "lfw_deepfunneled"),
        default="arcface",
        help="landmark template: ArcFace's, or LFW's deep-funneled framing (with --size 250: LFW-style images)",
    )
    p.add_argument(
        "--select",
        choices=("largest", "central", "all"),
        default="largest",
        help="which face when there are several (LFW: central, the named person)",
    )
    p.add_argument(
        "--no-face",
        choices=("skip", "center_crop"),
        default="skip",
        help="an image without a face: list it only, or also write a centre crop (status fallback_center)",
    )
    p.add_argument(
        "--center-crop-fraction", type=float, default=0.6, help="the fallback crop's share of the short side"
    )
    p.add_argument(
        "--min-score", type=float, default=0.9, help="faces with a lower detector score are ignored"
    )
    p.add_argument("--min-face-size", type=int, default=20, help="smallest face the detector looks for, px")
    p.add_argument(
        "--shard", type=shard_arg, default=(0, 1), metavar="i/n", help="do every n-th file from the i-th"
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=1, help="decoding worker processes")
    p.add_argument("--device", default=None, help="detector device (default: cuda if available, else cpu)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse: MTCNN allocates and frees large pyramids for every batch, and
    with glibc's defaults a long run spent 40% of its CPU time in the kernel re-mapping them (about 10 against
    34.7 images/s on LFW, docs/alignment.md). No-op (False) without glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 1 << 30) and libc.mallopt(-1, 1 << 30))  # M_MMAP_, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    keep_freed_memory()
    from facenet_hf.faces import AlignmentSpec, FaceAligner, build_detector
    from facenet_hf.faces.tree import align_tree

    setup_logging()
    try:
        spec = AlignmentSpec(size=args.size, margin=args.margin, template=args.template)
        aligner = FaceAligner(
            build_detector(
                "mtcnn",
                device=args.device,
                min_score=args.min_score,
                min_face_size=args.min_face_size,
                batch_size=args.batch_size,
            ),
            spec,
            select=args.select,
            no_face=args.no_face,
            center_crop_fraction=args.center_crop_fraction,
        )
        report = align_tree(
            args.src,
            args.dst,
            aligner,
            shard=args.shard,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=not args.quiet and sys.stderr.isatty(),
        )
    except (ValueError, FileNotFoundError, ImportError) as e:
        print(f"facenet-hf align: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(report.statuses.items())) or "nothing new"
    print(
        f"{report.files} files in this shard; {report.already_done} already done; aligned {report.processed} "
        f"in {report.seconds:.1f} s ({report.images_per_second:.1f} img/s): {statuses}"
    )
    print(f"manifest: {report.manifest}")
    return 0

"""Benchmark face detection + alignment on this machine: MTCNN batched vs one image at a time, with and without
the warp, on real LFW files (decoded once beforehand, so decoding is not timed).

* ``detect_batched`` / ``detect_single``: ``MTCNNDetector.detect`` on ``--batch-size`` images per call vs one;
* ``align_batched`` / ``align_single``: ``FaceAligner.align`` (detect, choose the central face, one warp to the
  112 px ArcFace template);
* ``warp``: the warp alone (``warp_face`` with the detected landmarks): the part alignment adds.

Usage: ``python benchmarks/bench_align.py --n 128 --out align.json`` (about a minute on 2 CPU cores); ``--quick``
for a smoke run. The wall time of aligning a whole folder is ``facenet-hf align``'s own summary line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.cli.align import keep_freed_memory
from facenet_hf.faces import AlignmentSpec, FaceAligner, MTCNNDetector, warp_face

FULL = {"n": 128, "batch_size": 32, "repeats": 2}
QUICK = {"n": 4, "batch_size": 2, "repeats": 1}


def _rate(fn, n: int, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return n / best, times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    parser.add_argument("--n", type=int, default=None, help="images (128; quick 4)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per detector call (32)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs of each method (best kept)")
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    C.apply_threads(args)
    keep_freed_memory()  # as `facenet-hf align` does: glibc keeps MTCNN's freed pyramids for reuse
    files = sorted(Path(args.lfw_dir).glob("*/*.jpg"))[
        :: max(1, len(list(Path(args.lfw_dir).glob("*/*.jpg"))) // args.n)
    ]
    images = [Image.open(f).convert("RGB") for f in files[: args.n]]
    n = len(images)
    detector = MTCNNDetector(device="cpu", batch_size=args.batch_size, min_score=0.9)
    aligner = FaceAligner(detector, AlignmentSpec(size=112), select="central")
    single = FaceAligner(
        MTCNNDetector(device="cpu", batch_size=1, min_score=0.9), AlignmentSpec(), select="central"
    )
    detector.detect(images[:2])  # warm-up
    faces = detector.detect(images)
    found = [(img, f[0]) for img, f in zip(images, faces, strict=True) if f]
    rows, results = [], {}
    methods = {
        "detect_batched": lambda: detector.detect(images),
        "detect_single": lambda: [detector.detect([img]) for img in images],
        "align_batched": lambda: aligner.align(images),
        "align_single": lambda: [single.align([img]) for img in images],
        "warp": lambda: [warp_face(img, face.landmarks, aligner.spec) for img, face in found],
    }
    for name, fn in methods.items():
        rate, times = _rate(fn, len(found) if name == "warp" else n, args.repeats)
        results[name] = {"images_per_second": rate, "ms_per_image": 1000 / rate, "times_s": times}
        rows.append([name, f"{rate:.1f}", f"{1000 / rate:.2f}"])
        print(f"  {name:15s} {rate:8.1f} img/s")
    print(
        f"{n} LFW images ({images[0].size[0]}x{images[0].size[1]}), batch {args.batch_size}, {C.environment()['threads']} threads"
    )
    print(C.markdown_table(["method", "img/s", "ms/image"], rows))
    ratio = results["align_batched"]["images_per_second"] / results["align_single"]["images_per_second"]
    print(f"batched / one by one (align) = {ratio:.2f}")
    C.write_json(
        args.out, {"meta": {**C.environment(), "n": n, "batch_size": args.batch_size}, "results": results}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""From a VGGFace2-layout folder to a ready P x K index: listing the files vs reading parquet shards.

A folder of ``--files`` small JPEGs in VGGFace2's layout (``n000001/0001_01.jpg``, ``--identities`` people) is
generated once, packed once with ``facenet-hf pack`` (timed: a one-off cost), and then, each in a fresh Python
process (``--repeats`` times; the OS file cache is warm after the first), the time and peak memory (RSS, from
``getrusage``) from ``import`` to a ready index:

* ``folder``: ``load_source(folder)`` (walks and lists every file) + ``labels_of`` + ``PKBatchSampler``;
* ``parquet``: ``load_source(shards)`` (the first start converts the shards into ``datasets``' Arrow cache;
  later starts memory-map it) + the same index.

The figures are extrapolated linearly to VGGFace2's 3.31 M images (the listing and the index are linear in the
rows: docs/benchmarks.md, ``bench_index.py``: 132 ms for 3.3 M labels). The floor is a bare Python process that
imports the same modules (``imports``), subtracted in the per-row columns.

Usage: ``python benchmarks/bench_listing.py --out listing.json`` (200 k files: a few minutes, ~300 MB of disk
under ``--work``); ``--quick`` for seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

VGGFACE2_IMAGES = 3_310_000

_CHILD = r"""
import json, os, resource, sys, time
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
t0 = time.perf_counter()
from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import labels_of, load_source
t_import = time.perf_counter() - t0
rss_import = rss()
mode, path, cache = sys.argv[1], sys.argv[2], sys.argv[3]
if mode != "imports":
    ds = load_source(path, cache_dir=cache)
    labels = labels_of(ds)
    sampler = PKBatchSampler(labels, 32, 4, seed=0)
    n = len(labels)
else:
    n = 0
print(json.dumps({"seconds": time.perf_counter() - t0, "import_s": t_import, "rows": int(n),
                  "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "index_rss_mib": rss() - rss_import}))
"""


def _jpeg(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    # noise: about the size of a small aligned face JPEG (a few kB), not a few hundred bytes of flat colour
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=80)
    return buf.getvalue()


def make_tree(root: Path, files: int, identities: int) -> float:
    """``files`` JPEGs spread evenly over ``identities`` folders; returns the seconds it took."""
    t0 = time.perf_counter()
    blobs = [_jpeg(s) for s in range(16)]
    for i in range(files):
        person = i % identities
        folder = root / f"n{person + 1:06d}"
        if i < identities:
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i // identities + 1:04d}_01.jpg").write_bytes(blobs[i % 16])
    return time.perf_counter() - t0


def decode_costs(folder: Path, n: int, resize: int, repeats: int = 3) -> dict:
    """Microseconds per image to decode (PIL, full RGB) ``n`` real JPEGs as they are and as ``pack --resize``
    stores them: what pre-resized shards save the DataLoader workers (docs/scaling.md)."""
    from facenet_hf.data.images import load_image
    from facenet_hf.data.pack import shrink_image

    files = sorted(folder.rglob("*.jpg"))[:n]
    raw = [f.read_bytes() for f in files]
    small = [shrink_image(b, resize, 90, str(f)) for b, f in zip(raw, files, strict=True)]

    def per_image(blobs: list[bytes]) -> float:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for b in blobs:
                load_image(b)
            best = min(best, (time.perf_counter() - t0) / len(blobs))
        return best * 1e6

    full, shrunk = per_image(raw), per_image(small)
    return {
        "images": len(files),
        "source_side_px": list(load_image(raw[0]).size),
        "resize": resize,
        "decode_us_source": full,
        "decode_us_resized": shrunk,
        "ratio": shrunk / full,
        "bytes_source": sum(map(len, raw)) / len(raw),
        "bytes_resized": sum(map(len, small)) / len(small),
    }


def run_child(mode: str, path: Path, cache: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, mode, str(path), str(cache)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, lfw=False)
    parser.add_argument("--files", type=int, default=200_000)
    parser.add_argument("--identities", type=int, default=9_131)
    parser.add_argument("--rows-per-shard", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--decode-dir",
        type=Path,
        default=C.default_lfw_root() / "lfw-deepfunneled",
        help="real JPEGs to decode",
    )
    parser.add_argument("--decode-images", type=int, default=500)
    parser.add_argument(
        "--resize", type=int, default=112, help="the pre-resized side to compare the decode with"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.files, args.identities, args.rows_per_shard, args.repeats = 2_000, 200, 500, 1
        args.decode_images = 20

    from facenet_hf.data.pack import pack_source

    work = args.work or Path(tempfile.mkdtemp(prefix="bench_listing_"))
    tree, shards, cache = work / "train", work / "parquet" / "train", work / "hf_cache"
    for p in (tree, shards.parent, cache):
        shutil.rmtree(p, ignore_errors=True)
    try:
        gen_s = make_tree(tree, args.files, args.identities)
        t0 = time.perf_counter()
        report = pack_source(tree, shards, rows_per_shard=args.rows_per_shard)
        pack_s = time.perf_counter() - t0
        results = {"imports": [run_child("imports", tree, cache) for _ in range(args.repeats)]}
        results["folder"] = [run_child("folder", tree, cache) for _ in range(args.repeats)]
        results["parquet"] = [run_child("parquet", shards, cache) for _ in range(args.repeats)]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    decode = decode_costs(args.decode_dir, args.decode_images, args.resize)
    floor = min(r["seconds"] for r in results["imports"])
    scale = VGGFACE2_IMAGES / args.files
    rows = []
    for name in ("imports", "folder", "parquet"):
        for k, r in enumerate(results[name]):
            rows.append(
                {
                    "method": name,
                    "start": "first" if k == 0 else "warm",
                    "seconds": r["seconds"],
                    "max_rss_mib": r["max_rss_mib"],
                    "index_rss_mib": r["index_rss_mib"],
                    "above_imports_s": r["seconds"] - floor,
                    "extrapolated_3_31M_s": (r["seconds"] - floor) * scale if name != "imports" else None,
                    "rows": r["rows"],
                }
            )
    print(
        f"{args.files:,} files, {args.identities:,} identities: generated in {gen_s:.1f} s; packed into "
        f"{report.shards} shards ({report.bytes_written / 1e6:.1f} MB) in {pack_s:.1f} s (one-off)\n"
    )
    print(
        "| method | start | seconds to a ready P x K index | above the imports | x 3.31M/N (extrapolated) "
        "| RSS added by the index, MiB | peak RSS MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        ext = "-" if r["extrapolated_3_31M_s"] is None else f"{r['extrapolated_3_31M_s']:.1f} s"
        print(
            f"| {r['method']} | {r['start']} | {r['seconds']:.2f} | {r['above_imports_s']:.2f} | {ext} | "
            f"{r['index_rss_mib']:.0f} | {r['max_rss_mib']:.0f} |"
        )
    print(
        f"\ndecode of {decode['images']} real JPEGs ({decode['source_side_px'][0]} px, {decode['bytes_source'] / 1e3:.1f} kB): "
        f"{decode['decode_us_source']:.0f} us each; as `pack --resize {args.resize}` stores them "
        f"({decode['bytes_resized'] / 1e3:.1f} kB): {decode['decode_us_resized']:.0f} us ({decode['ratio']:.2f}x)"
    )
    data = {
        "decode": decode,
        "meta": {
            **C.environment(),
            "files": args.files,
            "identities": args.identities,
            "repeats": args.repeats,
        },
        "generate_s": gen_s,
        "pack_s": pack_s,
        "pack": report.to_dict(),
        "results": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(data, indent=2))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the label index and the P x K sampler at VGGFace2 scale, without ever touching an image.

For each size in ``--sizes`` (rows) a real ``datasets.Dataset`` is built in memory with facenet_hf's source schema
(``image``: ``Image(decode=False)`` rows ``{"bytes": None, "path": <fake path>}``, ``label``, ``identity``,
``path``), identities in proportion to VGGFace2 (``--identities`` 9,131 at ``--ref-rows`` 3.3M rows; images per
identity drawn uniformly in VGGFace2's range, 80..843, then scaled to the row count; rows grouped by identity, as
an image folder gives them). Then, timed (median of ``--repeats``):

* ``labels_of(ds)``: the label column as numpy, from Arrow;
* ``PKBatchSampler(labels, p, k)``: construction (the per-identity index);
* one epoch: ``epoch_batches(0)`` (the whole epoch's plan) and iterating the sampler over every batch as a
  DataLoader does (``list[int]`` per batch, plan included).

Memory, in a separate pass (tracing slows Python): ``tracemalloc`` peaks, which count numpy and Python
allocations but not Arrow's buffers (``labels_of`` is a zero-copy view of the Arrow column; the table's own size
is reported as ``arrow MiB``). ``index peak``: during ``labels_of`` + construction; ``retained``: held by the
sampler afterwards; ``epoch peak``: above that while iterating one epoch. Per-row columns show the growth is
linear.

No image is decoded or even opened: the image paths point under a folder that does not exist (checked), and
``PIL.Image.open`` is replaced by a counter during the measurements (checked to stay at 0).

Usage: ``python benchmarks/bench_index.py --out index.json`` (about 1 minute, ~1.5 GB of memory at 3.3M rows);
``--quick`` for seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets.table import InMemoryTable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import SOURCE_FEATURES, labels_of

FULL = {"sizes": "100000,330000,1000000,3300000", "repeats": 3}
QUICK = {"sizes": "2000,6600", "repeats": 2}
FAKE_ROOT = "/nonexistent-facenet-bench/vggface2/train"
MiB = 1024 * 1024


def identity_count(rows: int, args: argparse.Namespace) -> int:
    return max(args.p, round(args.identities * rows / args.ref_rows))


def make_dataset(rows: int, n_ids: int, seed: int) -> datasets.Dataset:
    """A ``load_source``-schema Dataset of ``rows`` fake images of ``n_ids`` identities (grouped, sorted)."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(80, 843, n_ids)
    counts = np.maximum(1, np.floor(weights / weights.sum() * rows)).astype(np.int64)
    counts[np.argsort(-weights)[: max(0, rows - int(counts.sum()))]] += 1  # largest remainders (roughly)
    while counts.sum() > rows:  # the max(1, .) above can overshoot on tiny sizes
        counts[np.argmax(counts)] -= 1
    labels = np.repeat(np.arange(n_ids, dtype=np.int64), counts)
    names = pa.array([f"n{i:06d}" for i in range(n_ids)], pa.string())
    identity = names.take(pa.array(labels))
    within = np.arange(rows, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    number = pa.array(within).cast(pa.string())
    rel = pc.binary_join_element_wise(identity, number, "/")
    rel = pc.binary_join_element_wise(rel, pa.scalar(".jpg"), "")
    full = pc.binary_join_element_wise(pa.scalar(FAKE_ROOT), rel, "/")
    image = pa.StructArray.from_arrays(
        [pa.nulls(rows, pa.binary()), full],
        fields=[pa.field("bytes", pa.binary()), pa.field("path", pa.string())],
    )
    table = pa.table({"image": image, "label": pa.array(labels), "identity": identity, "path": rel})
    table = table.cast(SOURCE_FEATURES.arrow_schema)
    return datasets.Dataset(InMemoryTable(table), info=datasets.DatasetInfo(features=SOURCE_FEATURES.copy()))


@contextlib.contextmanager
def no_image_opened() -> Iterator[list[int]]:
    """Replace ``PIL.Image.open`` by a counter; the caller checks that it stays at 0."""
    from PIL import Image

    calls = [0]
    original = Image.open

    def counting_open(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        return original(*a, **kw)

    Image.open = counting_open
    try:
        yield calls
    finally:
        Image.open = original


def _timeit(fn: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return C.median(times), out


def _iterate(sampler: PKBatchSampler) -> int:
    n = 0
    sampler.set_epoch(0)
    sampler.skip(0)
    for _ in sampler:
        n += 1
    return n


def _time_phases(ds: datasets.Dataset, args: argparse.Namespace) -> dict[str, Any]:
    labels_s, labels = _timeit(lambda: labels_of(ds), args.repeats)
    init_s, sampler = _timeit(lambda: PKBatchSampler(labels, args.p, args.k, seed=args.seed), args.repeats)
    plan_s, _ = _timeit(lambda: sampler.epoch_batches(0), args.repeats)
    epoch_s, n_batches = _timeit(lambda: _iterate(sampler), args.repeats)
    assert n_batches == len(sampler)
    return {
        "usable_identities": sampler.num_usable_identities,
        "batches": n_batches,
        "labels_of_s": labels_s,
        "sampler_init_s": init_s,
        "epoch_plan_s": plan_s,
        "epoch_iter_s": epoch_s,
    }


def _memory_phases(ds: datasets.Dataset, args: argparse.Namespace) -> dict[str, float]:
    """tracemalloc peaks of building the index and of one epoch (see the module docstring)."""
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        sampler = PKBatchSampler(labels_of(ds), args.p, args.k, seed=args.seed)
        retained, index_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        _iterate(sampler)
        epoch_peak = tracemalloc.get_traced_memory()[1] - retained
    finally:
        tracemalloc.stop()
    return {
        "index_peak_mib": index_peak / MiB,
        "retained_mib": retained / MiB,
        "epoch_peak_mib": epoch_peak / MiB,
    }


def measure(rows: int, args: argparse.Namespace) -> dict[str, Any]:
    n_ids = identity_count(rows, args)
    t = time.perf_counter()
    ds = make_dataset(rows, n_ids, args.seed)
    build_s = time.perf_counter() - t
    sample_paths = [ds.data.column("image")[i]["path"].as_py() for i in (0, rows // 2, rows - 1)]
    assert not os.path.exists(FAKE_ROOT), f"{FAKE_ROOT} must not exist"
    assert all(p.startswith(FAKE_ROOT) and not os.path.exists(p) for p in sample_paths)
    with no_image_opened() as opened:
        timing = _time_phases(ds, args)
        memory = _memory_phases(ds, args)
    assert opened[0] == 0, f"{opened[0]} images were opened"
    out = {
        "rows": rows,
        "identities": n_ids,
        "build_dataset_s": build_s,
        **timing,
        **memory,
        "arrow_mib": ds.data.nbytes / MiB,
        "images_opened": opened[0],
    }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, lfw=False)
    parser.add_argument(
        "--sizes", default=None, help="comma-separated row counts (100000,330000,1000000,3300000)"
    )
    parser.add_argument(
        "--identities", type=int, default=9131, help="identities at --ref-rows rows (VGGFace2)"
    )
    parser.add_argument(
        "--ref-rows", type=int, default=3_300_000, help="rows that hold --identities identities"
    )
    parser.add_argument("--p", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per phase, median (3; quick 2)")
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    C.apply_threads(args)
    sizes = C.int_list(args.sizes)
    if not sizes or min(sizes) < args.p * args.k * 2 or args.repeats < 1:
        parser.error(f"--sizes must be >= 2 * p * k = {2 * args.p * args.k}; --repeats >= 1")

    env = C.environment()
    print(
        f"VGGFace2-like: {args.identities} identities per {args.ref_rows:,} rows, P x K = {args.p} x {args.k}, "
        f"median of {args.repeats}; numpy {np.__version__}, pyarrow {pa.__version__}, datasets {datasets.__version__}"
    )
    results = []
    for rows in sizes:
        r = measure(rows, args)
        results.append(r)
        print(
            f"  {rows:>9,} rows: labels_of {r['labels_of_s'] * 1e3:.1f} ms, init {r['sampler_init_s'] * 1e3:.1f} ms, "
            f"epoch {r['epoch_iter_s']:.2f} s, index peak {r['index_peak_mib']:.1f} MiB",
            flush=True,
        )
    print()
    print(
        C.markdown_table(
            [
                "rows",
                "ids",
                "batches",
                "labels_of ms",
                "PKBatchSampler() ms",
                "epoch plan s",
                "epoch iter s",
                "epoch ns/row",
                "index peak MiB",
                "retained MiB",
                "epoch peak MiB",
                "epoch peak B/row",
                "arrow MiB",
            ],
            [
                [
                    f"{r['rows']:,}",
                    r["identities"],
                    r["batches"],
                    1e3 * r["labels_of_s"],
                    1e3 * r["sampler_init_s"],
                    r["epoch_plan_s"],
                    r["epoch_iter_s"],
                    1e9 * r["epoch_iter_s"] / r["rows"],
                    r["index_peak_mib"],
                    r["retained_mib"],
                    r["epoch_peak_mib"],
                    r["epoch_peak_mib"] * MiB / r["rows"],
                    r["arrow_mib"],
                ]
                for r in results
            ],
        )
    )
    if len(results) > 1:
        a, b = results[0], results[-1]
        growth = b["rows"] / a["rows"]
        print(
            f"\n{growth:.0f}x the rows: labels_of x{b['labels_of_s'] / a['labels_of_s']:.1f}, "
            f"init x{b['sampler_init_s'] / a['sampler_init_s']:.1f}, epoch x{b['epoch_iter_s'] / a['epoch_iter_s']:.1f}, "
            f"index peak x{b['index_peak_mib'] / max(a['index_peak_mib'], 1e-9):.1f}, "
            f"epoch peak x{b['epoch_peak_mib'] / max(a['epoch_peak_mib'], 1e-9):.1f}; images opened: 0"
        )
    meta = {
        **env,
        "numpy": np.__version__,
        "pyarrow": pa.__version__,
        "datasets": datasets.__version__,
        "memory_method": "tracemalloc peaks (numpy + Python allocations; Arrow buffers not traced, see arrow_mib)",
        **{
            k: getattr(args, k)
            for k in ("sizes", "identities", "ref_rows", "p", "k", "repeats", "seed", "threads")
        },
        "quick": args.quick,
    }
    C.write_json(args.out, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

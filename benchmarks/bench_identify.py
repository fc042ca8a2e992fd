"""Benchmark gallery search: exact torch search vs faiss (flat and HNSW), queries/s at several batch sizes.

A synthetic gallery of ``--rows`` unit vectors (``--dim``; ``--per-person`` rows per identity, random directions)
is held in a :class:`facenet_hf.apps.gallery.Gallery`; the queries are gallery rows plus noise (``--noise``,
relative to the vector's norm), normalised, so that each has a well-defined nearest person. Timed, as a user calls
it (``Gallery.search(queries, k)``: the nearest rows and the per-identity aggregation into k distinct people):

* ``exact``: torch, one matmul of unit vectors per block of queries, then ``topk``;
* ``faiss``: faiss ``IndexFlatIP`` (exact as well);
* ``faiss-hnsw``: faiss ``IndexHNSWFlat`` with inner product (``--hnsw-m``, ``--ef-construction``,
  ``--ef-search``): approximate.

For each backend and batch size (``--batch-sizes``, default 1 and 256): queries/s over ``--queries`` queries
(batch 1: the first ``--single-queries`` of them, one call each), the median of ``--repeats``. Index builds
are timed apart (``build s``). Quality against exact search on the same queries: top-1 agreement (recall@1 of
the nearest person) and the mean overlap of the top-k sets. Also the gallery file's save and load times.

Usage: ``python benchmarks/bench_identify.py --out identify.json`` (a few minutes on 2 cores, most of it the HNSW
build; about 0.2 GB of memory); ``--quick`` for seconds. Needs faiss-cpu (``pip install 'facenet-hf[search]'``)
for the faiss rows; without it they are skipped, and said so.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.apps.gallery import BACKENDS, Gallery, GalleryInfo
from facenet_hf.evaluation import EmbeddingTable

FULL = {
    "rows": 100_000,
    "dim": 128,
    "queries": 1024,
    "single_queries": 200,
    "batch_sizes": "1,256",
    "repeats": 3,
}
QUICK = {"rows": 5000, "dim": 32, "queries": 256, "single_queries": 20, "batch_sizes": "1,64", "repeats": 1}


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_gallery(rows: int, dim: int, per_person: int, seed: int) -> Gallery:
    """``rows`` random unit vectors, ``per_person`` consecutive rows per identity."""
    rng = np.random.default_rng(seed)
    vecs = unit(rng.standard_normal((rows, dim), dtype=np.float32))
    ids = [f"p{i // per_person:07d}" for i in range(rows)]
    table = EmbeddingTable([f"/synthetic/{i}.jpg" for i in range(rows)], vecs, ids)
    return Gallery(GalleryInfo(dim=dim), table)


def make_queries(gallery: Gallery, n: int, noise: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed + 1)
    src = gallery.vectors[rng.integers(0, len(gallery), n)]
    return unit(src + noise * unit(rng.standard_normal(src.shape, dtype=np.float32)))


def _search_all(gallery: Gallery, q: np.ndarray, batch: int, args: argparse.Namespace, backend: str) -> Any:
    out = []
    for start in range(0, len(q), batch):
        out.append(gallery.search(q[start : start + batch], args.k, backend=backend, **hnsw_options(args)))
    return out


def hnsw_options(args: argparse.Namespace) -> dict[str, int]:
    return {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction, "ef_search": args.ef_search}


def measure(
    gallery: Gallery, q: np.ndarray, backend: str, batch: int, args: argparse.Namespace
) -> dict[str, Any]:
    n = min(len(q), args.single_queries) if batch == 1 else len(q)
    qs = q[:n]
    _search_all(
        gallery, qs[: max(batch, 1)], batch, args, backend
    )  # warm-up (thread pools, first allocation)
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        _search_all(gallery, qs, batch, args, backend)
        times.append(time.perf_counter() - t)
    s = C.median(times)
    return {"backend": backend, "batch_size": batch, "queries": n, "seconds": s, "queries_per_second": n / s}


def agreement(ref: list[list[str]], got: list[list[str]], k: int) -> dict[str, float]:
    top1 = float(np.mean([a[:1] == b[:1] for a, b in zip(ref, got, strict=True)]))
    overlap = float(np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(ref, got, strict=True)]))
    return {"top1_agreement": top1, "topk_overlap": overlap}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, lfw=False)
    parser.add_argument("--rows", type=int, default=None, help="gallery vectors (100000; quick 5000)")
    parser.add_argument("--dim", type=int, default=None, help="embedding size (128; quick 32)")
    parser.add_argument("--per-person", type=int, default=10, help="gallery rows per identity")
    parser.add_argument("--queries", type=int, default=None, help="queries for the batched runs (1024)")
    parser.add_argument("--single-queries", type=int, default=None, help="queries for batch size 1 (200)")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated (1,256)")
    parser.add_argument("--backends", default=",".join(BACKENDS), help=f"comma-separated of {list(BACKENDS)}")
    parser.add_argument("--k", type=int, default=5, help="people per query")
    parser.add_argument("--noise", type=float, default=0.5, help="query noise, relative to the vector norm")
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per row, median (3)")
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    C.apply_threads(args)
    batches = C.int_list(args.batch_sizes)
    backends = C.str_list(args.backends)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not batches or min(batches) < 1 or args.repeats < 1 or args.rows < args.per_person:
        parser.error(
            f"--backends from {list(BACKENDS)}; --batch-sizes, --repeats >= 1; --rows >= --per-person"
        )
    try:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        faiss_version = faiss.__version__
    except ImportError:
        faiss_version = None
        skipped = [b for b in backends if b != "exact"]
        backends = [b for b in backends if b == "exact"]
        if skipped:
            print(f"faiss-cpu is not installed: skipping {skipped} (pip install 'facenet-hf[search]')")

    t = time.perf_counter()
    gallery = make_gallery(args.rows, args.dim, args.per_person, args.seed)
    build_gallery_s = time.perf_counter() - t
    q = make_queries(gallery, args.queries, args.noise, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "gallery.parquet"
        t = time.perf_counter()
        gallery.save(path)
        save_s = time.perf_counter() - t
        t = time.perf_counter()
        Gallery.load(path)
        load_s = time.perf_counter() - t
        file_bytes = path.stat().st_size
    print(
        f"gallery: {args.rows:,} x {args.dim} unit vectors, {args.rows // args.per_person:,} people; k = {args.k}; "
        f"{torch.get_num_threads()} threads; torch {torch.__version__}, faiss {faiss_version or 'absent'}; "
        f"file {file_bytes / 2**20:.1f} MiB, save {save_s:.2f} s, load {load_s:.2f} s",
        flush=True,
    )
    build: dict[str, float] = {"exact": 0.0}
    for backend, kind in (("faiss", "flat"), ("faiss-hnsw", "hnsw")):
        if backend in backends:
            t = time.perf_counter()
            opts = {} if kind == "flat" else {"hnsw_m": args.hnsw_m, "ef_construction": args.ef_construction}
            gallery.faiss_index(kind, **opts)
            build[backend] = time.perf_counter() - t
            print(f"  {backend}: index built in {build[backend]:.2f} s", flush=True)

    reference = gallery.search(q, args.k).identities
    quality = {
        b: agreement(reference, gallery.search(q, args.k, backend=b, **hnsw_options(args)).identities, args.k)
        for b in backends
    }
    results = []
    for backend in backends:
        for batch in batches:
            r = measure(gallery, q, backend, batch, args)
            r["build_s"] = build[backend]
            r.update(quality[backend])
            results.append(r)
            print(
                f"  {backend:<10} batch {batch:>4}: {r['queries_per_second']:,.0f} queries/s "
                f"({r['queries']} queries, {1e3 * r['seconds'] / r['queries']:.3f} ms each)",
                flush=True,
            )
    print()
    print(
        C.markdown_table(
            [
                "backend",
                "batch",
                "queries/s",
                "ms/query",
                "build s",
                "top-1 = exact",
                f"top-{args.k} overlap",
            ],
            [
                [
                    r["backend"],
                    r["batch_size"],
                    r["queries_per_second"],
                    1e3 * r["seconds"] / r["queries"],
                    r["build_s"],
                    r["top1_agreement"],
                    r["topk_overlap"],
                ]
                for r in results
            ],
        )
    )
    ratios = {}
    for batch in batches:
        base = (
            next(r for r in results if r["backend"] == "exact" and r["batch_size"] == batch)
            if "exact" in backends
            else None
        )
        for r in results:
            if base is not None and r["batch_size"] == batch and r["backend"] != "exact":
                ratios[f"{r['backend']}/exact@{batch}"] = r["queries_per_second"] / base["queries_per_second"]
    if ratios:
        print("\n" + ", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()))
    meta = {
        **C.environment(),
        "faiss": faiss_version,
        "gallery_people": args.rows // args.per_person,
        "build_gallery_s": build_gallery_s,
        "file": {"bytes": file_bytes, "save_s": save_s, "load_s": load_s},
        **{
            k: getattr(args, k)
            for k in (
                "rows",
                "dim",
                "per_person",
                "queries",
                "single_queries",
                "batch_sizes",
                "k",
                "noise",
                "hnsw_m",
                "ef_construction",
                "ef_search",
                "repeats",
                "seed",
                "threads",
            )
        },
        "quick": args.quick,
    }
    C.write_json(args.out, {"meta": meta, "results": results, "ratios": ratios})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

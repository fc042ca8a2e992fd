"""Benchmark ``facenet_hf.apps.cluster.cluster_embeddings``: seconds to cluster 10,000 synthetic faces with each
method, and how well each recovers the people (pairwise / BCubed F1, NMI).

The faces: ``--identities`` people (1,000) of very uneven sizes (Pareto-distributed weights scaled to ``--faces``,
at least one face each: many people seen once or twice, a few seen hundreds of times), each a random unit centre
in a ``--rank``-dimensional subspace of R^``--dim`` (128), each face its person's centre plus Gaussian noise
(``--noise``), L2-normalised: what a face embedder's output looks like, with a difficulty set by the noise. The
synthetic embedder's verification accuracy and threshold are measured the way a model's are (the best-accuracy
threshold on balanced same / different pairs of these faces) and the threshold is what the threshold-based
methods cluster at, as ``facenet-hf cluster --model`` would.

Methods: ``agglomerative`` (average linkage, scikit-learn, the full O(n^2) tree), ``agglomerative_single``,
``chinese_whispers`` (label propagation over the pairs within the threshold), ``hdbscan`` (scikit-learn; with the
threshold, isolated faces are noise first) and ``hdbscan_plain`` (no threshold). Each is timed ``--repeats``
times (median); imports are warmed up first.

Usage: ``python benchmarks/bench_cluster.py --out cluster.json`` (10,000 faces: about a minute on 2 cores, ~1 GB of
memory for the agglomerative tree); ``--quick`` for seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.apps.cluster import cluster_embeddings
from facenet_hf.evaluation.clustering import clustering_metrics
from facenet_hf.evaluation.verification import best_threshold

FULL = {"faces": 10_000, "identities": 1_000, "repeats": 1}
QUICK = {"faces": 600, "identities": 60, "repeats": 1}
METHODS = {
    "agglomerative": {"method": "agglomerative", "linkage": "average"},
    "agglomerative_single": {"method": "agglomerative", "linkage": "single"},
    "chinese_whispers": {"method": "chinese_whispers"},
    "hdbscan": {"method": "hdbscan"},
    "hdbscan_plain": {"method": "hdbscan", "threshold": None},
}


def identity_sizes(faces: int, identities: int, rng: np.random.Generator, shape: float = 1.2) -> np.ndarray:
    """Faces per person: Pareto(``shape``) weights scaled to sum to ``faces``, every person at least one face."""
    if identities > faces:
        raise ValueError(f"--identities {identities} is more than --faces {faces}")
    w = rng.pareto(shape, identities) + 1.0
    counts = np.maximum(1, np.floor(w / w.sum() * faces)).astype(np.int64)
    while counts.sum() < faces:  # hand out the rest to the largest weights
        counts[np.argsort(-w)[: faces - counts.sum()]] += 1
    while counts.sum() > faces:
        counts[np.argmax(counts)] -= 1
    return counts


def synthetic_faces(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings float32 N x dim, person of each row)."""
    rng = np.random.default_rng(args.seed)
    counts = identity_sizes(args.faces, args.identities, rng)
    basis = np.linalg.qr(rng.normal(size=(args.dim, args.rank)))[0]
    centres = rng.normal(size=(args.identities, args.rank)) @ basis.T
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ids = np.repeat(np.arange(args.identities), counts)
    x = centres[ids] + args.noise * rng.normal(size=(ids.size, args.dim)) / np.sqrt(args.dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), ids


def verification_threshold(x: np.ndarray, ids: np.ndarray, pairs: int, seed: int) -> tuple[float, float]:
    """(best-accuracy squared-distance threshold, its accuracy) on ``pairs`` same + ``pairs`` different pairs."""
    rng = np.random.default_rng(seed + 1)
    order = np.argsort(ids, kind="stable")
    starts = np.searchsorted(ids[order], np.arange(ids.max() + 1))
    sizes = np.bincount(ids)
    people = rng.choice(np.flatnonzero(sizes >= 2), pairs)
    first = rng.integers(0, sizes[people])
    second = (first + rng.integers(1, sizes[people])) % sizes[people]  # another face of the same person
    sa, sb = order[starts[people] + first], order[starts[people] + second]
    da, db = rng.integers(0, ids.size, (2, 4 * pairs))
    keep = ids[da] != ids[db]
    da, db = da[keep][:pairs], db[keep][:pairs]
    a, b = np.r_[sa, da], np.r_[sb, db]
    d = np.sum((x[a].astype(np.float64) - x[b]) ** 2, axis=1)
    return best_threshold(d, np.r_[np.ones(sa.size, bool), np.zeros(da.size, bool)])


def run_method(name: str, x: np.ndarray, ids: np.ndarray, threshold: float, args) -> dict[str, Any]:
    kw = {"threshold": threshold, "seed": args.seed, **METHODS[name]}
    times, labels = [], None
    for _ in range(args.repeats):
        t = time.perf_counter()
        labels = cluster_embeddings(x, **kw)
        times.append(time.perf_counter() - t)
    m = clustering_metrics(ids, labels)
    return {
        "method": name,
        "settings": {k: v for k, v in kw.items() if k != "seed"},
        "seconds": C.median(times),
        "times_s": times,
        "faces_per_second": x.shape[0] / C.median(times),
        **m.to_dict(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, lfw=False)
    parser.add_argument("--faces", type=int, default=None, help="faces to cluster (10000; quick 600)")
    parser.add_argument("--identities", type=int, default=None, help="people among them (1000; quick 60)")
    parser.add_argument("--dim", type=int, default=128, help="embedding dimension")
    parser.add_argument(
        "--rank", type=int, default=32, help="dimension of the subspace of the people's centres"
    )
    parser.add_argument("--noise", type=float, default=1.0, help="per-face noise (norm, before normalising)")
    parser.add_argument(
        "--pairs", type=int, default=3000, help="same (and different) pairs for the threshold"
    )
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}"
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per method, median (1)")
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    C.apply_threads(args)
    methods = C.str_list(args.methods)
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or args.repeats < 1 or args.faces < 10 or not 1 <= args.rank <= args.dim:
        parser.error(f"unknown methods {unknown}; need --repeats >= 1, --faces >= 10, 1 <= --rank <= --dim")

    import scipy
    import sklearn
    import sklearn.cluster  # imported before anything is timed

    t = time.perf_counter()
    x, ids = synthetic_faces(args)
    make_s = time.perf_counter() - t
    threshold, accuracy = verification_threshold(x, ids, args.pairs, args.seed)
    sizes = np.bincount(ids)
    print(
        f"{args.faces:,} faces of {args.identities:,} people (sizes 1..{sizes.max()}, median {np.median(sizes):g}, "
        f"{int(np.sum(sizes == 1))} seen once), {args.dim}-d; synthetic verification accuracy {100 * accuracy:.2f}% "
        f"at squared distance <= {threshold:.4f}; scikit-learn {sklearn.__version__}, scipy {scipy.__version__}"
    )
    cluster_embeddings(x[:50], threshold=threshold)  # warm-up: lazy imports inside the library
    results = []
    for name in methods:
        r = run_method(name, x, ids, threshold, args)
        results.append(r)
        print(
            f"  {name}: {r['seconds']:.2f} s, {r['n_clusters']} clusters, BCubed F1 {r['bcubed_f1']:.3f}",
            flush=True,
        )
    print()
    print(
        C.markdown_table(
            [
                "method",
                "faces",
                "seconds",
                "clusters",
                "noise",
                "pairwise P",
                "pairwise R",
                "pairwise F1",
                "BCubed F1",
                "NMI",
            ],
            [
                [
                    r["method"],
                    f"{args.faces:,}",
                    r["seconds"],
                    r["n_clusters"],
                    r["n_noise"],
                    f"{r['pairwise_precision']:.3f}",
                    f"{r['pairwise_recall']:.3f}",
                    f"{r['pairwise_f1']:.3f}",
                    f"{r['bcubed_f1']:.3f}",
                    f"{r['nmi']:.3f}",
                ]
                for r in results
            ],
        )
    )
    meta = {
        **C.environment(),
        "sklearn": sklearn.__version__,
        "scipy": scipy.__version__,
        "numpy": np.__version__,
        **{
            k: getattr(args, k)
            for k in ("faces", "identities", "dim", "rank", "noise", "pairs", "repeats", "seed")
        },
        "people_seen_once": int(np.sum(sizes == 1)),
        "largest_person": int(sizes.max()),
        "make_faces_s": make_s,
        "quick": args.quick,
    }
    data = {"threshold": threshold, "verification_accuracy": accuracy, "distance": "squared_euclidean"}
    C.write_json(args.out, {"meta": meta, "synthetic": data, "results": results})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

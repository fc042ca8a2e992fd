"""Leave-one-out retrieval metrics on embeddings: precision@1, R-precision, MAP@R.

Definitions follow Musgrave, Belongie & Lim, "A Metric Learning Reality Check" (ECCV 2020). For a query of class
c, the gallery is every OTHER embedding (the query itself is excluded) and R is the number of other samples of
class c. Neighbours are ranked by distance, ties broken by the smaller row index, then

* precision@1 = 1 if the nearest neighbour has class c, else 0;
* R-precision = (number of class-c samples among the R nearest) / R;
* MAP@R = (1/R) * sum_{i=1..R} P(i), where P(i) = precision of the i nearest if the i-th is of class c, else 0.

Queries whose class has a single sample (R = 0) are excluded; the metrics are means over the remaining queries.
Distances are computed chunk by chunk, so memory is bounded by ``max_chunk_bytes`` (plus the embeddings).
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["retrieval_metrics"]

DEFAULT_CHUNK_BYTES = 64 * 1024**2


def _topk_ordered(dist: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the ``k`` smallest entries of each row, ordered by (distance, column index)."""
    n = dist.shape[1]
    if k >= n:
        return np.argsort(dist, axis=1, kind="stable")[:, :k]
    part = np.argpartition(dist, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(dist, part, axis=1)
    top = np.take_along_axis(part, np.lexsort((part, vals), axis=-1), axis=1)
    # argpartition picks arbitrary members of a tie that straddles position k; redo those rows exactly
    kth = np.take_along_axis(dist, top[:, -1:], axis=1)
    straddling = np.flatnonzero(np.sum(dist <= kth, axis=1) > k)
    if straddling.size:
        top[straddling] = np.argsort(dist[straddling], axis=1, kind="stable")[:, :k]
    return top


def retrieval_metrics(
    embeddings: Any,
    labels: Any,
    *,
    squared: bool = True,
    max_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, float | int]:
    """Leave-one-out precision@1, R-precision and MAP@R of ``embeddings`` (N, D) under Euclidean distance.

    Args:
        embeddings: (N, D) array (computed in float64).
        labels: (N,) class labels (any comparable values).
        squared: rank by squared Euclidean distance (same ranking as plain Euclidean up to rounding).
        max_chunk_bytes: size bound of one (queries x N) distance block.

    Returns ``precision_at_1``, ``r_precision``, ``map_at_r`` (means over queries), ``n_queries``,
    ``n_excluded`` (samples of singleton classes, not used as queries but kept in the gallery),
    ``n_embeddings`` and ``n_classes``.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {x.shape}")
    lab = np.asarray(labels)
    if lab.ndim != 1 or lab.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must be 1-D with one label per embedding ({x.shape[0]}), got shape {lab.shape}"
        )
    if not np.all(np.isfinite(x)):
        raise ValueError("embeddings contain NaN or inf values")
    if max_chunk_bytes <= 0:
        raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
    n = x.shape[0]
    classes, inv = np.unique(lab, return_inverse=True)
    inv = inv.reshape(-1)
    r_all = np.bincount(inv, minlength=classes.size)[inv] - 1
    queries = np.flatnonzero(r_all >= 1)
    if queries.size == 0:
        raise ValueError(
            f"retrieval needs at least one class with 2 or more samples; got {n} samples, all singletons"
        )

    sq_norm = np.einsum("ij,ij->i", x, x)
    chunk = max(1, int(max_chunk_bytes) // (8 * n))
    p1 = r_prec = map_r = 0.0
    for start in range(0, queries.size, chunk):
        q = queries[start : start + chunk]
        dist = sq_norm[q, None] + sq_norm[None, :] - 2.0 * (x[q] @ x.T)
        np.maximum(dist, 0.0, out=dist)
        if not squared:
            np.sqrt(dist, out=dist)
        dist[np.arange(q.size), q] = np.inf  # leave one out
        r = r_all[q]
        top = _topk_ordered(dist, int(r.max()))
        rel = inv[top] == inv[q, None]
        rank = np.arange(1, top.shape[1] + 1)
        rel_r = rel & (rank[None, :] <= r[:, None])
        p1 += float(rel[:, 0].sum())
        r_prec += float(np.sum(rel_r.sum(axis=1) / r))
        map_r += float(np.sum((np.cumsum(rel, axis=1) / rank * rel_r).sum(axis=1) / r))
    return {
        "precision_at_1": p1 / queries.size,
        "r_precision": r_prec / queries.size,
        "map_at_r": map_r / queries.size,
        "n_queries": int(queries.size),
        "n_excluded": int(n - queries.size),
        "n_embeddings": int(n),
        "n_classes": int(classes.size),
    }

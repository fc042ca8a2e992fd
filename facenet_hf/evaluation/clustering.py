"""Clustering metrics from true classes and predicted clusters, in numpy, from the contingency table.

Every metric is computed from the non-empty cells of the contingency table (one sort of the n items, then work
proportional to the number of cells), never from the n^2 pairs of items:

* **pairwise** precision / recall / F1: over unordered pairs of distinct items, a pair is *predicted* together
  when both items are in one cluster and *truly* together when both are of one class. Precision = pairs together
  in both / pairs predicted together; recall = pairs together in both / pairs truly together. With no pair
  predicted together precision is 1.0 (no wrong merge was made); with no pair truly together recall is 1.0.
* **BCubed** precision / recall / F1 (Amigó, Gonzalo, Artiles & Verdejo 2009, "A comparison of extrinsic
  clustering evaluation metrics based on formal constraints"): per item, precision is the share of its cluster
  (itself included) that is of its class and recall the share of its class that is in its cluster; both are
  averaged over items and F1 is their harmonic mean.
* **NMI**: mutual information over the arithmetic mean of the two entropies (scikit-learn's default
  ``average_method="arithmetic"``, with its conventions: 1.0 when both labelings are one group, 0.0 when the
  mutual information is 0).

Predicted noise (``noise_label``, -1 as HDBSCAN writes it) is not a cluster: each noise item counts as a
cluster of its own (a singleton), so that leaving faces unassigned is never rewarded as one big merge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = [
    "ClusteringMetrics",
    "bcubed_scores",
    "clustering_metrics",
    "contingency_cells",
    "normalized_mutual_info",
    "pair_counts",
    "pairwise_scores",
]


def _codes(labels: Any, name: str) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == object:
        arr = arr.astype(str)
    return np.unique(arr, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _noise_mask(labels: np.ndarray, noise_label: Any) -> np.ndarray:
    """True where ``labels`` equals ``noise_label`` (all False for ``None`` or a label of another type)."""
    if noise_label is None or labels.size == 0:
        return np.zeros(labels.size, dtype=bool)
    if labels.dtype == object:
        return np.fromiter((v == noise_label for v in labels.tolist()), dtype=bool, count=labels.size)
    numeric = labels.dtype.kind in "biuf"
    if numeric != isinstance(noise_label, (int, float, np.integer, np.floating)):
        return np.zeros(labels.size, dtype=bool)
    return np.asarray(labels == noise_label, dtype=bool).reshape(-1)


def _noise_to_singletons(labels_pred: Any, noise_label: Any) -> np.ndarray:
    """``labels_pred`` as codes 0..k-1, each item labelled ``noise_label`` given a code of its own."""
    arr = np.asarray(labels_pred)
    if arr.ndim != 1:
        raise ValueError(f"labels_pred must be 1-D, got shape {arr.shape}")
    noise = _noise_mask(arr, noise_label)
    if not noise.any():
        return _codes(arr, "labels_pred")
    out = np.empty(arr.size, dtype=np.int64)
    kept = _codes(arr[~noise], "labels_pred")
    out[~noise] = kept
    start = int(kept.max()) + 1 if kept.size else 0
    out[noise] = np.arange(start, start + int(noise.sum()))
    return out


def contingency_cells(
    labels_true: Any, labels_pred: Any, *, noise_label: Any = -1
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The non-empty cells of the contingency table: ``(class, cluster, count)`` per cell, plus the class sizes
    and the cluster sizes (indexed by the codes in the first two arrays). Noise items are singleton clusters."""
    t = _codes(labels_true, "labels_true")
    p = _noise_to_singletons(labels_pred, noise_label)
    if t.size != p.size:
        raise ValueError(f"labels_true and labels_pred must have one length, got {t.size} and {p.size}")
    if t.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty, empty, empty
    n_pred = int(p.max()) + 1
    cell, counts = np.unique(t * n_pred + p, return_counts=True)
    rows, cols = cell // n_pred, cell % n_pred
    class_sizes = np.bincount(t)
    cluster_sizes = np.bincount(p, minlength=n_pred)
    return rows, cols, counts.astype(np.int64), class_sizes.astype(np.int64), cluster_sizes.astype(np.int64)


def _pairs(counts: np.ndarray) -> int:
    c = counts.astype(np.int64)
    return int(np.sum(c * (c - 1) // 2))


def pair_counts(labels_true: Any, labels_pred: Any, *, noise_label: Any = -1) -> dict[str, int]:
    """Unordered pairs of distinct items: ``tp`` (same class, same cluster), ``fp`` (same cluster only), ``fn``
    (same class only), ``tn`` (neither). They sum to n(n-1)/2; scikit-learn's ``pair_confusion_matrix`` counts
    ordered pairs, i.e. twice each of these."""
    _, _, cells, class_sizes, cluster_sizes = contingency_cells(
        labels_true, labels_pred, noise_label=noise_label
    )
    n = int(class_sizes.sum())
    tp = _pairs(cells)
    pred_together = _pairs(cluster_sizes)
    true_together = _pairs(class_sizes)
    fp, fn = pred_together - tp, true_together - tp
    return {"tp": tp, "fp": fp, "fn": fn, "tn": n * (n - 1) // 2 - tp - fp - fn}


def _f1(p: float, r: float) -> float:
    return 0.0 if p + r == 0 else 2.0 * p * r / (p + r)


def pairwise_scores(
    labels_true: Any, labels_pred: Any, *, noise_label: Any = -1
) -> tuple[float, float, float]:
    """Pairwise ``(precision, recall, F1)`` (see the module docstring for the empty cases)."""
    c = pair_counts(labels_true, labels_pred, noise_label=noise_label)
    precision = 1.0 if c["tp"] + c["fp"] == 0 else c["tp"] / (c["tp"] + c["fp"])
    recall = 1.0 if c["tp"] + c["fn"] == 0 else c["tp"] / (c["tp"] + c["fn"])
    return float(precision), float(recall), _f1(precision, recall)


def bcubed_scores(labels_true: Any, labels_pred: Any, *, noise_label: Any = -1) -> tuple[float, float, float]:
    """BCubed ``(precision, recall, F1)`` (Amigó et al. 2009); each item counts itself. (1, 1, 1) for no items."""
    rows, cols, cells, class_sizes, cluster_sizes = contingency_cells(
        labels_true, labels_pred, noise_label=noise_label
    )
    n = int(class_sizes.sum())
    if n == 0:
        return 1.0, 1.0, 1.0
    sq = cells.astype(np.float64) ** 2
    precision = float(np.sum(sq / cluster_sizes[cols]) / n)
    recall = float(np.sum(sq / class_sizes[rows]) / n)
    return precision, recall, _f1(precision, recall)


def _entropy(sizes: np.ndarray, n: int) -> float:
    p = sizes[sizes > 0].astype(np.float64) / n
    return float(-np.sum(p * np.log(p)))


def normalized_mutual_info(labels_true: Any, labels_pred: Any, *, noise_label: Any = -1) -> float:
    """NMI with the arithmetic mean of the entropies (scikit-learn's default normalisation and edge cases)."""
    rows, cols, cells, class_sizes, cluster_sizes = contingency_cells(
        labels_true, labels_pred, noise_label=noise_label
    )
    n = int(class_sizes.sum())
    if class_sizes.size == cluster_sizes.size and class_sizes.size <= 1:
        return 1.0  # both labelings are one group (or there is nothing): a perfect match
    c = cells.astype(np.float64)
    # (log c - log a) + (log n - log b): exactly 0 for a cell that fills its class and its cluster's share
    log_ratio = (np.log(c) - np.log(class_sizes[rows])) + (np.log(n) - np.log(cluster_sizes[cols]))
    mi = float(np.sum(c / n * log_ratio))
    mi = max(mi, 0.0)
    if mi == 0.0:
        return 0.0
    return float(mi / ((_entropy(class_sizes, n) + _entropy(cluster_sizes, n)) / 2.0))


@dataclass(frozen=True)
class ClusteringMetrics:
    """All metrics of one clustering against known identities (noise items counted as singletons)."""

    n_items: int
    n_classes: int
    n_clusters: int  # predicted clusters, noise excluded
    n_singletons: int  # predicted clusters of one item, noise excluded
    n_noise: int
    pairwise_precision: float
    pairwise_recall: float
    pairwise_f1: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f1: float
    nmi: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def clustering_metrics(labels_true: Any, labels_pred: Any, *, noise_label: Any = -1) -> ClusteringMetrics:
    """Pairwise and BCubed precision / recall / F1, NMI and cluster counts of ``labels_pred`` against
    ``labels_true`` (1-D, one entry per item, any hashable labels). Items labelled ``noise_label`` (None: no
    noise label) are unassigned: each is its own singleton in the metrics and excluded from the counts."""
    true = np.asarray(labels_true)
    pred = np.asarray(labels_pred)
    if true.ndim != 1 or pred.ndim != 1 or true.size != pred.size:
        raise ValueError(
            f"labels_true and labels_pred must be 1-D of one length, got shapes {true.shape} and {pred.shape}"
        )
    noise = _noise_mask(pred, noise_label)
    kept = pred[~noise]
    sizes = np.unique(_codes(kept, "labels_pred"), return_counts=True)[1] if kept.size else np.zeros(0, int)
    pp, pr, pf = pairwise_scores(true, pred, noise_label=noise_label)
    bp, br, bf = bcubed_scores(true, pred, noise_label=noise_label)
    return ClusteringMetrics(
        n_items=int(true.size),
        n_classes=int(np.unique(_codes(true, "labels_true")).size),
        n_clusters=int(sizes.size),
        n_singletons=int(np.sum(sizes == 1)),
        n_noise=int(noise.sum()),
        pairwise_precision=pp,
        pairwise_recall=pr,
        pairwise_f1=pf,
        bcubed_precision=bp,
        bcubed_recall=br,
        bcubed_f1=bf,
        nmi=normalized_mutual_info(true, pred, noise_label=noise_label),
    )

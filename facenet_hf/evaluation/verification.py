"""Face verification protocol (LFW View 2 style) on pair distances, in vectorised numpy.

Conventions used throughout this module:

* Smaller distance = more similar; a pair is predicted "same" iff ``distance <= threshold``.
* Candidate thresholds for a set of pairs are the midpoints between consecutive sorted unique distances plus
  two ends, ``min - delta`` (everything "different") and ``max + delta`` (everything "same"), where ``delta`` is
  half the mean gap between consecutive unique distances (0.5 when all distances are equal).
* The best-accuracy threshold is the midpoint (in distance) of the FIRST, i.e. lowest-distance, maximal run of
  consecutive candidates that reach the highest accuracy. Every threshold in that run scores the same accuracy
  on the pairs it was chosen on; the midpoint keeps the largest margin to the pairs on both sides.
* Every sweep is one sort plus cumulative sums: O(n log n), no loop over thresholds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

__all__ = [
    "best_threshold",
    "equal_error_rate",
    "report_to_json",
    "roc_auc",
    "roc_curve",
    "stratified_subfolds",
    "threshold_at_far",
    "verification_protocol",
]

N_SUBFOLDS = 10


# ----------------------------------------------------------------------------------------------------------------
# input checking


def _as_distances(distances: Any) -> np.ndarray:
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"distances must be 1-D (one distance per pair), got shape {d.shape}")
    bad = np.flatnonzero(~np.isfinite(d))
    if bad.size:
        raise ValueError(
            f"distances must be finite; {bad.size} value(s) are NaN/inf, first at index {bad[:5].tolist()}"
        )
    return d


def _as_labels(is_same: Any, n: int) -> np.ndarray:
    y = np.asarray(is_same)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"is_same must be 1-D with one entry per distance ({n}), got shape {y.shape}")
    if y.dtype != np.bool_:
        values = np.unique(y)
        if not np.all(np.isin(values, (0, 1))):
            raise ValueError(f"is_same must be boolean or 0/1, got values {values[:5].tolist()}")
        y = y.astype(bool)
    return y


def _as_folds(folds: Any, n: int) -> np.ndarray:
    f = np.asarray(folds)
    if f.ndim != 1 or f.shape[0] != n:
        raise ValueError(f"folds must be 1-D with one fold id per distance ({n}), got shape {f.shape}")
    integral = np.issubdtype(f.dtype, np.integer) or (
        np.issubdtype(f.dtype, np.number) and bool(np.all(np.equal(np.mod(f, 1), 0)))
    )
    if f.size and not integral:
        raise ValueError(f"folds must be integer fold ids, got {f.dtype} values like {f[:3].tolist()}")
    return f.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# sweeps


def _sweep(d: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted unique distances ``u`` (m,) and counts ``tp``, ``fp`` (m+1,).

    ``tp[k]``/``fp[k]`` are the numbers of same/different pairs predicted "same" when exactly the first ``k``
    unique distances are accepted (k = 0: none).
    """
    order = np.argsort(d, kind="stable")
    ds = d[order]
    ys = y[order].astype(np.int64)
    ends = np.r_[np.flatnonzero(ds[1:] != ds[:-1]), ds.size - 1] if ds.size else np.zeros(0, dtype=np.int64)
    cum_same = np.cumsum(ys)
    tp = np.r_[0, cum_same[ends]]
    fp = np.r_[0, ends + 1 - cum_same[ends]]
    return ds[ends], tp, fp


def _candidates(u: np.ndarray) -> np.ndarray:
    """Candidate thresholds (m+1,): ``c[k]`` accepts exactly the first ``k`` unique distances."""
    m = u.size
    delta = 0.5 * (u[-1] - u[0]) / (m - 1) if m > 1 else 0.5
    return np.concatenate([[u[0] - delta], 0.5 * (u[1:] + u[:-1]), [u[-1] + delta]])


def best_threshold(distances: Any, is_same: Any) -> tuple[float, float]:
    """Best-accuracy threshold on these pairs and its accuracy on them.

    Ties: the midpoint of the first (lowest-distance) maximal plateau of candidate thresholds (module docstring).
    """
    d = _as_distances(distances)
    y = _as_labels(is_same, d.size)
    if d.size == 0:
        raise ValueError("best_threshold needs at least one pair, got 0")
    u, tp, fp = _sweep(d, y)
    c = _candidates(u)
    n_diff = d.size - int(y.sum())
    correct = tp + (n_diff - fp)
    best = correct.max()
    i0 = int(np.argmax(correct))
    not_best = np.flatnonzero(correct[i0:] != best)
    i1 = i0 + (int(not_best[0]) - 1 if not_best.size else correct.size - 1 - i0)
    return float(0.5 * (c[i0] + c[i1])), float(best / d.size)


def threshold_at_far(distances: Any, is_same: Any, far_target: float) -> float:
    """Largest candidate threshold whose false-accept rate on these pairs is <= ``far_target``.

    With no "different" pairs every threshold qualifies and the top end is returned.
    """
    d = _as_distances(distances)
    y = _as_labels(is_same, d.size)
    if d.size == 0:
        raise ValueError("threshold_at_far needs at least one pair, got 0")
    u, _, fp = _sweep(d, y)
    c = _candidates(u)
    n_diff = d.size - int(y.sum())
    allowed = far_target * n_diff * (1.0 + 1e-12)
    k = int(np.searchsorted(fp, allowed, side="right")) - 1
    return float(c[max(k, 0)])


def roc_curve(distances: Any, is_same: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC over all pairs: ``fpr``, ``tpr`` and the distance ``thresholds`` (accept iff distance <= t).

    One point per unique distance, preceded by ``(0, 0)`` at threshold ``-inf``; this equals scikit-learn's
    ``roc_curve(is_same, -distances, drop_intermediate=False)`` with the thresholds negated.
    """
    d = _as_distances(distances)
    y = _as_labels(is_same, d.size)
    n_same = int(y.sum())
    n_diff = d.size - n_same
    if n_same == 0 or n_diff == 0:
        raise ValueError(f"ROC needs both same and different pairs, got {n_same} same and {n_diff} different")
    u, tp, fp = _sweep(d, y)
    return fp / n_diff, tp / n_same, np.r_[-np.inf, u]


def roc_auc(distances: Any, is_same: Any) -> float:
    """Exact ROC AUC (Mann-Whitney U): P(d_same < d_diff) + 1/2 P(d_same == d_diff)."""
    d = _as_distances(distances)
    y = _as_labels(is_same, d.size)
    n_same = int(y.sum())
    n_diff = d.size - n_same
    if n_same == 0 or n_diff == 0:
        raise ValueError(f"AUC needs both same and different pairs, got {n_same} same and {n_diff} different")
    _, tp, fp = _sweep(d, y)
    pos_g = np.diff(tp).astype(np.float64)
    neg_g = np.diff(fp).astype(np.float64)
    wins = np.sum(pos_g * (n_diff - fp[1:])) + 0.5 * np.sum(pos_g * neg_g)
    return float(wins / (n_same * n_diff))


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """EER: where FPR equals FNR = 1 - TPR, linearly interpolated between consecutive ROC points."""
    fpr = np.asarray(fpr, dtype=np.float64)
    fnr = 1.0 - np.asarray(tpr, dtype=np.float64)
    gap = fnr - fpr  # non-increasing, from >= 0 at (0, 0) to <= 0 at (1, 1)
    i = int(np.argmax(gap <= 0))
    if gap[i] > 0:  # never crosses (cannot happen on a full ROC); report the last point
        return float(fpr[-1])
    if i == 0 or gap[i] == 0:
        return float(fpr[i])
    a = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(fpr[i - 1] + a * (fpr[i] - fpr[i - 1]))


def stratified_subfolds(is_same: Any, n_subfolds: int = N_SUBFOLDS) -> np.ndarray:
    """Deterministic stratified sub-fold ids 1..n: same pairs and different pairs each dealt round-robin in order."""
    y = np.asarray(is_same).astype(bool)
    sub = np.empty(y.size, dtype=np.int64)
    for mask in (y, ~y):
        idx = np.flatnonzero(mask)
        sub[idx] = np.arange(idx.size) % n_subfolds + 1
    return sub


# ----------------------------------------------------------------------------------------------------------------
# protocol


def _nanmean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _rate(accepted: np.ndarray) -> float:
    return float(accepted.mean()) if accepted.size else math.nan


def verification_protocol(
    distances: Any,
    is_same: Any,
    folds: Any,
    *,
    far_target: float = 1e-3,
    eval_folds: Iterable[int] | int | None = None,
) -> dict[str, Any]:
    """Cross-validated verification report (LFW View 2 protocol) from pair distances.

    Args:
        distances: (n,) pair distances, smaller = more similar.
        is_same: (n,) bool / 0-1, True for matched pairs.
        folds: (n,) integer fold ids (LFW: 1..10), or None to treat all pairs as one fold.
        far_target: false-accept rate for ``tar_at_far`` (FaceNet's VAL@FAR), in (0, 1].
        eval_folds: fold id(s) to score; pairs of other folds are ignored entirely. Default: all folds.

    With two or more evaluated folds, each fold's accuracy threshold is the best-accuracy threshold on the pairs
    of the OTHER evaluated folds only. With one evaluated fold (a model trained on LFW's other folds, scored on
    the held-out one) its pairs are split into 10 stratified sub-folds (``stratified_subfolds``) and the same
    cross-validation is run inside it; ``protocol`` says which was done.

    Returns a dict with JSON-safe scalars/lists plus ``roc`` (numpy arrays ``fpr``, ``tpr``, ``thresholds``);
    use ``report_to_json`` for a JSON-safe copy. Keys: ``protocol``, ``n_pairs``, ``n_same``, ``n_diff``,
    ``folds`` (evaluated fold ids), ``cv_folds`` (ids of the cross-validation folds: the folds themselves, or
    sub-folds 1..10), ``accuracy_mean``, ``accuracy_std`` (ddof=0, as the common LFW code), ``accuracy_stderr``
    (ddof=1 / sqrt(n_cv_folds), what LFW asks for), ``fold_accuracy``, ``fold_threshold``, ``threshold`` (one
    deployment threshold: the best-accuracy threshold on all evaluated pairs), ``threshold_accuracy`` (its
    accuracy on those same pairs: in-sample, optimistic), ``threshold_tar``/``threshold_far`` (its operating point
    on all evaluated pairs), ``far_target``, ``tar_at_far`` (mean over folds of the test-fold TAR at the largest
    training-fold threshold with FAR <= far_target), ``far_at_far`` (mean test-fold FAR actually reached),
    ``fold_tar``, ``fold_far``, ``fold_far_threshold``, ``auc`` (exact Mann-Whitney over all evaluated pairs),
    ``eer``, ``roc``.
    """
    d = _as_distances(distances)
    y = _as_labels(is_same, d.size)
    if not 0.0 < far_target <= 1.0:
        raise ValueError(f"far_target must be in (0, 1], got {far_target}")
    f = np.ones(d.size, dtype=np.int64) if folds is None else _as_folds(folds, d.size)
    available = np.unique(f)
    if eval_folds is None:
        chosen = available
    else:
        if isinstance(eval_folds, (int, np.integer)):
            eval_folds = [int(eval_folds)]
        chosen = np.unique(np.asarray(list(eval_folds), dtype=np.int64))
        missing = np.setdiff1d(chosen, available)
        if chosen.size == 0 or missing.size:
            raise ValueError(
                f"eval_folds {np.asarray(list(eval_folds)).tolist()} must be non-empty fold ids present in folds; "
                f"missing {missing.tolist()}, valid fold ids are {available.tolist()}"
            )
    keep = np.isin(f, chosen)
    d, y, f = d[keep], y[keep], f[keep]
    n_same = int(y.sum())
    n_diff = d.size - n_same
    if n_same == 0 or n_diff == 0:
        raise ValueError(
            f"the evaluated pairs (folds {chosen.tolist()}) need both same and different pairs, "
            f"got {n_same} same and {n_diff} different"
        )

    if chosen.size >= 2:
        cv = f
        k = chosen.size
        protocol = (
            f"{k}-fold cross-validation over folds {chosen.tolist()}: "
            f"each fold's threshold chosen on the other {k - 1} folds"
        )
    else:
        n_sub = min(N_SUBFOLDS, max(n_same, n_diff))
        if n_sub < 2:
            raise ValueError(
                f"one evaluated fold needs at least 2 same or 2 different pairs, got {d.size} pairs"
            )
        cv = stratified_subfolds(y, n_sub)
        where = "all pairs as one fold" if folds is None else f"held-out fold {int(chosen[0])}"
        protocol = f"{where}, threshold by {n_sub}-fold cross-validation within the fold"
    cv_ids = np.unique(cv)

    fold_acc, fold_thr, fold_tar, fold_far, fold_far_thr = [], [], [], [], []
    for fid in cv_ids:
        test = cv == fid
        train = ~test
        thr, _ = best_threshold(d[train], y[train])
        dt, yt = d[test], y[test]
        fold_acc.append(float(np.mean((dt <= thr) == yt)))
        fold_thr.append(thr)
        t_far = threshold_at_far(d[train], y[train], far_target)
        fold_far_thr.append(t_far)
        fold_tar.append(_rate(dt[yt] <= t_far))
        fold_far.append(_rate(dt[~yt] <= t_far))

    acc = np.asarray(fold_acc)
    threshold, threshold_accuracy = best_threshold(d, y)
    fpr, tpr, thresholds = roc_curve(d, y)
    return {
        "protocol": protocol,
        "n_pairs": int(d.size),
        "n_same": n_same,
        "n_diff": n_diff,
        "folds": chosen.tolist(),
        "cv_folds": cv_ids.tolist(),
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=0)),
        "accuracy_stderr": float(acc.std(ddof=1) / math.sqrt(acc.size)),
        "fold_accuracy": fold_acc,
        "fold_threshold": fold_thr,
        "threshold": threshold,
        "threshold_accuracy": threshold_accuracy,
        "threshold_tar": float(np.mean(d[y] <= threshold)),
        "threshold_far": float(np.mean(d[~y] <= threshold)),
        "far_target": float(far_target),
        "tar_at_far": _nanmean(np.asarray(fold_tar)),
        "far_at_far": _nanmean(np.asarray(fold_far)),
        "fold_tar": fold_tar,
        "fold_far": fold_far,
        "fold_far_threshold": fold_far_thr,
        "auc": roc_auc(d, y),
        "eer": equal_error_rate(fpr, tpr),
        "roc": {"fpr": fpr, "tpr": tpr, "thresholds": thresholds},
    }


def _json_safe(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return _json_safe(x.tolist())
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(x) else None
    return x


def report_to_json(report: Mapping[str, Any], *, include_roc: bool = False) -> dict[str, Any]:
    """JSON-safe copy of a report: numpy -> Python, NaN/inf -> None, ``roc`` dropped unless ``include_roc``."""
    return _json_safe({k: v for k, v in report.items() if include_roc or k != "roc"})

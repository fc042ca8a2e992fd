"""Verification plots (ROC, distance histograms) as PNG files.

Figures are built with matplotlib's object API on an Agg canvas: no pyplot, no global backend switch, nothing
shown, nothing left open.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "plot_distance_histogram",
    "plot_fold_accuracies",
    "plot_learning_curve",
    "plot_roc",
    "read_eval_curve",
]

DPI = 150
FAR_MIN = 1e-4

_SAME_COLOR = "#1f77b4"
_DIFF_COLOR = "#d62728"


def _new_figure(size: tuple[float, float]) -> Figure:
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI, format="png")
    fig.clear()
    return out


def _finite(report: Mapping[str, Any], key: str) -> float | None:
    value = report.get(key)
    if value is None:
        return None
    value = float(value)
    return value if np.isfinite(value) else None


def _roc_arrays(report_or_arrays: Any) -> tuple[np.ndarray, np.ndarray, Mapping[str, Any]]:
    """(fpr, tpr, report) from a report (with ``roc``), a ``{fpr, tpr}`` mapping or a ``(fpr, tpr, ...)`` tuple."""
    report: Mapping[str, Any] = {}
    roc: Any = report_or_arrays
    if isinstance(report_or_arrays, Mapping):
        if "roc" in report_or_arrays:
            report = report_or_arrays
            roc = report_or_arrays["roc"]
        if not isinstance(roc, Mapping) or "fpr" not in roc or "tpr" not in roc:
            raise ValueError(
                "plot_roc needs a verification report with a 'roc' entry, a mapping with 'fpr' and 'tpr', "
                f"or a (fpr, tpr[, thresholds]) tuple; got a mapping with keys {sorted(report_or_arrays)[:10]}"
            )
        fpr, tpr = roc["fpr"], roc["tpr"]
    elif isinstance(report_or_arrays, Sequence) and len(report_or_arrays) in (2, 3):
        fpr, tpr = report_or_arrays[0], report_or_arrays[1]
    else:
        raise ValueError(
            "plot_roc needs a verification report, a mapping with 'fpr' and 'tpr', or a (fpr, tpr[, thresholds]) "
            f"tuple; got {type(report_or_arrays).__name__}"
        )
    fpr = np.asarray(fpr, dtype=np.float64)
    tpr = np.asarray(tpr, dtype=np.float64)
    if fpr.ndim != 1 or fpr.shape != tpr.shape or fpr.size < 2:
        raise ValueError(
            f"fpr and tpr must be 1-D of equal length >= 2, got shapes {fpr.shape} and {tpr.shape}"
        )
    return fpr, tpr, report


def plot_roc(report_or_arrays: Any, path: str | os.PathLike, *, title: str | None = None) -> Path:
    """Save a ROC curve (log-scale FAR 1e-4..1 on x, TAR on y) as a PNG and return its path.

    Given a ``verification_protocol`` report, the deployment threshold's operating point and the cross-validated
    TAR@FAR point are marked and AUC / accuracy go in the legend. FAR = 0 is drawn at the left edge (1e-4).
    """
    fpr, tpr, report = _roc_arrays(report_or_arrays)
    auc = _finite(report, "auc")
    if auc is None:
        auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    curve_label = f"ROC (AUC = {auc:.5f})" if auc >= 0.999 else f"ROC (AUC = {auc:.4f})"
    acc, stderr = _finite(report, "accuracy_mean"), _finite(report, "accuracy_stderr")
    if acc is not None:
        curve_label += f"\naccuracy = {100 * acc:.2f}%" + (
            f" ± {100 * stderr:.2f} (s.e.)" if stderr is not None else ""
        )

    fig = _new_figure((6.4, 5.0))
    ax = fig.add_subplot()
    ax.plot(np.clip(fpr, FAR_MIN, 1.0), tpr, color=_SAME_COLOR, lw=2, label=curve_label)

    thr, t_far, t_tar = (
        _finite(report, "threshold"),
        _finite(report, "threshold_far"),
        _finite(report, "threshold_tar"),
    )
    if thr is not None and t_far is not None and t_tar is not None:
        ax.plot(
            max(t_far, FAR_MIN),
            t_tar,
            "o",
            ms=8,
            color="black",
            label=f"accuracy threshold d ≤ {thr:.3g}\n(TAR {t_tar:.3f} @ FAR {t_far:.2g})",
            zorder=3,
        )
    target, tar, far = (
        _finite(report, "far_target"),
        _finite(report, "tar_at_far"),
        _finite(report, "far_at_far"),
    )
    if target is not None and tar is not None and far is not None:
        ax.axvline(max(target, FAR_MIN), color="gray", ls=":", lw=1)
        ax.plot(
            max(far, FAR_MIN),
            tar,
            "s",
            ms=8,
            color="#ff7f0e",
            mec="black",
            label=f"TAR@FAR={target:.0e}: {tar:.3f}\n(cross-validated, FAR reached {far:.2g})",
            zorder=3,
        )

    ax.set_xscale("log")
    ax.set_xlim(FAR_MIN, 1.0)
    # zoom the TAR axis for strong models: start just below the TAR reached at the left edge (FAR <= 1e-4)
    tar_left = float(tpr[fpr <= FAR_MIN].max()) if np.any(fpr <= FAR_MIN) else 0.0
    y_low = 0.0 if tar_left < 0.5 else np.floor(20 * tar_left) / 20 - 0.05
    ax.set_ylim(y_low, 1.0 + 0.01 * (1.0 - y_low))
    ax.set_xlabel("false accept rate (FAR), log scale")
    ax.set_ylabel("true accept rate (TAR)")
    ax.grid(True, which="major", alpha=0.4)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="lower right", fontsize=9, framealpha=0.9)
    n_pairs = report.get("n_pairs")
    default = "Face verification ROC" + (f" ({n_pairs} pairs)" if n_pairs else "")
    ax.set_title(title if title is not None else default)
    return _save(fig, path)


def plot_distance_histogram(
    distances: Any,
    is_same: Any,
    threshold: float | None,
    path: str | os.PathLike,
    *,
    title: str | None = None,
    bins: int = 60,
    xlabel: str = "distance between embeddings",
) -> Path:
    """Save overlaid histograms of matched vs mismatched pair distances with the threshold line; return the path."""
    d = np.asarray(distances, dtype=np.float64)
    y = np.asarray(is_same).astype(bool)
    if d.ndim != 1 or d.shape != y.shape or d.size == 0:
        raise ValueError(
            f"distances and is_same must be 1-D, non-empty and of equal length, got {d.shape} and {y.shape}"
        )
    if not np.all(np.isfinite(d)):
        raise ValueError(f"distances must be finite; {int(np.sum(~np.isfinite(d)))} value(s) are NaN/inf")
    edges = np.histogram_bin_edges(d, bins=bins)

    fig = _new_figure((6.4, 4.4))
    ax = fig.add_subplot()
    ax.hist(d[y], bins=edges, color=_SAME_COLOR, alpha=0.55, label=f"matched pairs (n = {int(y.sum())})")
    ax.hist(
        d[~y], bins=edges, color=_DIFF_COLOR, alpha=0.55, label=f"mismatched pairs (n = {int((~y).sum())})"
    )
    if threshold is not None:
        ax.axvline(
            float(threshold), color="black", ls="--", lw=1.5, label=f"threshold = {float(threshold):.3g}"
        )
    ax.set_xlabel(xlabel)
    ax.set_ylabel("number of pairs")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=9, framealpha=0.9)
    ax.set_title(title if title is not None else "Pair distances: matched vs mismatched")
    return _save(fig, path)


def read_eval_curve(metrics_file: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(training minutes, held-out accuracy) of the evaluations logged in a run's ``metrics.jsonl``."""
    import json

    minutes, acc = [], []
    for line in Path(metrics_file).read_text().splitlines():
        row = json.loads(line)
        if "eval" in row:
            minutes.append(row["elapsed"] / 60.0)
            acc.append(row["eval"]["accuracy_mean"])
    return np.asarray(minutes), np.asarray(acc)


def plot_learning_curve(
    runs: Mapping[str, str | os.PathLike], path: str | os.PathLike, *, title: str | None = None
) -> Path:
    """Held-out accuracy against training time, one line per run (``label -> metrics.jsonl``)."""
    fig = _new_figure((6.4, 4.2))
    ax = fig.add_subplot()
    for label, metrics in runs.items():
        minutes, acc = read_eval_curve(metrics)
        if len(minutes) == 0:
            raise ValueError(f"{metrics} holds no evaluation; train with train.eval_every_epochs > 0")
        ax.plot(minutes, 100 * acc, marker="o", markersize=3, label=f"{label} (final {100 * acc[-1]:.1f}%)")
    ax.set_xlabel("training time (minutes)")
    ax.set_ylabel("held-out verification accuracy (%)")
    ax.set_title(title or "Learning curve")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right")
    return _save(fig, path)


def plot_fold_accuracies(
    folds: Sequence[int],
    accuracies: Sequence[float],
    path: str | os.PathLike,
    *,
    stds: Sequence[float] | None = None,
    title: str | None = None,
) -> Path:
    """One bar per LFW fold (accuracy in [0, 1], optional within-fold std as error bars), with the mean and its
    standard error over the folds as a band."""
    acc = 100 * np.asarray(accuracies, dtype=np.float64)
    if acc.size == 0 or acc.size != len(folds):
        raise ValueError(f"need one accuracy per fold, got {acc.size} for {len(folds)} folds")
    mean = float(acc.mean())
    stderr = float(acc.std(ddof=1) / np.sqrt(acc.size)) if acc.size > 1 else 0.0
    fig = _new_figure((6.4, 3.8))
    ax = fig.add_subplot()
    x = np.arange(acc.size)
    err = None if stds is None else 100 * np.asarray(stds, dtype=np.float64)
    ax.bar(
        x, acc, yerr=err, color=_SAME_COLOR, alpha=0.8, capsize=3, label="fold accuracy (+- std within fold)"
    )
    ax.axhline(mean, color=_DIFF_COLOR, label=f"mean {mean:.2f} +- {stderr:.2f}% (s.e.)")
    ax.axhspan(mean - stderr, mean + stderr, color=_DIFF_COLOR, alpha=0.15)
    ax.set_xticks(x, [str(k) for k in folds])
    ax.set_xlabel("LFW fold (scored by a model that never saw its people)")
    ax.set_ylabel("verification accuracy (%)")
    low = float(np.min(acc - (err if err is not None else 0)))
    ax.set_ylim(max(0.0, 5 * np.floor((low - 5) / 5)), 100)
    ax.set_title(title or "LFW 10-fold protocol")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper right")
    return _save(fig, path)

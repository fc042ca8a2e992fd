"""Calibrated verification scores for applications: the model's :class:`Calibration` (fitted by
``facenet-hf calibrate``; defined beside the model's schema, which validates it) and its quality measures."""

from facenet_hf.model.calibration import (
    CALIBRATION_METHODS,
    Calibration,
    brier_score,
    fit_calibration,
    model_calibration,
    reliability_curve,
)

__all__ = [
    "CALIBRATION_METHODS",
    "Calibration",
    "brier_score",
    "fit_calibration",
    "model_calibration",
    "plot_reliability",
    "reliability_curve",
]


def plot_reliability(curve: dict, path, *, title: str = "reliability") -> None:
    """Reliability diagram of a :func:`reliability_curve`: observed frequency of "same" per predicted-probability
    bin against the diagonal, the bins' counts beneath."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5, 6), height_ratios=[3, 1], sharex=True)
    centres = [(lo + hi) / 2 for lo, hi in zip(curve["bin_lower"], curve["bin_upper"], strict=True)]
    ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=1, label="perfect calibration")
    ax.plot(
        curve["mean_predicted"], curve["observed"], "o-", color="C0", label=f"model (ECE {curve['ece']:.3f})"
    )
    ax.set_ylabel("observed fraction of same-person pairs")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    ax.set_title(title)
    widths = [hi - lo for lo, hi in zip(curve["bin_lower"], curve["bin_upper"], strict=True)]
    ax_n.bar(centres, curve["count"], width=widths, color="C0", alpha=0.6, edgecolor="white")
    ax_n.set_xlabel("predicted P(same person)")
    ax_n.set_ylabel("pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""A verification score you can trust: P(same person | distance), and thresholds at a chosen false-accept rate.

:func:`fit_calibration` fits, on matched/mismatched pair distances, either a logistic model
``P = sigmoid(a + b * d)`` (Platt scaling, two parameters, smooth) or an isotonic one (a non-increasing step
function of the distance, pool-adjacent-violators), and tabulates the distance threshold at false-accept rates
from ``1 / n_mismatched`` to 1 with the true-accept rate each gives on the fitting pairs. A :class:`Calibration`
round-trips through a dict: it travels in the model's ``config.json`` (``calibration``) with a record of the data
it was fitted on (``fitted_on``), and :func:`facenet_hf.model.FaceNet.from_pretrained` validates it like any field.

Pure numpy: it sits beside the model's schema, which validates it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from facenet_hf.constants import DISTANCES, FLIP_MODES, MAX_DISTANCE
from facenet_hf.validation import is_real

__all__ = [
    "CALIBRATION_METHODS",
    "Calibration",
    "brier_score",
    "fit_calibration",
    "model_calibration",
    "reliability_curve",
]

CALIBRATION_METHODS = ("logistic", "isotonic")
_FAR_GRID_POINTS = 49  # log-spaced FARs between 1 / n_mismatched and 1, plus the round ones below
_ROUND_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class Calibration:
    """P(same | distance) and the distance threshold at a false-accept rate, for one model + preprocessing.

    ``params``: ``{"a", "b"}`` (logistic) or ``{"x", "y"}`` (isotonic knots: distances ascending, probabilities
    non-increasing). ``far_table``: rows ``[far, threshold, tar]``, far ascending. ``flip``: the test-time
    augmentation the distances were computed with. ``fitted_on``: what the pairs were (dataset, folds, counts).
    """

    method: str
    distance: str
    params: dict[str, Any]
    far_table: list[list[float]]
    flip: str = "sum"
    fitted_on: dict[str, Any] = field(default_factory=dict)
    brier: float | None = None

    def __post_init__(self) -> None:
        _validate(self)

    # -- use ----------------------------------------------------------------------------------------------
    def probability(self, distances: Any) -> np.ndarray:
        """P(same person) for each distance (float64, same shape as ``distances``)."""
        d = np.asarray(distances, dtype=np.float64)
        if self.method == "logistic":
            z = self.params["a"] + self.params["b"] * d
            return 0.5 * (1.0 + np.tanh(0.5 * z))  # a sigmoid that never overflows
        x, y = np.asarray(self.params["x"]), np.asarray(self.params["y"])
        return np.interp(d, x, y)  # constant beyond the ends

    @property
    def min_far(self) -> float:
        """The smallest false-accept rate the fitting pairs can certify: 1 / (number of mismatched pairs)."""
        return float(self.far_table[0][0])

    def threshold_at_far(self, far: float) -> float:
        """The distance threshold whose false-accept rate on the fitting pairs is at most ``far``.

        Conservative: the row of the largest tabulated FAR <= ``far``. Raises ``ValueError`` below
        :attr:`min_far` (fewer mismatched pairs than 1 / far were seen: no threshold is certified there)."""
        row = self._row(far)
        return float(row[1])

    def tar_at_far(self, far: float) -> float:
        """The true-accept rate on the fitting pairs at :meth:`threshold_at_far`."""
        return float(self._row(far)[2])

    def _row(self, far: float) -> list[float]:
        if not is_real(far) or not 0.0 < far <= 1.0:
            raise ValueError(f"far must be a false-accept rate in (0, 1], got {far!r}")
        fars = np.asarray([r[0] for r in self.far_table])
        k = int(np.searchsorted(fars, far * (1.0 + 1e-9), side="right")) - 1
        if k < 0:
            n = self.fitted_on.get("n_mismatched")
            seen = f"{n} mismatched pairs" if n else "its mismatched pairs"
            raise ValueError(
                f"far={far:g} is below what this calibration can certify ({self.min_far:.3g} = 1 / {seen}); "
                "choose far >= that, or calibrate on more mismatched pairs"
            )
        return self.far_table[k]

    # -- (de)serialisation ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict (what ``config.json``'s ``calibration`` holds)."""
        return {
            "method": self.method,
            "distance": self.distance,
            "flip": self.flip,
            "params": {
                k: (list(map(float, v)) if isinstance(v, list) else float(v)) for k, v in self.params.items()
            },
            "far_table": [[float(x) for x in row] for row in self.far_table],
            "fitted_on": dict(self.fitted_on),
            "brier": None if self.brier is None else float(self.brier),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Calibration:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming the first bad key."""
        if not isinstance(data, Mapping):
            raise ValueError(f"a calibration must be a JSON object, got {type(data).__name__}")
        allowed = ("method", "distance", "flip", "params", "far_table", "fitted_on", "brier")
        unknown = [k for k in data if k not in allowed]
        if unknown:
            raise ValueError(f"unknown key {unknown[0]!r}; a calibration holds {', '.join(allowed)}")
        missing = [k for k in ("method", "distance", "params", "far_table") if k not in data]
        if missing:
            raise ValueError(f"missing key {missing[0]!r}")
        params = data["params"]
        if not isinstance(params, Mapping):
            raise ValueError(f"'params' must be an object, got {params!r}")
        fitted_on = data.get("fitted_on") or {}
        if not isinstance(fitted_on, Mapping):
            raise ValueError(f"'fitted_on' must be an object, got {fitted_on!r}")
        table = data["far_table"]
        if not isinstance(table, list):
            raise ValueError(f"'far_table' must be a list of [far, threshold, tar] rows, got {table!r}")
        return cls(
            method=data["method"],
            distance=data["distance"],
            params=dict(params),
            far_table=[list(r) if isinstance(r, (list, tuple)) else r for r in table],
            flip=data.get("flip", "sum"),
            fitted_on=dict(fitted_on),
            brier=data.get("brier"),
        )


def _validate(c: Calibration) -> None:
    if c.method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {list(CALIBRATION_METHODS)}, got {c.method!r}")
    if c.distance not in DISTANCES:
        raise ValueError(f"distance must be one of {list(DISTANCES)}, got {c.distance!r}")
    if c.flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {list(FLIP_MODES)}, got {c.flip!r}")
    if c.method == "logistic":
        if set(c.params) != {"a", "b"} or not all(is_real(c.params[k]) for k in ("a", "b")):
            raise ValueError(f"logistic params must be finite numbers 'a' and 'b', got {c.params!r}")
        if c.params["b"] > 0:
            raise ValueError(
                f"logistic slope 'b' must be <= 0 (P(same) falls with distance), got {c.params['b']}"
            )
    else:
        x, y = c.params.get("x"), c.params.get("y")
        if (
            set(c.params) != {"x", "y"}
            or not isinstance(x, list)
            or not isinstance(y, list)
            or len(x) != len(y)
        ):
            raise ValueError(
                "isotonic params must be lists 'x' (distances) and 'y' (probabilities) of equal length"
            )
        if not x or not all(is_real(v) for v in x + y):
            raise ValueError("isotonic params must be non-empty lists of finite numbers")
        if np.any(np.diff(x) < 0) or np.any(np.diff(y) > 0) or min(y) < 0 or max(y) > 1:
            raise ValueError("isotonic knots must have x ascending and y non-increasing in [0, 1]")
    rows = c.far_table
    if not rows or not all(isinstance(r, list) and len(r) == 3 and all(is_real(v) for v in r) for r in rows):
        raise ValueError("far_table must be a non-empty list of [far, threshold, tar] rows of finite numbers")
    arr = np.asarray(rows, dtype=np.float64)
    top = MAX_DISTANCE[c.distance]
    if (
        np.any(np.diff(arr[:, 0]) <= 0)
        or np.any(np.diff(arr[:, 1]) < 0)
        or np.any((arr[:, 0] <= 0) | (arr[:, 0] > 1))
        or np.any((arr[:, 1] < 0) | (arr[:, 1] > top * (1 + 1e-6)))
        or np.any((arr[:, 2] < 0) | (arr[:, 2] > 1))
    ):
        raise ValueError(
            f"far_table rows must have far ascending in (0, 1], thresholds non-decreasing in [0, {top:g}] and "
            "tar in [0, 1]"
        )
    if c.brier is not None and (not is_real(c.brier) or not 0.0 <= c.brier <= 1.0):
        raise ValueError(f"brier must be null or a number in [0, 1], got {c.brier!r}")


# -- fitting ------------------------------------------------------------------------------------------------
def _labels(distances: Any, is_same: Any) -> tuple[np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    y = np.asarray(is_same).reshape(-1)
    if d.size != y.size:
        raise ValueError(f"{d.size} distances but {y.size} labels; they must match")
    if not np.all(np.isfinite(d)):
        raise ValueError("distances must be finite")
    y = y.astype(bool)
    n_same, n_diff = int(y.sum()), int((~y).sum())
    if n_same == 0 or n_diff == 0:
        raise ValueError(
            f"calibration needs matched and mismatched pairs, got {n_same} matched and {n_diff} mismatched"
        )
    return d, y


def _fit_logistic(d: np.ndarray, y: np.ndarray, l2: float = 1e-6, iters: int = 100) -> tuple[float, float]:
    """Maximum-likelihood ``a, b`` of ``P(y=1) = sigmoid(a + b d)`` by Newton's method (IRLS).

    The distance is standardised first (and the parameters mapped back), ``l2`` keeps separable data finite."""
    mu, sd = float(d.mean()), float(d.std()) or 1.0
    x = (d - mu) / sd
    X = np.stack([np.ones_like(x), x], axis=1)
    w = np.zeros(2)
    t = y.astype(np.float64)
    for _ in range(iters):
        p = 0.5 * (1.0 + np.tanh(0.5 * (X @ w)))
        grad = X.T @ (p - t) + l2 * w
        hess = (X * (p * (1 - p))[:, None]).T @ X + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    b = w[1] / sd
    return float(w[0] - b * mu), float(b)


def _fit_isotonic(d: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]]:
    """Non-increasing least-squares fit of ``y`` on ``d`` (pool adjacent violators); knots at block ends.

    Equal distances are pooled first (they must get one value), as scikit-learn's IsotonicRegression does."""
    u, inv = np.unique(d, return_inverse=True)
    w = np.bincount(inv).astype(np.float64)
    v = -np.bincount(inv, weights=y.astype(np.float64)) / w  # non-increasing y == non-decreasing -y
    blocks: list[list[float]] = []  # [value, weight, first index] in ascending d
    for i in range(len(u)):
        blocks.append([v[i], w[i], i])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, _ = blocks.pop()
            v1, w1, start = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, start])
    xs: list[float] = []
    ys: list[float] = []
    ends = [int(b[2]) for b in blocks[1:]] + [len(u)]
    for (value, _, start), end in zip(blocks, ends, strict=True):
        # the first and last distance of each block: np.interp is then exact at every fitted distance
        xs += [float(u[int(start)]), float(u[end - 1])]
        ys += [float(-value)] * 2
    return xs, ys


def _far_table(d: np.ndarray, y: np.ndarray) -> list[list[float]]:
    """Rows ``[far, threshold, tar]`` for log-spaced fars: the largest threshold (accept iff distance <= t) that
    accepts at most ``floor(far * n_mismatched)`` mismatched pairs, placed midway between neighbouring distances
    as the verification protocol places its candidates."""
    diff = np.sort(d[~y])
    same = np.sort(d[y])
    every = np.sort(d)
    n = diff.size
    lo = 1.0 / n
    grid = np.unique(
        np.concatenate(
            [np.logspace(math.log10(lo), 0.0, _FAR_GRID_POINTS), [f for f in _ROUND_FARS if f >= lo]]
        )
    )
    rows = []
    for far in grid:
        k = math.floor(far * n * (1.0 + 1e-12))  # mismatched pairs that may be accepted
        if k >= n:
            t = float(every[-1])
        else:
            stop = diff[k]  # the (k+1)-th smallest mismatched distance must be rejected
            below = every[: np.searchsorted(every, stop, side="left")]
            t = (
                float(0.5 * (below[-1] + stop))
                if below.size
                else max(0.0, float(np.nextafter(stop, -np.inf)))
            )
        tar = float(np.searchsorted(same, t, side="right") / same.size)
        rows.append([float(far), t, tar])
    return rows


def fit_calibration(
    distances: Any,
    is_same: Any,
    *,
    method: str = "logistic",
    distance: str = "squared_euclidean",
    flip: str = "sum",
    fitted_on: Mapping[str, Any] | None = None,
) -> Calibration:
    """Fit P(same | distance) and the FAR table on pair ``distances`` with labels ``is_same``.

    ``fitted_on`` describes the pairs (e.g. ``{"dataset": "LFW", "folds": [1, ..., 9]}``); the counts of matched
    and mismatched pairs are added to it. ``brier`` is the Brier score on the fitting pairs themselves (an
    optimistic figure: measure it on other pairs with :func:`brier_score`)."""
    if method not in CALIBRATION_METHODS:
        raise ValueError(f"method must be one of {list(CALIBRATION_METHODS)}, got {method!r}")
    d, y = _labels(distances, is_same)
    if method == "logistic":
        a, b = _fit_logistic(d, y)
        params: dict[str, Any] = {"a": a, "b": min(b, 0.0)}
    else:
        xs, ys = _fit_isotonic(d, y)
        params = {"x": xs, "y": ys}
    record = dict(fitted_on or {})
    record.update(n_pairs=int(d.size), n_matched=int(y.sum()), n_mismatched=int((~y).sum()))
    cal = Calibration(method, distance, params, _far_table(d, y), flip=flip, fitted_on=record)
    cal.brier = brier_score(cal.probability(d), y)
    return cal


# -- quality ------------------------------------------------------------------------------------------------
def brier_score(probability: Any, is_same: Any) -> float:
    """Mean squared error of the probabilities against the 0/1 outcomes (0 is perfect, 0.25 is a coin)."""
    p = np.asarray(probability, dtype=np.float64).reshape(-1)
    y = np.asarray(is_same, dtype=np.float64).reshape(-1)
    if p.size != y.size or p.size == 0:
        raise ValueError(
            f"brier_score needs equal, non-zero numbers of probabilities and labels ({p.size}, {y.size})"
        )
    return float(np.mean((p - y) ** 2))


def reliability_curve(probability: Any, is_same: Any, n_bins: int = 10) -> dict[str, Any]:
    """Equal-width bins of predicted probability: per bin the mean prediction, the observed frequency of "same"
    and the count (empty bins are dropped); plus the expected calibration error (count-weighted |gap|)."""
    p = np.asarray(probability, dtype=np.float64).reshape(-1)
    y = np.asarray(is_same, dtype=np.float64).reshape(-1)
    if p.size != y.size or p.size == 0:
        raise ValueError("reliability_curve needs equal, non-zero numbers of probabilities and labels")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(bins, minlength=n_bins)
    mean_p = np.bincount(bins, weights=p, minlength=n_bins)
    freq = np.bincount(bins, weights=y, minlength=n_bins)
    keep = count > 0
    mean_p, freq, n = mean_p[keep] / count[keep], freq[keep] / count[keep], count[keep]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return {
        "bin_lower": edges[:-1][keep].tolist(),
        "bin_upper": edges[1:][keep].tolist(),
        "mean_predicted": mean_p.tolist(),
        "observed": freq.tolist(),
        "count": n.astype(int).tolist(),
        "ece": float(np.sum(n * np.abs(mean_p - freq)) / p.size),
    }


def model_calibration(model: Any) -> Calibration | None:
    """The :class:`Calibration` stored in a model's config (``model.calibration``), or None."""
    data = getattr(model, "calibration", None)
    return None if data is None else Calibration.from_dict(data)

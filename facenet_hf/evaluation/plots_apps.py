"""Pictures of what an embedder does: a 2-D map of embeddings coloured by identity (t-SNE or PCA), and the worst
verification errors (the different people it accepts most readily, the same people it rejects most firmly).

Same style as :mod:`facenet_hf.evaluation.plots`: matplotlib's object API on an Agg canvas, imported only when a
figure is drawn; nothing shown, nothing left open.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "MAP_METHODS",
    "embedding_map_coordinates",
    "plot_embedding_map",
    "plot_worst_pairs",
    "worst_pairs",
]

MAP_METHODS = ("tsne", "pca")
DPI = 150
_OTHER_COLOR = "#b0b0b0"


def _figure(size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    from facenet_hf.fileio import atomic_path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    fig.clear()
    return out


# -- the embedding map ------------------------------------------------------------------------------------------
def embedding_map_coordinates(
    embeddings: Any, *, method: str = "tsne", seed: int = 0, perplexity: float = 30.0
) -> np.ndarray:
    """(N, 2) float64 coordinates of ``embeddings`` (N x D): the first two principal components (numpy SVD of
    the centred rows; each axis' sign fixed so its largest-magnitude loading is positive) or a t-SNE map
    (scikit-learn, PCA-initialised, ``perplexity`` capped below N / 3 for small sets)."""
    if method not in MAP_METHODS:
        raise ValueError(f"method must be one of {list(MAP_METHODS)}, got {method!r}")
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 3 or x.shape[1] < 2:
        raise ValueError(f"a 2-D map needs at least 3 embeddings of dimension >= 2, got shape {x.shape}")
    bad = np.flatnonzero(~np.all(np.isfinite(x), axis=1))
    if bad.size:
        raise ValueError(f"{bad.size} embedding row(s) hold NaN or inf values, e.g. rows {bad[:5].tolist()}")
    if method == "pca":
        centred = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        axes = vt[:2]
        signs = np.sign(axes[np.arange(2), np.argmax(np.abs(axes), axis=1)])
        return centred @ (axes * signs[:, None]).T
    from sklearn.manifold import TSNE

    perp = float(min(perplexity, max(1.0, (x.shape[0] - 1) / 3.0)))
    tsne = TSNE(n_components=2, perplexity=perp, init="pca", learning_rate="auto", random_state=seed)
    return np.asarray(tsne.fit_transform(x), dtype=np.float64)


def plot_embedding_map(
    embeddings: Any,
    labels: Sequence[Any] | None,
    out_png: str | os.PathLike,
    *,
    method: str = "tsne",
    top: int = 10,
    seed: int = 0,
    perplexity: float = 30.0,
    title: str | None = None,
) -> Path:
    """Save a 2-D map (``method`` ``tsne`` or ``pca``) of ``embeddings`` as a PNG, points coloured by ``labels``
    (identities; None: one colour): the ``top`` most frequent identities get a colour and a legend entry each,
    the rest are grey. Returns the path."""
    xy = embedding_map_coordinates(embeddings, method=method, seed=seed, perplexity=perplexity)
    n = xy.shape[0]
    if labels is not None and len(labels) != n:
        raise ValueError(f"{len(labels)} labels for {n} embeddings; they must match")
    fig = _figure((7.6, 6.0))
    ax = fig.add_subplot()
    size = float(np.clip(3000.0 / n, 4.0, 40.0))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, color="#1f77b4", alpha=0.8, lw=0)
        n_ids = None
    else:
        names = np.asarray(["" if v is None else str(v) for v in labels])
        uniq, counts = np.unique(names, return_counts=True)
        n_ids = uniq.size
        order = np.lexsort((uniq, -counts))  # most frequent first, then by name
        shown = uniq[order[: max(0, top)]]
        rest = ~np.isin(names, shown)
        if rest.any():
            label = f"other ({n_ids - shown.size} identities, {int(rest.sum())} faces)"
            ax.scatter(
                xy[rest, 0], xy[rest, 1], s=size * 0.6, color=_OTHER_COLOR, alpha=0.6, lw=0, label=label
            )
        from matplotlib import colormaps

        cmap = colormaps["tab10" if shown.size <= 10 else "tab20"]
        for i, name in enumerate(shown):
            m = names == name
            ax.scatter(
                xy[m, 0],
                xy[m, 1],
                s=size * 1.5,
                color=cmap(i % cmap.N),
                alpha=0.9,
                lw=0.3,
                edgecolor="black",
                label=f"{name or '(unknown)'} ({int(m.sum())})",
            )
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, framealpha=0.9, markerscale=1.5)
    ax.set_xticks([])
    ax.set_yticks([])
    what = "t-SNE" if method == "tsne" else "PCA (first two components)"
    default = f"{what} of {n} embeddings" + (f", {n_ids} identities" if n_ids is not None else "")
    ax.set_title(title if title is not None else default)
    return _save(fig, out_png)


# -- the worst verification errors ------------------------------------------------------------------------------
def worst_pairs(
    distances: Any, is_same: Any, threshold: float | None = None, n: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the worst errors: ``(false_accepts, false_rejects)``.

    False accepts are different-person pairs by increasing distance (the most convincing impostors first), false
    rejects same-person pairs by decreasing distance; ties keep the pairs' order. With a ``threshold`` only real
    errors count (different at distance ``<= threshold``, same at ``> threshold``, as verification decides);
    without one, the closest different and farthest same pairs. At most ``n`` of each."""
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    y = np.asarray(is_same).astype(bool).reshape(-1)
    if d.shape != y.shape:
        raise ValueError(f"distances and is_same must have one length, got {d.size} and {y.size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not np.all(np.isfinite(d)):
        raise ValueError(f"distances must be finite; {int(np.sum(~np.isfinite(d)))} value(s) are NaN/inf")
    diff, same = np.flatnonzero(~y), np.flatnonzero(y)
    if threshold is not None:
        diff = diff[d[diff] <= threshold]
        same = same[d[same] > threshold]
    fa = diff[np.argsort(d[diff], kind="stable")][:n]
    fr = same[np.argsort(-d[same], kind="stable")][:n]
    return fa.astype(np.int64), fr.astype(np.int64)


def _pair_image(a: Any, b: Any, side: int, image_root: Any) -> np.ndarray:
    """The two images resized to ``side`` x ``side`` and put side by side (grey for an unreadable one)."""
    from PIL import Image, ImageOps

    from facenet_hf.data.images import BadImageError, load_image

    tiles = []
    for img in (a, b):
        if isinstance(img, (str, os.PathLike)) and image_root is not None and not Path(img).is_absolute():
            img = Path(image_root) / img
        try:
            pil = ImageOps.pad(
                load_image(img), (side, side), method=Image.Resampling.BILINEAR, color=(40, 40, 40)
            )
            tiles.append(np.asarray(pil))
        except (BadImageError, OSError):
            tiles.append(np.full((side, side, 3), 160, dtype=np.uint8))
    gap = np.full((side, max(2, side // 32), 3), 255, dtype=np.uint8)
    return np.concatenate([tiles[0], gap, tiles[1]], axis=1)


def _short(path: Any, width: int = 28) -> str:
    """A file's stem (LFW's name the person), cut to ``width`` characters."""
    stem = Path(str(path)).stem
    return stem if len(stem) <= width else stem[: width - 1] + "…"


def plot_worst_pairs(
    pair_paths: Sequence[tuple[Any, Any]],
    distances: Any,
    is_same: Any,
    threshold: float | None,
    out_png: str | os.PathLike,
    *,
    n: int = 8,
    image_root: str | os.PathLike | None = None,
    side: int = 112,
    title: str | None = None,
) -> Path:
    """Save a grid of the worst false accepts (left column) and false rejects (right column) of
    :func:`worst_pairs`: each cell the two images side by side, titled with their distance and names. Relative
    paths are read under ``image_root``. Returns the path."""
    if len(pair_paths) != np.asarray(distances).reshape(-1).size:
        raise ValueError(
            f"{len(pair_paths)} pairs but {np.asarray(distances).size} distances; they must match"
        )
    fa, fr = worst_pairs(distances, is_same, threshold, n)
    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    rows = max(1, fa.size, fr.size)
    fig = _figure((8.0, 1.85 * rows + 0.8))
    heads = ("false accepts: different people, closest", "false rejects: same person, farthest")
    for sub, chosen, head in zip(fig.subfigures(1, 2), (fa, fr), heads, strict=True):
        sub.suptitle(head, fontsize=8.5, weight="bold")
        axes = np.atleast_1d(sub.subplots(rows, 1))
        for r, ax in enumerate(axes):
            ax.set_axis_off()
            if r < chosen.size:
                i = int(chosen[r])
                a, b = pair_paths[i]
                ax.imshow(_pair_image(a, b, side, image_root))
                ax.set_title(f"d = {d[i]:.3f}\n{_short(a)} | {_short(b)}", fontsize=6.5)
            elif r == 0:
                ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=11, transform=ax.transAxes)
    thr = "" if threshold is None else f" at threshold {threshold:.4g} (same person if d ≤ threshold)"
    fig.suptitle(title if title is not None else f"What the model gets wrong{thr}", fontsize=10)
    return _save(fig, out_png)

"""The distance between embeddings, in one place (numpy only): squared Euclidean (FaceNet's) or Euclidean."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["row_distances"]


def row_distances(a: Any, b: Any, *, squared: bool = True) -> np.ndarray:
    """Distances between the rows of ``a`` and ``b`` (``[N, D]`` or ``[D]``, arrays or CPU tensors), in float64."""
    d = np.sum((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2, axis=-1)
    return d if squared else np.sqrt(d)

"""Proving an export: onnxruntime's embeddings against PyTorch's on real images, at several batch sizes.

Three comparisons, each a max absolute difference (and the cosine) per embedding value against the PyTorch
model's embeddings of the same images:

- ``batch_1`` / ``batch_17``: the ONNX graph on the tensors of facenet_hf's own eval preprocessing, run one
  image at a time and 17 at a time (the batch dimension is dynamic; 17 is no power of two on purpose);
- ``end_to_end``: what a deployment gets: the numpy/PIL preprocessing of :class:`~facenet_hf.export.runtime.
  Preprocessor` and the ONNX graph, against torch preprocessing + PyTorch; ``preprocessing_max_abs_diff`` is the
  difference of the two input tensors alone.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from facenet_hf.data.images import load_image
from facenet_hf.export.runtime import OnnxEmbedder, Preprocessor
from facenet_hf.model.inference import model_transform

__all__ = [
    "DEFAULT_BATCHES",
    "DEFAULT_PARITY_IMAGES",
    "IMAGE_SUFFIXES",
    "bundled_sample_images",
    "check_parity",
    "compare_embeddings",
    "resolve_images",
]

DEFAULT_BATCHES = (1, 17)
DEFAULT_PARITY_IMAGES = 34  # two batches of 17
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def bundled_sample_images() -> Path | None:
    """The bundled LFW sample's image folder (``data/lfw_sample/lfw-deepfunneled`` of a checkout), or None."""
    root = Path(__file__).resolve().parents[2] / "data" / "lfw_sample" / "lfw-deepfunneled"
    return root if root.is_dir() else None


def resolve_images(
    specs: Sequence[str | os.PathLike] | None, count: int = DEFAULT_PARITY_IMAGES
) -> tuple[list[Path], str]:
    """Image files from folders (searched recursively), files and glob patterns; ``count`` of them, evenly
    spread over the sorted list. None: the bundled LFW sample. Returns (files, a description of the source)."""
    if count < 1:
        raise ValueError(f"the number of parity images must be >= 1, got {count}")
    if not specs:
        root = bundled_sample_images()
        if root is None:
            raise ValueError(
                "no parity images: pass some real face images (--parity-images DIR or GLOB); the bundled LFW "
                "sample (data/lfw_sample) exists only in a checkout of facenet_hf"
            )
        specs, source = [root], f"bundled LFW sample ({root})"
    else:
        source = ", ".join(str(s) for s in specs)
    files: set[Path] = set()
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            files |= {f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file()}
        elif path.is_file():
            files.add(path)
        else:
            matches = [Path(m) for m in glob.glob(str(spec), recursive=True)]
            found = {m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES}
            if not found:
                raise FileNotFoundError(
                    f"parity images {spec}: no such file or folder, and no image matches it"
                )
            files |= found
    ordered = sorted(files)
    if not ordered:
        raise ValueError(f"parity images {source}: no image files ({', '.join(IMAGE_SUFFIXES)}) there")
    if len(ordered) > count:
        picks = sorted(set(np.linspace(0, len(ordered) - 1, count).round().astype(int).tolist()))
        ordered = [ordered[i] for i in picks]
    return ordered, source


def _stats(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    a, b = got.astype(np.float64), ref.astype(np.float64)
    cos = np.sum(a * b, axis=1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return {
        "max_abs_diff": float(np.abs(a - b).max()),
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
    }


def _batched(run: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> tuple[np.ndarray, list]:
    """Run ``x`` in batches of exactly ``batch`` rows (the last one filled up from the start); rows and indices."""
    n = len(x)
    out, rows = [], []
    for start in range(0, n, batch):
        idx = [(start + i) % n for i in range(batch)]
        out.append(run(x[idx]))
        rows += idx
    return np.concatenate(out), rows


def compare_embeddings(
    model: nn.Module,
    run: Callable[[np.ndarray], np.ndarray],
    files: Sequence[str | os.PathLike],
    *,
    preprocessor: Preprocessor | None = None,
    batches: Sequence[int] = DEFAULT_BATCHES,
    tolerance: float | None = None,
) -> dict[str, Any]:
    """``run`` (float32 NCHW -> embeddings, e.g. an onnxruntime session) against ``model`` (PyTorch, eval mode)
    on ``files``: a report ``{batch_B: {max_abs_diff, mean_cosine, min_cosine}, end_to_end: ..., max_abs_diff,
    passed}`` (``passed`` only with a ``tolerance``). ``preprocessor``: also compare the numpy preprocessing
    + ``run`` end to end."""
    if not files:
        raise ValueError("parity needs at least one image")
    was_training = model.training
    model.eval()
    transform = model_transform(model)
    x = torch.stack([transform(load_image(f)) for f in files])
    try:
        with torch.inference_mode():
            ref = torch.cat([model(chunk).float() for chunk in x.split(max(batches))]).numpy()
    finally:
        model.train(was_training)
    xn = x.numpy()
    report: dict[str, Any] = {"images": len(files)}
    worst = 0.0
    for b in batches:
        got, rows = _batched(run, xn, int(b))
        report[f"batch_{b}"] = _stats(got, ref[rows])
        worst = max(worst, report[f"batch_{b}"]["max_abs_diff"])
    if preprocessor is not None:
        xp = preprocessor.batch(list(files))
        got, rows = _batched(run, xp, int(max(batches)))
        report["end_to_end"] = {
            **_stats(got, ref[rows]),
            "preprocessing_max_abs_diff": float(np.abs(xp - xn).max()),
        }
        worst = max(worst, report["end_to_end"]["max_abs_diff"])
    report["max_abs_diff"] = worst
    report["min_cosine"] = min(v["min_cosine"] for v in report.values() if isinstance(v, dict))
    report["mean_cosine"] = float(np.mean([v["mean_cosine"] for v in report.values() if isinstance(v, dict)]))
    if tolerance is not None:
        report["tolerance"] = float(tolerance)
        report["passed"] = bool(worst <= tolerance)
    return report


def check_parity(
    model: nn.Module,
    folder: str | os.PathLike,
    images: Sequence[str | os.PathLike] | None = None,
    *,
    int8: bool = False,
    count: int = DEFAULT_PARITY_IMAGES,
    tolerance: float | None = 1e-4,
    batches: Sequence[int] = DEFAULT_BATCHES,
) -> dict[str, Any]:
    """Parity of an exported folder (its fp32 or int8 model) against the PyTorch ``model`` on ``images``
    (folders, files, globs; None: the bundled LFW sample); the report of :func:`compare_embeddings`."""
    files, source = resolve_images(images, count)
    embedder = OnnxEmbedder(folder, int8=int8)
    try:
        preprocessor: Preprocessor | None = embedder.preprocessor
    except ValueError:  # an eval step without a numpy implementation: the graph alone is compared
        preprocessor = None
    report = compare_embeddings(
        model, embedder.run, files, preprocessor=preprocessor, batches=batches, tolerance=tolerance
    )
    return {"source": source, **report}

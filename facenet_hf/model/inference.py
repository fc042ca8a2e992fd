"""Using a trained embedder: its eval preprocessing, flip test-time augmentation, embedding and verifying images.

:class:`~facenet_hf.model.FaceNet`'s ``preprocess`` / ``embed`` / ``verify`` methods call these; batch
embedding of many files (DataLoader workers, several processes) is :func:`facenet_hf.evaluation.embed.embed_files`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from facenet_hf.constants import DEFAULT_EVAL_STEPS, FLIP_MODES
from facenet_hf.distances import row_distances
from facenet_hf.faces import LFW_FRAMING_SPEC, AlignmentSpec, FaceAligner, build_detector

if TYPE_CHECKING:
    from PIL import Image

ImageLike = Union["Image.Image", str, os.PathLike]

__all__ = [
    "ImageLike",
    "NoFaceError",
    "align_for_model",
    "embed_images",
    "flip_embed",
    "is_channels_last",
    "model_aligner",
    "model_spec",
    "model_transform",
    "preprocess",
    "verify_images",
]


def model_transform(model: nn.Module) -> Callable:
    """The eval preprocessing stored in a model's config."""
    from facenet_hf.data.transforms import build_transform

    steps = model.eval_transforms if model.eval_transforms is not None else DEFAULT_EVAL_STEPS
    return build_transform(steps, image_size=model.image_size, mean=model.mean, std=model.std)


def flip_embed(model: nn.Module, pixel_values: torch.Tensor, flip: str) -> torch.Tensor:
    """Embed a batch; ``flip`` = off | sum (normalise(f(x) + f(flip x))) | concat ([f(x), f(flip x)] / sqrt 2)."""
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    emb = model(pixel_values)
    if flip == "off":
        return emb.float()
    emb_flip = model(torch.flip(pixel_values, dims=[3]))
    if flip == "sum":
        return F.normalize(emb.float() + emb_flip.float(), dim=-1)
    return torch.cat([emb.float(), emb_flip.float()], dim=-1) / np.sqrt(2.0)


def is_channels_last(model: nn.Module) -> bool:
    """Whether the model's convolution weights are in channels_last memory (then so should its inputs be)."""
    for p in model.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


class NoFaceError(ValueError):
    """No usable face in an image that had to be detected; names the image and the reason."""

    def __init__(self, source: str, reason: str) -> None:
        self.source, self.reason = source, reason
        super().__init__(
            f"no face to embed in {source}: {reason}. If the image already is an aligned face crop, pass "
            "detect=False"
        )


DETECT_MIN_SCORE = 0.9  # MTCNN faces scoring lower are ignored when embedding photos (as `facenet-hf align`)


def model_spec(model: nn.Module, detect: bool | None) -> AlignmentSpec | None:
    """The alignment to apply before the model's own preprocessing, or None (the images are used as given).

    A five-point model (``alignment`` in its config) is detected and aligned by default; an LFW-crop model
    (``alignment`` null) only with ``detect=True``, then onto the mean landmarks of LFW's deep-funneled images
    at 250 x 250, i.e. the framing it was trained on."""
    spec = getattr(model, "alignment", None)
    if detect is False or (detect is None and spec is None):
        return None
    return AlignmentSpec.from_dict(spec) if spec is not None else LFW_FRAMING_SPEC


def model_aligner(model: nn.Module, spec: AlignmentSpec) -> FaceAligner:
    """The model's cached :class:`~facenet_hf.faces.FaceAligner` for ``spec`` (MTCNN on the model's device,
    the largest face of each image)."""
    device = next(model.parameters()).device
    cached = getattr(model, "_facenet_aligner", None)
    if cached is None or cached.spec != spec or getattr(cached.detector, "device", device) != device:
        detector = build_detector("mtcnn", device=device, min_score=DETECT_MIN_SCORE)
        cached = FaceAligner(detector, spec, select="largest")
        object.__setattr__(model, "_facenet_aligner", cached)  # not a module attribute: never saved
    return cached


def align_for_model(
    model: nn.Module, images: Sequence[ImageLike], *, detect: bool | None = None
) -> list[Image.Image]:
    """The images as the model expects them: decoded, and detected + aligned when :func:`model_spec` says so.
    Raises :class:`NoFaceError` for an image without a face."""
    from facenet_hf.data.images import load_image

    decoded = [load_image(img) for img in images]
    spec = model_spec(model, detect)
    if spec is None:
        return decoded
    results = model_aligner(model, spec).align(decoded)
    out = []
    for src, result in zip(images, results, strict=True):
        if not result.crops:
            raise NoFaceError(_name(src), result.reason)
        out.append(result.crops[0])
    return out


def _name(img: ImageLike) -> str:
    return os.fspath(img) if isinstance(img, (str, os.PathLike)) else f"<{type(img).__name__}>"


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    from PIL import Image

    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    return list(images)


def preprocess(
    model: nn.Module, images: ImageLike | Sequence[ImageLike], *, detect: bool | None = None
) -> torch.Tensor:
    """Images (``PIL.Image`` or file paths) -> float32 ``[N, 3, image_size, image_size]``: detected and aligned
    as :func:`model_spec` says (None: as the model was trained), then the model's eval preprocessing
    (:func:`model_transform`)."""
    images = _as_list(images)
    if not images:
        return torch.zeros(0, 3, model.image_size, model.image_size)
    transform = model_transform(model)
    return torch.stack([transform(img) for img in align_for_model(model, images, detect=detect)])


def embed_images(
    model: nn.Module,
    images: ImageLike | Sequence[ImageLike],
    *,
    batch_size: int = 64,
    flip: str = "off",
    detect: bool | None = None,
) -> torch.Tensor:
    """Unit embeddings ``[N, D]`` (float32, on the CPU) of images, in eval mode, without gradients.

    ``flip``: ``off``, ``sum`` (normalise(f(x) + f(flipped x))) or ``concat`` (``[N, 2D]``), as in evaluation.
    ``detect``: see :func:`model_spec` (None: as the model was trained).
    """
    if flip not in FLIP_MODES:
        raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    images = _as_list(images)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = preprocess(model, images[start : start + batch_size], detect=detect).to(device)
                out.append(flip_embed(model, x, flip).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, model.embedding_dim * (2 if flip == "concat" else 1))
    return torch.cat(out)


def verify_images(
    model: nn.Module, img1: ImageLike, img2: ImageLike, *, flip: str | None = None, detect: bool | None = None
) -> tuple[bool, float]:
    """Same person? ``(distance <= threshold, distance)`` with the model's stored threshold and distance.

    ``flip`` defaults to ``model.threshold_flip``, the test-time augmentation the threshold was calibrated with.
    Raises ``ValueError`` if no threshold is calibrated.
    """
    flip = flip or model.threshold_flip
    if model.threshold is None:
        raise ValueError(
            "this model has no calibrated verification threshold (config.json 'threshold' is null): calibrate "
            "one with `facenet-hf calibrate MODEL_DIR --lfw-dir ... --pairs ...`, set `model.threshold`, or "
            "compare the distances of `model.embed(...)` yourself"
        )
    emb = embed_images(model, [img1, img2], flip=flip, detect=detect)
    d = float(row_distances(emb[0], emb[1], squared=model.distance == "squared_euclidean"))
    return d <= model.threshold, d

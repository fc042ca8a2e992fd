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

if TYPE_CHECKING:
    from PIL import Image

ImageLike = Union["Image.Image", str, os.PathLike]

__all__ = [
    "ImageLike",
    "embed_images",
    "flip_embed",
    "is_channels_last",
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


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    from PIL import Image

    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    return list(images)


def preprocess(model: nn.Module, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
    """Images (``PIL.Image`` or file paths) -> float32 ``[N, 3, image_size, image_size]``, the model's eval
    preprocessing (:func:`model_transform`)."""
    from facenet_hf.data.images import load_image

    images = _as_list(images)
    if not images:
        return torch.zeros(0, 3, model.image_size, model.image_size)
    transform = model_transform(model)
    return torch.stack([transform(load_image(img)) for img in images])


def embed_images(
    model: nn.Module, images: ImageLike | Sequence[ImageLike], *, batch_size: int = 64, flip: str = "off"
) -> torch.Tensor:
    """Unit embeddings ``[N, D]`` (float32, on the CPU) of images, in eval mode, without gradients.

    ``flip``: ``off``, ``sum`` (normalise(f(x) + f(flipped x))) or ``concat`` (``[N, 2D]``), as in evaluation.
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
                x = preprocess(model, images[start : start + batch_size]).to(device)
                out.append(flip_embed(model, x, flip).float().cpu())
    finally:
        model.train(was_training)
    if not out:
        return torch.zeros(0, model.embedding_dim * (2 if flip == "concat" else 1))
    return torch.cat(out)


def verify_images(
    model: nn.Module, img1: ImageLike, img2: ImageLike, *, flip: str | None = None
) -> tuple[bool, float]:
    """Same person? ``(distance <= threshold, distance)`` with the model's stored threshold and distance.

    ``flip`` defaults to ``model.threshold_flip``, the test-time augmentation the threshold was calibrated with.
    Raises ``ValueError`` if no threshold is calibrated.
    """
    flip = flip or model.threshold_flip
    if model.threshold is None:
        raise ValueError(
            "this model has no calibrated verification threshold (config.json 'threshold' is null): calibrate "
            "one with `facenet-hf evaluate MODEL_DIR --lfw-dir ... --pairs ...`, set `model.threshold`, or "
            "compare the distances of `model.embed(...)` yourself"
        )
    emb = embed_images(model, [img1, img2], flip=flip)
    d = float(row_distances(emb[0], emb[1], squared=model.distance == "squared_euclidean"))
    return d <= model.threshold, d

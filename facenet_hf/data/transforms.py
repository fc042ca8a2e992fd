"""Preprocessing pipelines composed from named steps (torchvision.transforms.v2), and the batch transform.

A pipeline is a list of step specs, stored in YAML configs and in a model's ``config.json``. The canonical form
of a step is a one-key mapping ``{name: {param: value, ...}}``, e.g. ``{"random_resized_crop": {"scale": [0.8,
1.0]}}``; also accepted: a bare name (``"hflip"``, all defaults), ``{name: None}`` (YAML ``- hflip:``) and
``{"name": "hflip", "p": 0.3}``. :func:`canonical_steps` turns any of them into the canonical form (lists, not
tuples, so it is JSON/YAML-serialisable).

Steps run in three stages, whatever their order in the list:

1. image steps (every geometric / colour step) on the decoded ``PIL`` RGB image (PIL's C code is faster than
   tensor ops at face-crop sizes), in the order given; then, if the image is not ``image_size x image_size``,
   an exact resize to that size (it squashes a non-square image: put ``square_pad`` or a crop before it to keep
   the aspect ratio);
2. ``to_tensor`` + ``normalize`` (implicit; their place in the list does not matter): float32 CHW, normalised
   with the backbone mean/std (``mode: backbone``) or FaceNet's fixed ``(x*255 - 127.5) / 128``
   (``mode: fixed``); without a ``normalize`` step the ``normalization`` argument of :func:`build_transform`
   decides (default ``"backbone"``);
3. tensor steps (``random_erasing``) on the normalised tensor, in the order given.

Step names, parameters and defaults (``S`` = ``image_size``):

=======================  ====================================================================================
``resize``               ``size=S``, ``keep_aspect=False`` (True: the short side becomes ``size``),
                         ``interpolation="bilinear"`` (``nearest``, ``bilinear``, ``bicubic``); antialiased
``center_crop``          ``size=S`` (int or ``[h, w]``, px of the incoming image: 150 on a 250x250 LFW
                         deep-funneled image is the face)
``face_crop``            ``fraction=0.6``: centred square of ``fraction`` x the short side
``random_resized_crop``  ``size=S``, ``scale=[0.8, 1.0]``, ``ratio=[0.9, 1.1]``, ``interpolation="bilinear"``
                         (face-safe: torchvision's default scale 0.08 would cut faces to pieces)
``face_affine``          ``size=S``, ``fraction=0.6``, ``degrees=10``, ``scale=[0.8, 1.0]``, ``ratio=[0.9, 1.1]``,
                         ``flip=0.5``, ``interpolation="bilinear"``, ``fill=0``: the face square (as
                         ``face_crop``), then a random window of it (as ``random_resized_crop``), rotated and
                         mirrored, resampled once straight to ``size``
``random_crop``          ``padding=8``, ``size=None`` (= the incoming size: a random shift of up to ``padding`` px),
                         ``fill=0``, ``padding_mode="constant"`` (``edge``, ``reflect``, ``symmetric``)
``hflip``                ``p=0.5``
``rotate``               ``degrees=10`` (number d: uniform in [-d, d]; or ``[min, max]``), ``fill=0``,
                         ``interpolation="bilinear"``
``color_jitter``         ``brightness=0.2``, ``contrast=0.2``, ``saturation=0.2``, ``hue=0.0``, ``p=1.0``
``grayscale``            ``p=0.1`` (the result keeps 3 channels)
``auto_augment``         ``method="randaugment"`` (``num_ops=2``, ``magnitude=9``), ``"autoaugment"``
                         (``policy="imagenet"``, ``cifar10``, ``svhn``) or ``"trivialaugment"``; ``fill=0``
``square_pad``           ``fill=0``, ``padding_mode="constant"``: pads the short side to a centred square
``gaussian_blur``        ``kernel_size=5`` (odd), ``sigma=[0.1, 2.0]``, ``p=0.5``
``random_erasing``       ``p=0.25``, ``scale=[0.02, 0.2]``, ``ratio=[0.3, 3.3]``, ``value=0.0`` (tensor stage:
                         0 is the mean colour after normalisation)
``normalize``            ``mode=None`` (``"backbone"`` or ``"fixed"``; None: ``build_transform(normalization=)``)
``to_tensor``            no parameters; implicit (allowed in the list for readability, it has no effect)
=======================  ====================================================================================

``fill`` is a grey level 0..255 or ``[r, g, b]``. New steps join with :func:`register_step`.

Training batches::

    bt = BatchTransform(build_transform(steps, image_size=112, mean=mean, std=std), bad_image_policy="skip")
    dl = DataLoader(ds.with_transform(bt), batch_sampler=pk_sampler, collate_fn=collate_batch, num_workers=2)

``Dataset.__getitems__`` runs ``bt`` once per batch (in the worker), splits its output into rows, and
:func:`collate_batch` stacks them again: ``{"pixel_values", "labels", "valid", "bad"}``.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import numbers
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.utils.data
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from facenet_hf.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, BadImageError, load_image, to_rgb

__all__ = [
    "BAD_IMAGE_POLICIES",
    "DEFAULT_EVAL_STEPS",
    "DEFAULT_TRAIN_STEPS",
    "FIXED_MEAN",
    "FIXED_STD",
    "NORMALIZATION_MODES",
    "STEPS",
    "BatchTransform",
    "FaceTransform",
    "StepContext",
    "build_transform",
    "canonical_steps",
    "collate_batch",
    "register_step",
]

FIXED_MEAN: tuple[float, float, float] = (127.5 / 255,) * 3
"""FaceNet's fixed standardisation ``(x*255 - 127.5) / 128`` written as a mean/std on ``[0, 1]`` pixels."""
FIXED_STD: tuple[float, float, float] = (128 / 255,) * 3
NORMALIZATION_MODES = ("backbone", "fixed")
BAD_IMAGE_POLICIES = ("skip", "error")

# LFW deep-funneled images are 250x250 with the face centred, ~110-130 px across: the central 60% (150 px) is
# the face with a little margin. ``face_affine`` samples a window of 80-100% of that square's area (aspect
# 0.9-1.1, anywhere inside it), turned by up to 10 degrees and mirrored half the time, straight at the output
# size: the same augmentations as face_crop -> rotate -> random_resized_crop -> hflip in one resampling (a 10
# degree turn of the window stays inside a 250 px image, so no empty corner reaches the output).
DEFAULT_TRAIN_STEPS: list[dict[str, dict[str, Any]]] = [
    {"face_affine": {"fraction": 0.6, "degrees": 10, "scale": [0.8, 1.0], "ratio": [0.9, 1.1], "flip": 0.5}},
    {"color_jitter": {"brightness": 0.2, "contrast": 0.2, "saturation": 0.2, "hue": 0.0}},
]
DEFAULT_EVAL_STEPS: list[dict[str, dict[str, Any]]] = [
    {"face_crop": {"fraction": 0.6}},
    {"resize": {}},
]

_INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}
_PADDING_MODES = ("constant", "edge", "reflect", "symmetric")


@dataclass(frozen=True)
class StepContext:
    """What a step factory may use besides its own parameters."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    normalization: str = "backbone"


StepFactory = Callable[..., Callable[[Any], Any]]

STEPS: dict[str, StepFactory] = {}
"""Step name -> factory ``factory(ctx: StepContext, **params) -> callable``; ``factory.stage`` is ``"image"``
(PIL in, PIL out), ``"tensor"`` (normalised float tensor in and out) or ``"normalize"`` / ``"to_tensor"``."""

_STAGES = ("image", "tensor", "normalize", "to_tensor")


def register_step(name: str, *, stage: str = "image") -> Callable[[StepFactory], StepFactory]:
    """Decorator adding ``factory(ctx, *, param=default, ...)`` to :data:`STEPS` under ``name``."""
    if stage not in _STAGES:
        raise ValueError(f"stage must be one of {', '.join(_STAGES)}, got {stage!r}")

    def deco(factory: StepFactory) -> StepFactory:
        factory.stage = stage  # type: ignore[attr-defined]
        STEPS[name] = factory
        return factory

    return deco


# ---------------------------------------------------------------------------------------------------------
# parameter validation


class _ParamError(ValueError):
    """Internal: a bad parameter value (the caller adds the step name)."""


def _number(key: str, value: Any, *, lo: float | None = None, hi: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _ParamError(f"{key} must be a number, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise _ParamError(f"{key} must be in {bounds}, got {value!r}")
    return float(value)


def _int(key: str, value: Any, *, lo: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _ParamError(f"{key} must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise _ParamError(f"{key} must be >= {lo}, got {value!r}")
    return int(value)


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _ParamError(f"{key} must be true or false, got {value!r}")
    return value


def _pair(key: str, value: Any, *, lo: float | None = None, hi: float | None = None) -> tuple[float, float]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise _ParamError(f"{key} must be a pair [min, max], got {value!r}")
    a, b = (_number(key, v, lo=lo, hi=hi) for v in value)
    if a > b:
        raise _ParamError(f"{key} must be [min, max] with min <= max, got {list(value)!r}")
    return a, b


def _choice(key: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), choices, n=1)
        extra = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise _ParamError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}{extra}")
    return value


def _size(key: str, value: Any) -> int | list[int]:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != 2:
            raise _ParamError(f"{key} must be an int or [height, width], got {value!r}")
        return [_int(key, v, lo=1) for v in value]
    return _int(key, value, lo=1)


def _fill(key: str, value: Any) -> int | list[int]:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != 3:
            raise _ParamError(f"{key} must be a grey level 0..255 or [r, g, b], got {value!r}")
        return [int(_number(key, v, lo=0, hi=255)) for v in value]
    return int(_number(key, value, lo=0, hi=255))


def _scale_ratio(scale: Any, ratio: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    """A random crop's area range within (0, 1] and aspect range > 0."""
    sc = _pair("scale", scale, lo=0.0, hi=1.0)
    if sc[0] <= 0.0:
        raise _ParamError(f"scale must be within (0, 1], got {list(scale)!r}")
    rt = _pair("ratio", ratio, lo=0.0)
    if rt[0] <= 0.0:
        raise _ParamError(f"ratio must be positive, got {list(ratio)!r}")
    return sc, rt


def _interp(key: str, value: Any) -> v2.InterpolationMode:
    return _INTERPOLATIONS[_choice(key, value, tuple(_INTERPOLATIONS))]


def _maybe(p: float, transform: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return transform if p >= 1.0 else v2.RandomApply([transform], p=p)


# ---------------------------------------------------------------------------------------------------------
# custom image ops (PIL or uint8 tensor in, same type out; randomness from torch's global RNG)


class _FaceCrop(torch.nn.Module):
    """Centred square crop whose side is ``fraction`` x the short side."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction

    def forward(self, img: Any) -> Any:
        h, w = F.get_size(img)
        side = max(1, round(self.fraction * min(h, w)))
        return F.center_crop(img, [side, side])

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}"


class _RandomShift(torch.nn.Module):
    """Pad by ``padding`` px on each side, then crop ``size`` (default: the incoming size) at a random place."""

    def __init__(self, padding: int, size: int | list[int] | None, fill: Any, padding_mode: str) -> None:
        super().__init__()
        self.padding, self.size, self.fill, self.padding_mode = padding, size, fill, padding_mode

    def forward(self, img: Any) -> Any:
        h, w = F.get_size(img)
        if self.size is None:
            th, tw = h, w
        elif isinstance(self.size, int):
            th, tw = self.size, self.size
        else:
            th, tw = self.size
        p = self.padding
        # pad enough that a (th, tw) window fits, even when the image is smaller than the window
        pad_x, pad_y = max(p, (tw - w + 1) // 2 + p), max(p, (th - h + 1) // 2 + p)
        if pad_x or pad_y:
            img = F.pad(img, [pad_x, pad_y, pad_x, pad_y], fill=self.fill, padding_mode=self.padding_mode)
        ph, pw = h + 2 * pad_y, w + 2 * pad_x
        top = int(torch.randint(0, ph - th + 1, ()).item())
        left = int(torch.randint(0, pw - tw + 1, ()).item())
        return F.crop(img, top, left, th, tw)


class _SquarePad(torch.nn.Module):
    """Pad the short side so the image becomes a centred square."""

    def __init__(self, fill: Any, padding_mode: str) -> None:
        super().__init__()
        self.fill, self.padding_mode = fill, padding_mode

    def forward(self, img: Any) -> Any:
        h, w = F.get_size(img)
        if h == w:
            return img
        d = abs(h - w)
        a, b = d // 2, d - d // 2
        padding = [a, 0, b, 0] if h > w else [0, a, 0, b]
        return F.pad(img, padding, fill=self.fill, padding_mode=self.padding_mode)


class _FaceAffine(torch.nn.Module):
    """Random rotation, scale, aspect, shift and flip of the face square, sampled in one affine warp.

    The square is centred, ``fraction`` x the short side; a window of ``scale`` x its area and aspect
    ``ratio`` is placed at a uniform position inside it (as ``random_resized_crop`` does), turned by an angle
    uniform in ``degrees`` about its centre, mirrored with probability ``flip``, and resampled straight to
    ``size x size``: one pass over the output pixels instead of a full-image rotation, two crops and a resize.
    """

    def __init__(
        self,
        size: int,
        fraction: float,
        degrees: tuple[float, float],
        scale: tuple[float, float],
        ratio: tuple[float, float],
        flip: float,
        resample: Image.Resampling,
        fill: Any,
    ) -> None:
        super().__init__()
        self.size, self.fraction, self.degrees = size, fraction, degrees
        self.scale, self.ratio, self.flip, self.resample = scale, ratio, flip, resample
        self.fill = tuple(fill) if isinstance(fill, list) else (fill,) * 3
        self._log_ratio = (float(np.log(ratio[0])), float(np.log(ratio[1])))

    def coefficients(self, width: int, height: int, u: Sequence[float]) -> tuple[float, ...]:
        """PIL's inverse affine ``(a, b, c, d, e, f)`` for 6 uniform draws ``u`` in [0, 1)."""
        side = self.fraction * min(width, height)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        ratio = float(np.exp(self._log_ratio[0] + (self._log_ratio[1] - self._log_ratio[0]) * u[1]))
        w, h = side * float(np.sqrt(area * ratio)), side * float(np.sqrt(area / ratio))
        w, h = min(w, side), min(h, side)
        cx = width / 2 + (u[2] - 0.5) * (side - w)
        cy = height / 2 + (u[3] - 0.5) * (side - h)
        angle = np.deg2rad(self.degrees[0] + (self.degrees[1] - self.degrees[0]) * u[4])
        cos, sin = float(np.cos(angle)), float(np.sin(angle))
        sx = (-1.0 if u[5] < self.flip else 1.0) * w / self.size
        sy = h / self.size
        # source = centre + R(angle) @ diag(sx, sy) @ (output - size / 2), in continuous pixel coordinates
        a, b, d, e = cos * sx, -sin * sy, sin * sx, cos * sy
        half = self.size / 2
        return (a, b, cx - (a + b) * half, d, e, cy - (d + e) * half)

    def forward(self, img: Any) -> Any:
        is_tensor = isinstance(img, torch.Tensor)
        if is_tensor:
            img = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())
        u = torch.rand(6).tolist()
        data = self.coefficients(img.width, img.height, u)
        fill = self.fill if img.mode == "RGB" else self.fill[0]
        out = img.transform(
            (self.size, self.size), Image.Transform.AFFINE, data, resample=self.resample, fillcolor=fill
        )
        if is_tensor:
            return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()
        return out

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, fraction={self.fraction}, degrees={list(self.degrees)}, scale={list(self.scale)}, "
            f"ratio={list(self.ratio)}, flip={self.flip}"
        )


_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class _ColorJitter(torch.nn.Module):
    """Brightness, contrast and saturation jitter in random order, as ``v2.ColorJitter`` (same factors and
    formulas: blend with black, with the mean grey level, with the grey image; clamped after each), computed
    in one float32 array instead of three PIL round trips (about 4x faster at face sizes)."""

    def __init__(self, brightness: float, contrast: float, saturation: float) -> None:
        super().__init__()
        self.ranges = [(max(0.0, 1 - f), 1 + f) if f else None for f in (brightness, contrast, saturation)]

    def forward(self, img: Any) -> Any:
        is_tensor = isinstance(img, torch.Tensor)
        x = (img.permute(1, 2, 0).numpy() if is_tensor else np.asarray(img)).astype(np.float32)
        order = torch.randperm(3).tolist()
        draws = torch.rand(3).tolist()
        for op in order:
            bounds = self.ranges[op]
            if bounds is None:
                continue
            f = bounds[0] + (bounds[1] - bounds[0]) * draws[op]
            if op == 0:  # blend with black
                x *= f
            elif op == 1:  # blend with the mean grey level
                mean = float((x @ _GREY_WEIGHTS).mean())
                x *= f
                x += (1 - f) * mean
            else:  # blend with the grey image
                grey = x @ _GREY_WEIGHTS
                grey *= 1 - f
                x *= f
                x += grey[..., None]
            np.clip(x, 0, 255, out=x)
        out = np.rint(x).astype(np.uint8)
        if is_tensor:
            return torch.from_numpy(out).permute(2, 0, 1).contiguous()
        return Image.fromarray(out, "RGB")

    def extra_repr(self) -> str:
        return f"brightness/contrast/saturation ranges={self.ranges}"


class _EnsureSize(torch.nn.Module):
    """Exact bilinear resize to ``size x size`` when (and only when) the image has another size."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, img: Any) -> Any:
        if list(F.get_size(img)) == [self.size, self.size]:
            return img
        return F.resize(
            img, [self.size, self.size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True
        )

    def extra_repr(self) -> str:
        return f"size={self.size}"


class _ToNormalizedTensor(torch.nn.Module):
    """PIL RGB / uint8 CHW tensor -> float32 CHW ``(x/255 - mean) / std`` in one pass over the data."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.register_buffer("_shift", torch.tensor(self.mean).view(-1, 1, 1) * 255.0, persistent=False)
        self.register_buffer(
            "_scale", 1.0 / (torch.tensor(self.std).view(-1, 1, 1) * 255.0), persistent=False
        )

    def forward(self, img: Any) -> torch.Tensor:
        if isinstance(img, Image.Image):
            # HWC uint8 -> contiguous CHW uint8 -> float: about 2x faster than F.pil_to_tensor + a float permute
            x = torch.from_numpy(np.array(img.convert("RGB") if img.mode != "RGB" else img))
            x = x.permute(2, 0, 1).contiguous()
        elif isinstance(img, torch.Tensor):
            x = img.contiguous()
        else:
            raise TypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")
        was_float = x.is_floating_point()
        x = x.to(torch.float32)
        if was_float:  # a float image is in [0, 1]
            x = x * 255.0
        return x.sub_(self._shift).mul_(self._scale)

    def normalize_batch(self, hwc: np.ndarray, channels_last: bool) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]``, as ``forward`` on each image, in two batched passes;
        ``channels_last``: keep the NHWC memory (what a channels_last model takes) instead of copying to NCHW."""
        x = torch.from_numpy(hwc).permute(0, 3, 1, 2)
        x = (
            x.to(torch.float32)
            if channels_last
            else x.to(torch.float32, memory_format=torch.contiguous_format)
        )
        return x.sub_(self._shift).mul_(self._scale)

    def extra_repr(self) -> str:
        return f"mean={list(self.mean)}, std={list(self.std)}"


# ---------------------------------------------------------------------------------------------------------
# the steps


@register_step("resize")
def _resize(
    ctx: StepContext, *, size: Any = None, keep_aspect: Any = False, interpolation: Any = "bilinear"
) -> Callable[[Any], Any]:
    s = _int("size", ctx.image_size if size is None else size, lo=1)
    target: int | list[int] = s if _bool("keep_aspect", keep_aspect) else [s, s]
    return v2.Resize(target, interpolation=_interp("interpolation", interpolation), antialias=True)


@register_step("center_crop")
def _center_crop(ctx: StepContext, *, size: Any = None) -> Callable[[Any], Any]:
    return v2.CenterCrop(_size("size", ctx.image_size if size is None else size))


@register_step("face_crop")
def _face_crop(ctx: StepContext, *, fraction: Any = 0.6) -> Callable[[Any], Any]:
    f = _number("fraction", fraction, lo=0.0, hi=1.0)
    if f <= 0.0:
        raise _ParamError(f"fraction must be in (0, 1], got {fraction!r}")
    return _FaceCrop(f)


@register_step("random_resized_crop")
def _random_resized_crop(
    ctx: StepContext,
    *,
    size: Any = None,
    scale: Any = (0.8, 1.0),
    ratio: Any = (0.9, 1.1),
    interpolation: Any = "bilinear",
) -> Callable[[Any], Any]:
    sc, rt = _scale_ratio(scale, ratio)
    return v2.RandomResizedCrop(
        _size("size", ctx.image_size if size is None else size),
        scale=sc,
        ratio=rt,
        interpolation=_interp("interpolation", interpolation),
        antialias=True,
    )


@register_step("random_crop")
def _random_crop(
    ctx: StepContext, *, padding: Any = 8, size: Any = None, fill: Any = 0, padding_mode: Any = "constant"
) -> Callable[[Any], Any]:
    return _RandomShift(
        _int("padding", padding, lo=0),
        None if size is None else _size("size", size),
        _fill("fill", fill),
        _choice("padding_mode", padding_mode, _PADDING_MODES),
    )


@register_step("hflip")
def _hflip(ctx: StepContext, *, p: Any = 0.5) -> Callable[[Any], Any]:
    return v2.RandomHorizontalFlip(p=_number("p", p, lo=0.0, hi=1.0))


@register_step("rotate")
def _rotate(
    ctx: StepContext, *, degrees: Any = 10, fill: Any = 0, interpolation: Any = "bilinear"
) -> Callable[[Any], Any]:
    if isinstance(degrees, Sequence) and not isinstance(degrees, (str, bytes)):
        deg: Any = list(_pair("degrees", degrees, lo=-180.0, hi=180.0))
    else:
        deg = _number("degrees", degrees, lo=0.0, hi=180.0)
    return v2.RandomRotation(
        deg, interpolation=_interp("interpolation", interpolation), fill=_fill("fill", fill)
    )


@register_step("face_affine")
def _face_affine(
    ctx: StepContext,
    *,
    size: Any = None,
    fraction: Any = 0.6,
    degrees: Any = 10,
    scale: Any = (0.8, 1.0),
    ratio: Any = (0.9, 1.1),
    flip: Any = 0.5,
    interpolation: Any = "bilinear",
    fill: Any = 0,
) -> Callable[[Any], Any]:
    f = _number("fraction", fraction, lo=0.0, hi=1.0)
    if f <= 0.0:
        raise _ParamError(f"fraction must be in (0, 1], got {fraction!r}")
    if isinstance(degrees, Sequence) and not isinstance(degrees, (str, bytes)):
        deg = _pair("degrees", degrees, lo=-180.0, hi=180.0)
    else:
        d = _number("degrees", degrees, lo=0.0, hi=180.0)
        deg = (-d, d)
    sc, rt = _scale_ratio(scale, ratio)
    resample = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }[_choice("interpolation", interpolation, tuple(_INTERPOLATIONS))]
    return _FaceAffine(
        _int("size", ctx.image_size if size is None else size, lo=1),
        f,
        deg,
        sc,
        rt,
        _number("flip", flip, lo=0.0, hi=1.0),
        resample,
        _fill("fill", fill),
    )


@register_step("color_jitter")
def _color_jitter(
    ctx: StepContext,
    *,
    brightness: Any = 0.2,
    contrast: Any = 0.2,
    saturation: Any = 0.2,
    hue: Any = 0.0,
    p: Any = 1.0,
) -> Callable[[Any], Any]:
    b = _number("brightness", brightness, lo=0.0)
    c = _number("contrast", contrast, lo=0.0)
    s = _number("saturation", saturation, lo=0.0)
    h = _number("hue", hue, lo=0.0, hi=0.5)
    if h:  # hue needs an HSV round trip: torchvision's implementation
        jitter: Callable[[Any], Any] = v2.ColorJitter(
            brightness=b or None, contrast=c or None, saturation=s or None, hue=h
        )
    else:
        jitter = _ColorJitter(b, c, s)
    return _maybe(_number("p", p, lo=0.0, hi=1.0), jitter)


@register_step("grayscale")
def _grayscale(ctx: StepContext, *, p: Any = 0.1) -> Callable[[Any], Any]:
    return v2.RandomGrayscale(p=_number("p", p, lo=0.0, hi=1.0))


_AUTO_AUGMENT_PARAMS: dict[str, tuple[str, ...]] = {
    "randaugment": ("num_ops", "magnitude"),
    "autoaugment": ("policy",),
    "trivialaugment": (),
}


@register_step("auto_augment")
def _auto_augment(
    ctx: StepContext,
    *,
    method: Any = "randaugment",
    policy: Any = None,
    num_ops: Any = None,
    magnitude: Any = None,
    fill: Any = 0,
) -> Callable[[Any], Any]:
    method = _choice("method", method, tuple(_AUTO_AUGMENT_PARAMS))
    given = {"policy": policy, "num_ops": num_ops, "magnitude": magnitude}
    given = {k: v for k, v in given.items() if v is not None}
    allowed = _AUTO_AUGMENT_PARAMS[method]
    for key in given:
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise _ParamError(f"{key} does not apply to method={method!r} (its parameters: {valid})")
    fill_value = _fill("fill", fill)
    if method == "randaugment":
        return v2.RandAugment(
            num_ops=_int("num_ops", given.get("num_ops", 2), lo=1),
            magnitude=min(_int("magnitude", given.get("magnitude", 9), lo=0), 30),
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=fill_value,
        )
    if method == "autoaugment":
        pol = _choice("policy", given.get("policy", "imagenet"), [p.value for p in v2.AutoAugmentPolicy])
        return v2.AutoAugment(
            v2.AutoAugmentPolicy(pol), interpolation=v2.InterpolationMode.BILINEAR, fill=fill_value
        )
    return v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR, fill=fill_value)


@register_step("square_pad")
def _square_pad(ctx: StepContext, *, fill: Any = 0, padding_mode: Any = "constant") -> Callable[[Any], Any]:
    return _SquarePad(_fill("fill", fill), _choice("padding_mode", padding_mode, _PADDING_MODES))


@register_step("gaussian_blur")
def _gaussian_blur(
    ctx: StepContext, *, kernel_size: Any = 5, sigma: Any = (0.1, 2.0), p: Any = 0.5
) -> Callable[[Any], Any]:
    k = _int("kernel_size", kernel_size, lo=1)
    if k % 2 == 0:
        raise _ParamError(f"kernel_size must be odd, got {k}")
    if isinstance(sigma, Sequence) and not isinstance(sigma, (str, bytes)):
        sig: Any = _pair("sigma", sigma, lo=0.0)
    else:
        sig = _number("sigma", sigma, lo=0.0)
    if (min(sig) if isinstance(sig, tuple) else sig) <= 0:
        raise _ParamError(f"sigma must be > 0, got {sigma!r}")
    return _maybe(_number("p", p, lo=0.0, hi=1.0), v2.GaussianBlur(k, sigma=sig))


@register_step("random_erasing", stage="tensor")
def _random_erasing(
    ctx: StepContext, *, p: Any = 0.25, scale: Any = (0.02, 0.2), ratio: Any = (0.3, 3.3), value: Any = 0.0
) -> Callable[[Any], Any]:
    sc = _pair("scale", scale, lo=0.0, hi=1.0)
    rt = _pair("ratio", ratio, lo=0.0)
    if sc[0] <= 0 or rt[0] <= 0:
        raise _ParamError(
            f"scale and ratio must be positive, got scale={list(scale)!r}, ratio={list(ratio)!r}"
        )
    return v2.RandomErasing(
        p=_number("p", p, lo=0.0, hi=1.0), scale=sc, ratio=rt, value=_number("value", value)
    )


@register_step("normalize", stage="normalize")
def _normalize(ctx: StepContext, *, mode: Any = None) -> Callable[[Any], Any]:
    m = _choice("mode", ctx.normalization if mode is None else mode, NORMALIZATION_MODES)
    if m == "fixed":
        return _ToNormalizedTensor(FIXED_MEAN, FIXED_STD)
    return _ToNormalizedTensor(ctx.mean, ctx.std)


@register_step("to_tensor", stage="to_tensor")
def _to_tensor(ctx: StepContext) -> Callable[[Any], Any]:
    return torch.nn.Identity()  # never used: the implicit to_tensor is part of normalize


# ---------------------------------------------------------------------------------------------------------
# parsing and building


def _parse(spec: Any, index: int) -> tuple[str, dict[str, Any]]:
    """One step spec -> (name, params); checks the form and the name (not the parameters)."""
    if isinstance(spec, str):
        name, params = spec, {}
    elif isinstance(spec, Mapping):
        if "name" in spec:
            name = spec["name"]
            params = {k: v for k, v in spec.items() if k != "name"}
        elif len(spec) == 1:
            ((name, params),) = spec.items()
            if params is None:
                params = {}
            if not isinstance(params, Mapping):
                raise ValueError(
                    f"preprocessing steps[{index}] {name!r}: parameters must be a mapping "
                    f"{{param: value}}, got {params!r}"
                )
            params = dict(params)
        else:
            raise ValueError(
                f"preprocessing steps[{index}]: a mapping step must have one key (the step name) or a 'name' key, "
                f"got keys {list(spec)}; e.g. {{'random_resized_crop': {{'scale': [0.8, 1.0]}}}}"
            )
    else:
        raise ValueError(
            f"preprocessing steps[{index}]: expected a step name or a mapping {{name: {{param: value}}}}, "
            f"got {spec!r} ({type(spec).__name__})"
        )
    if not isinstance(name, str) or name not in STEPS:
        hint = difflib.get_close_matches(str(name), list(STEPS), n=1)
        extra = f"; did you mean {hint[0]!r}?" if hint else ""
        raise ValueError(
            f"preprocessing steps[{index}]: unknown step {name!r}{extra} (valid steps: {', '.join(sorted(STEPS))})"
        )
    for key in params:
        _check_key(name, index, key)
    return name, params


def _param_names(name: str) -> list[str]:
    sig = inspect.signature(STEPS[name])
    return [p.name for p in list(sig.parameters.values())[1:] if p.kind is inspect.Parameter.KEYWORD_ONLY]


def _check_key(name: str, index: int, key: Any) -> None:
    valid = _param_names(name)
    if key in valid:
        return
    hint = difflib.get_close_matches(str(key), valid, n=1)
    extra = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(
        f"preprocessing steps[{index}] {name!r}: unknown parameter {key!r}{extra} "
        f"(valid parameters: {', '.join(valid) or 'none'})"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return copy.deepcopy(value)


def canonical_steps(steps: Sequence[Any]) -> list[dict[str, dict[str, Any]]]:
    """Any accepted step forms -> ``[{name: {param: value}}, ...]`` (lists, not tuples; input not modified).

    Checks the step names and parameter names (``ValueError`` naming the step and the valid names); parameter
    values are checked by :func:`build_transform`.
    """
    if isinstance(steps, (str, Mapping)) or not isinstance(steps, Sequence):
        raise ValueError(f"preprocessing steps must be a list of step specs, got {steps!r}")
    return [{name: _jsonable(params)} for name, params in (_parse(s, i) for i, s in enumerate(steps))]


class FaceTransform:
    """The built pipeline: ``PIL image -> float32 tensor [3, image_size, image_size]`` (see module docs)."""

    def __init__(
        self,
        image_ops: Sequence[Callable[[Any], Any]],
        to_tensor: Callable[[Any], torch.Tensor],
        tensor_ops: Sequence[Callable[[torch.Tensor], torch.Tensor]],
        *,
        image_size: int,
        steps: list[dict[str, dict[str, Any]]],
    ) -> None:
        self.image_ops = list(image_ops)
        self.to_tensor = to_tensor
        self.tensor_ops = list(tensor_ops)
        self.image_size = image_size
        self.steps = steps

    def __call__(self, img: Any) -> torch.Tensor:
        """Transform one RGB image (PIL, or a uint8 CHW tensor)."""
        x = self.to_tensor(self.prepare(img))
        for op in self.tensor_ops:
            x = op(x)
        return x

    def prepare(self, img: Any) -> Any:
        """The image steps alone: the image at ``image_size`` before the tensor conversion."""
        if isinstance(img, Image.Image) and img.mode != "RGB":
            img = to_rgb(img)
        for op in self.image_ops:
            img = op(img)
        return img

    @property
    def batchable(self) -> bool:
        """Whether the tensor conversion can run once per batch (:class:`BatchTransform` does it then)."""
        return not self.tensor_ops and isinstance(self.to_tensor, _ToNormalizedTensor)

    def __repr__(self) -> str:
        parts = [*map(repr, self.image_ops), repr(self.to_tensor), *map(repr, self.tensor_ops)]
        body = "".join(f"\n  {p}" for p in parts)
        return f"FaceTransform(image_size={self.image_size}, ops=[{body}\n])"


def _check_stats(key: str, values: Any) -> tuple[float, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) not in (1, 3):
        raise ValueError(f"{key} must be 3 numbers (one per RGB channel), got {values!r}")
    out = tuple(float(v) for v in values)
    if key == "std" and min(out) <= 0:
        raise ValueError(f"std must be positive, got {list(values)!r}")
    return out * 3 if len(out) == 1 else out


def build_transform(
    steps: Sequence[Any],
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    normalization: str = "backbone",
) -> FaceTransform:
    """Build the pipeline ``PIL image -> float32 [3, image_size, image_size]`` from step specs.

    Image steps run in the given order, then (if needed) an exact resize to ``image_size``, then to_tensor +
    normalize, then tensor steps (``random_erasing``). Without a ``normalize`` step, ``normalization``
    (``"backbone"``: ``mean``/``std``; ``"fixed"``: ``(x*255 - 127.5) / 128``) is applied. ``ValueError`` names
    the step, the bad parameter or value and what is valid.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, numbers.Integral) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    _choice_or_value_error("normalization", normalization, NORMALIZATION_MODES)
    ctx = StepContext(int(image_size), _check_stats("mean", mean), _check_stats("std", std), normalization)
    canonical = canonical_steps(steps)
    image_ops: list[Callable[[Any], Any]] = []
    tensor_ops: list[Callable[[Any], Any]] = []
    to_tensor: Callable[[Any], Any] | None = None
    for index, spec in enumerate(canonical):
        ((name, params),) = spec.items()
        factory = STEPS[name]
        try:
            op = factory(ctx, **copy.deepcopy(params))
        except (_ParamError, ValueError, TypeError) as exc:
            raise ValueError(f"preprocessing steps[{index}] {name!r}: {exc}") from None
        stage = getattr(factory, "stage", "image")
        if stage == "normalize":
            if to_tensor is not None:
                raise ValueError(f"preprocessing steps[{index}] 'normalize': normalize is given twice")
            to_tensor = op
        elif stage == "tensor":
            tensor_ops.append(op)
        elif stage == "image":
            image_ops.append(op)
    image_ops.append(_EnsureSize(ctx.image_size))
    if to_tensor is None:
        to_tensor = _normalize(ctx)
    return FaceTransform(image_ops, to_tensor, tensor_ops, image_size=ctx.image_size, steps=canonical)


def _choice_or_value_error(key: str, value: Any, choices: Sequence[str]) -> str:
    try:
        return _choice(key, value, choices)
    except _ParamError as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------------------------------------------------
# batches


class BatchTransform:
    """``Dataset.with_transform`` callable: a batch (dict of lists) -> model inputs, bad images handled.

    Returns ``{"pixel_values": float32 [B, 3, H, W], "labels": int64 [B], "valid": bool [B], "bad": list}``.
    Every value is row-aligned (``datasets`` splits the result into rows for ``ds[i]`` and ``__getitems__``), so
    here ``bad[i]`` is ``(path, reason)`` for a bad row and None for a good one; :func:`collate_batch` (the
    DataLoader ``collate_fn``) re-stacks the rows and keeps only the failures: ``bad: list[(path, reason)]``.

    ``bad_image_policy="error"`` raises :class:`BadImageError` (path + reason); ``"skip"`` puts a zero image
    with ``valid=False`` in the bad row (batch shapes stay P x K; the training loop drops invalid rows from the
    loss) and appends ``(path, reason)`` to ``self.bad``. With DataLoader worker processes ``self.bad`` fills in
    the workers' copies, so collect the failures from each batch's ``"bad"`` instead.
    ``label_key=None`` gives labels -1 (unlabelled data). With a :class:`FaceTransform` ending in ``normalize``
    (every built pipeline without tensor steps) the images are converted and normalised once per batch;
    ``channels_last=True`` then returns ``pixel_values`` in channels_last memory (what a channels_last model
    takes, without the copy it would otherwise make).

    ``seed``: None draws the augmentations from torch's global RNG (seeded per worker by the DataLoader). An int
    seeds each batch's augmentations from ``(seed, epoch, the batch's image paths)`` (see :meth:`set_epoch`): the same batch is augmented the
    same way whichever process or worker builds it and however much of the global RNG the training loop has
    consumed, so a resumed run sees exactly the images an uninterrupted one would; the global RNG is untouched.
    """

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        bad_image_policy: str = "skip",
        image_key: str = "image",
        label_key: str | None = "label",
        image_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_size: int = DEFAULT_MIN_SIZE,
        seed: int | None = None,
        channels_last: bool = False,
    ) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        self.transform = transform
        self.bad_image_policy = _choice_or_value_error(
            "bad_image_policy", bad_image_policy, BAD_IMAGE_POLICIES
        )
        self.image_key = image_key
        self.label_key = label_key
        self.image_size = image_size if image_size is not None else getattr(transform, "image_size", None)
        self.max_pixels = max_pixels
        self.min_size = min_size
        self.channels_last = bool(channels_last)
        self.bad: list[tuple[str, str]] = []
        self.seed = None if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Vary the seeded augmentations per epoch (workers see it if they are not persistent)."""
        self.epoch = int(epoch)

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        if self.seed is None:
            return self._apply(batch)
        key = zlib.crc32("\n".join(_identify(obj) for obj in self._column(batch, self.image_key)).encode())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 4_294_967_311 + key) % 2**63)
            return self._apply(batch)

    def _apply(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        images = self._column(batch, self.image_key)
        if self.label_key is None:
            labels = torch.full((len(images),), -1, dtype=torch.int64)
        else:
            labels = torch.as_tensor(list(self._column(batch, self.label_key)), dtype=torch.int64)
        tf = self.transform
        batched = getattr(tf, "batchable", False)  # the tensor conversion runs once for the batch
        rows: list[Any] = []  # per row: the prepared image (batched) or the tensor; None for a bad image
        bad: list[tuple[str, str] | None] = []
        for obj in images:
            try:
                img = load_image(obj, max_pixels=self.max_pixels, min_size=self.min_size)
            except BadImageError as exc:
                if self.bad_image_policy == "error":
                    raise
                failure = (exc.source, exc.reason)
                self.bad.append(failure)
                rows.append(None)
                bad.append(failure)
                continue
            rows.append(tf.prepare(img) if batched else tf(img))
            bad.append(None)
        return {
            "pixel_values": self._batch_pixels(rows) if batched else self._stack(rows),
            "labels": labels,
            "valid": torch.tensor([x is not None for x in rows], dtype=torch.bool),
            "bad": bad,
        }

    def _batch_pixels(self, rows: list[Any]) -> torch.Tensor:
        """Prepared images -> one uint8 NHWC array -> normalised float32 in two batched passes (instead of a
        conversion per image and a stack); bad rows are zeros."""
        tf = self.transform
        size = tf.image_size
        hwc = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
        loose: dict[int, torch.Tensor] = {}  # anything but an RGB uint8 image of the output size: one by one
        for i, img in enumerate(rows):
            if img is None:
                continue
            arr = _hwc_uint8(img, size)
            if arr is None:
                loose[i] = tf.to_tensor(img)
            else:
                hwc[i] = arr
        x = tf.to_tensor.normalize_batch(hwc, self.channels_last)
        for i, t in loose.items():
            x[i] = t
        for i, img in enumerate(rows):
            if img is None:
                x[i] = 0.0
        return x

    def _stack(self, pixels: list[torch.Tensor | None]) -> torch.Tensor:
        template = next((x for x in pixels if x is not None), None)
        if template is None:
            if self.image_size is None:
                raise ValueError(
                    f"all {len(pixels)} images of the batch are bad and the output size is unknown: "
                    "pass image_size= to BatchTransform"
                )
            template = torch.zeros(3, self.image_size, self.image_size)
        zeros = torch.zeros_like(template)
        x = torch.stack([zeros if x is None else x for x in pixels]) if pixels else zeros.unsqueeze(0)[:0]
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    @staticmethod
    def _column(batch: Mapping[str, Sequence[Any]], key: str) -> Sequence[Any]:
        if key not in batch:
            raise KeyError(f"batch has no column {key!r}; columns: {', '.join(map(str, batch))}")
        return batch[key]

    def __repr__(self) -> str:
        return (
            f"BatchTransform(policy={self.bad_image_policy!r}, image_key={self.image_key!r}, "
            f"label_key={self.label_key!r}, seed={self.seed!r}, transform={self.transform!r})"
        )


def _hwc_uint8(img: Any, size: int) -> np.ndarray | None:
    """An RGB image of ``size x size`` as a uint8 ``[H, W, 3]`` array, or None when it is anything else."""
    if isinstance(img, Image.Image):
        return np.asarray(img) if img.mode == "RGB" and img.size == (size, size) else None
    if isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and tuple(img.shape) == (3, size, size):
        return img.permute(1, 2, 0).numpy()
    return None


def _identify(obj: Any) -> str:
    """A cheap stable identity for an image row: its path, else a checksum of its bytes."""
    if isinstance(obj, dict):
        if obj.get("path"):
            return str(obj["path"])
        data = obj.get("bytes")
        return f"crc:{zlib.crc32(data)}" if data else ""
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    if isinstance(obj, (bytes, bytearray)):
        return f"crc:{zlib.crc32(obj)}"
    return str(id(obj))


def _restack(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)``, without the copy when the rows are, in order, the consecutive rows of one dense
    tensor (what ``Dataset.__getitems__`` makes of a batch transform's output: ``[t[0], t[1], ...]``), in NCHW or
    channels_last memory. Decided from the storage, not ``Tensor._base``, which inference mode does not set."""
    first = rows[0]
    n, size = len(rows), first.numel() * first.element_size()
    storage = first.untyped_storage().data_ptr()
    if all(
        isinstance(r, torch.Tensor)
        and r.dtype == first.dtype
        and r.device == first.device
        and r.shape == first.shape
        and r.stride() == first.stride()
        and r.untyped_storage().data_ptr() == storage
        and r.data_ptr() == first.data_ptr() + i * size
        for i, r in enumerate(rows)
    ):
        batch = first.as_strided((n, *first.shape), (first.numel(), *first.stride()), first.storage_offset())
        dense = batch.is_contiguous() or (
            batch.dim() == 4 and batch.is_contiguous(memory_format=torch.channels_last)
        )
        if (
            dense
            and batch.untyped_storage().nbytes() >= first.storage_offset() * first.element_size() + n * size
        ):
            return batch
    return torch.stack(list(rows))


def collate_batch(items: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for ``ds.with_transform(BatchTransform(...))``.

    ``items`` is the list of per-row dicts that ``Dataset.__getitems__`` makes of one transformed batch (or an
    already batched dict). Returns ``pixel_values [B,3,H,W]``, ``labels [B]``, ``valid [B]`` and ``bad``: the
    list of ``(path, reason)`` of the bad rows (always present, empty when none); other keys are stacked when
    tensors, else kept as lists.
    """
    if isinstance(items, Mapping):
        out = dict(items)
        out["bad"] = [b for b in out.get("bad", []) if b is not None]
        return out
    if not items:
        raise ValueError("collate_batch got an empty list of rows")
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "bad":
            out[key] = [tuple(v) for v in values if v is not None]
        elif isinstance(values[0], torch.Tensor):
            out[key] = _restack(values)
        else:
            out[key] = values
    out.setdefault("bad", [])
    return out

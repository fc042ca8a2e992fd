"""The built-in named steps: each factory turns its parameters (checked) into an operation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2

from facenet_hf.constants import FIXED_MEAN, FIXED_STD, NORMALIZATION_MODES
from facenet_hf.data.transforms.checks import (
    INTERPOLATIONS,
    PADDING_MODES,
    ParamError,
    boolean,
    choice,
    fill_param,
    integer,
    interp_mode,
    maybe,
    number,
    pair,
    scale_ratio,
    size_param,
)
from facenet_hf.data.transforms.ops import (
    ColorJitter,
    FaceAffine,
    FaceCrop,
    RandomShift,
    SquarePad,
    ToNormalizedTensor,
)
from facenet_hf.data.transforms.registry import StepContext, register_step


@register_step("resize")
def _resize(
    ctx: StepContext, *, size: Any = None, keep_aspect: Any = False, interpolation: Any = "bilinear"
) -> Callable[[Any], Any]:
    s = integer("size", ctx.image_size if size is None else size, lo=1)
    target: int | list[int] = s if boolean("keep_aspect", keep_aspect) else [s, s]
    return v2.Resize(target, interpolation=interp_mode("interpolation", interpolation), antialias=True)


@register_step("center_crop")
def _center_crop(ctx: StepContext, *, size: Any = None) -> Callable[[Any], Any]:
    return v2.CenterCrop(size_param("size", ctx.image_size if size is None else size))


@register_step("face_crop")
def _face_crop(ctx: StepContext, *, fraction: Any = 0.6) -> Callable[[Any], Any]:
    f = number("fraction", fraction, lo=0.0, hi=1.0)
    if f <= 0.0:
        raise ParamError(f"fraction must be in (0, 1], got {fraction!r}")
    return FaceCrop(f)


@register_step("random_resized_crop")
def _random_resized_crop(
    ctx: StepContext,
    *,
    size: Any = None,
    scale: Any = (0.8, 1.0),
    ratio: Any = (0.9, 1.1),
    interpolation: Any = "bilinear",
) -> Callable[[Any], Any]:
    sc, rt = scale_ratio(scale, ratio)
    return v2.RandomResizedCrop(
        size_param("size", ctx.image_size if size is None else size),
        scale=sc,
        ratio=rt,
        interpolation=interp_mode("interpolation", interpolation),
        antialias=True,
    )


@register_step("random_crop")
def _random_crop(
    ctx: StepContext, *, padding: Any = 8, size: Any = None, fill: Any = 0, padding_mode: Any = "constant"
) -> Callable[[Any], Any]:
    return RandomShift(
        integer("padding", padding, lo=0),
        None if size is None else size_param("size", size),
        fill_param("fill", fill),
        choice("padding_mode", padding_mode, PADDING_MODES),
    )


@register_step("hflip")
def _hflip(ctx: StepContext, *, p: Any = 0.5) -> Callable[[Any], Any]:
    return v2.RandomHorizontalFlip(p=number("p", p, lo=0.0, hi=1.0))


@register_step("rotate")
def _rotate(
    ctx: StepContext, *, degrees: Any = 10, fill: Any = 0, interpolation: Any = "bilinear"
) -> Callable[[Any], Any]:
    if isinstance(degrees, Sequence) and not isinstance(degrees, (str, bytes)):
        deg: Any = list(pair("degrees", degrees, lo=-180.0, hi=180.0))
    else:
        deg = number("degrees", degrees, lo=0.0, hi=180.0)
    return v2.RandomRotation(
        deg, interpolation=interp_mode("interpolation", interpolation), fill=fill_param("fill", fill)
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
    f = number("fraction", fraction, lo=0.0, hi=1.0)
    if f <= 0.0:
        raise ParamError(f"fraction must be in (0, 1], got {fraction!r}")
    if isinstance(degrees, Sequence) and not isinstance(degrees, (str, bytes)):
        deg = pair("degrees", degrees, lo=-180.0, hi=180.0)
    else:
        d = number("degrees", degrees, lo=0.0, hi=180.0)
        deg = (-d, d)
    sc, rt = scale_ratio(scale, ratio)
    resample = {
        "nearest": Image.Resampling.NEAREST,
        "bilinear": Image.Resampling.BILINEAR,
        "bicubic": Image.Resampling.BICUBIC,
    }[choice("interpolation", interpolation, tuple(INTERPOLATIONS))]
    return FaceAffine(
        integer("size", ctx.image_size if size is None else size, lo=1),
        f,
        deg,
        sc,
        rt,
        number("flip", flip, lo=0.0, hi=1.0),
        resample,
        fill_param("fill", fill),
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
    b = number("brightness", brightness, lo=0.0)
    c = number("contrast", contrast, lo=0.0)
    s = number("saturation", saturation, lo=0.0)
    h = number("hue", hue, lo=0.0, hi=0.5)
    if h:  # hue needs an HSV round trip: torchvision's implementation
        jitter: Callable[[Any], Any] = v2.ColorJitter(
            brightness=b or None, contrast=c or None, saturation=s or None, hue=h
        )
    else:
        jitter = ColorJitter(b, c, s)
    return maybe(number("p", p, lo=0.0, hi=1.0), jitter)


@register_step("grayscale")
def _grayscale(ctx: StepContext, *, p: Any = 0.1) -> Callable[[Any], Any]:
    return v2.RandomGrayscale(p=number("p", p, lo=0.0, hi=1.0))


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
    method = choice("method", method, tuple(_AUTO_AUGMENT_PARAMS))
    given = {"policy": policy, "num_ops": num_ops, "magnitude": magnitude}
    given = {k: v for k, v in given.items() if v is not None}
    allowed = _AUTO_AUGMENT_PARAMS[method]
    for key in given:
        if key not in allowed:
            valid = ", ".join(sorted(allowed)) or "none"
            raise ParamError(f"{key} does not apply to method={method!r} (its parameters: {valid})")
    fill_value = fill_param("fill", fill)
    if method == "randaugment":
        return v2.RandAugment(
            num_ops=integer("num_ops", given.get("num_ops", 2), lo=1),
            magnitude=min(integer("magnitude", given.get("magnitude", 9), lo=0), 30),
            interpolation=v2.InterpolationMode.BILINEAR,
            fill=fill_value,
        )
    if method == "autoaugment":
        pol = choice("policy", given.get("policy", "imagenet"), [p.value for p in v2.AutoAugmentPolicy])
        return v2.AutoAugment(
            v2.AutoAugmentPolicy(pol), interpolation=v2.InterpolationMode.BILINEAR, fill=fill_value
        )
    return v2.TrivialAugmentWide(interpolation=v2.InterpolationMode.BILINEAR, fill=fill_value)


@register_step("square_pad")
def _square_pad(ctx: StepContext, *, fill: Any = 0, padding_mode: Any = "constant") -> Callable[[Any], Any]:
    return SquarePad(fill_param("fill", fill), choice("padding_mode", padding_mode, PADDING_MODES))


@register_step("gaussian_blur")
def _gaussian_blur(
    ctx: StepContext, *, kernel_size: Any = 5, sigma: Any = (0.1, 2.0), p: Any = 0.5
) -> Callable[[Any], Any]:
    k = integer("kernel_size", kernel_size, lo=1)
    if k % 2 == 0:
        raise ParamError(f"kernel_size must be odd, got {k}")
    if isinstance(sigma, Sequence) and not isinstance(sigma, (str, bytes)):
        sig: Any = pair("sigma", sigma, lo=0.0)
    else:
        sig = number("sigma", sigma, lo=0.0)
    if (min(sig) if isinstance(sig, tuple) else sig) <= 0:
        raise ParamError(f"sigma must be > 0, got {sigma!r}")
    return maybe(number("p", p, lo=0.0, hi=1.0), v2.GaussianBlur(k, sigma=sig))


@register_step("random_erasing", stage="tensor")
def _random_erasing(
    ctx: StepContext, *, p: Any = 0.25, scale: Any = (0.02, 0.2), ratio: Any = (0.3, 3.3), value: Any = 0.0
) -> Callable[[Any], Any]:
    sc = pair("scale", scale, lo=0.0, hi=1.0)
    rt = pair("ratio", ratio, lo=0.0)
    if sc[0] <= 0 or rt[0] <= 0:
        raise ParamError(
            f"scale and ratio must be positive, got scale={list(scale)!r}, ratio={list(ratio)!r}"
        )
    return v2.RandomErasing(
        p=number("p", p, lo=0.0, hi=1.0), scale=sc, ratio=rt, value=number("value", value)
    )


@register_step("normalize", stage="normalize")
def _normalize(ctx: StepContext, *, mode: Any = None) -> Callable[[Any], Any]:
    m = choice("mode", ctx.normalization if mode is None else mode, NORMALIZATION_MODES)
    if m == "fixed":
        return ToNormalizedTensor(FIXED_MEAN, FIXED_STD)
    return ToNormalizedTensor(ctx.mean, ctx.std)


@register_step("to_tensor", stage="to_tensor")
def _to_tensor(ctx: StepContext) -> Callable[[Any], Any]:
    return torch.nn.Identity()  # never used: the implicit to_tensor is part of normalize

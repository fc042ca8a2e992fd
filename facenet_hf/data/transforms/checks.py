"""Value checks for step parameters: the shared ones (:mod:`facenet_hf.validation`) and the image-specific ones.
Each returns the value in canonical form or raises :class:`ParamError` naming the parameter, the value and what
is valid (the step factory adds the step's name)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torchvision.transforms import v2

from facenet_hf.validation import ParamError, boolean, choice, integer, number, pair

__all__ = [
    "INTERPOLATIONS",
    "PADDING_MODES",
    "ParamError",
    "boolean",
    "choice",
    "choice_or_value_error",
    "fill_param",
    "integer",
    "interp_mode",
    "maybe",
    "number",
    "pair",
    "scale_ratio",
    "size_param",
]

INTERPOLATIONS = {
    "nearest": v2.InterpolationMode.NEAREST,
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
}
PADDING_MODES = ("constant", "edge", "reflect", "symmetric")


def size_param(key: str, value: Any) -> int | list[int]:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != 2:
            raise ParamError(f"{key} must be an int or [height, width], got {value!r}")
        return [integer(key, v, lo=1) for v in value]
    return integer(key, value, lo=1)


def fill_param(key: str, value: Any) -> int | list[int]:
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != 3:
            raise ParamError(f"{key} must be a grey level 0..255 or [r, g, b], got {value!r}")
        return [int(number(key, v, lo=0, hi=255)) for v in value]
    return int(number(key, value, lo=0, hi=255))


def scale_ratio(scale: Any, ratio: Any) -> tuple[tuple[float, float], tuple[float, float]]:
    """A random crop's area range within (0, 1] and aspect range > 0."""
    sc = pair("scale", scale, lo=0.0, hi=1.0)
    if sc[0] <= 0.0:
        raise ParamError(f"scale must be within (0, 1], got {list(scale)!r}")
    rt = pair("ratio", ratio, lo=0.0)
    if rt[0] <= 0.0:
        raise ParamError(f"ratio must be positive, got {list(ratio)!r}")
    return sc, rt


def interp_mode(key: str, value: Any) -> v2.InterpolationMode:
    return INTERPOLATIONS[choice(key, value, tuple(INTERPOLATIONS))]


def maybe(p: float, transform: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return transform if p >= 1.0 else v2.RandomApply([transform], p=p)


def choice_or_value_error(key: str, value: Any, choices: Sequence[str]) -> str:
    try:
        return choice(key, value, choices)
    except ParamError as exc:
        raise ValueError(str(exc)) from None

"""Step specs -> a pipeline: parsing the accepted spec forms, :func:`canonical_steps` and :func:`build_transform`."""

from __future__ import annotations

import copy
import difflib
import inspect
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image

import facenet_hf.data.transforms.steps  # noqa: F401  (registers the built-in steps)
from facenet_hf.constants import NORMALIZATION_MODES
from facenet_hf.data.images import to_rgb
from facenet_hf.data.transforms.checks import ParamError, choice_or_value_error
from facenet_hf.data.transforms.ops import EnsureSize, ToNormalizedTensor
from facenet_hf.data.transforms.registry import STEPS, StepContext

__all__ = ["FaceTransform", "build_transform", "canonical_steps"]


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
        return not self.tensor_ops and isinstance(self.to_tensor, ToNormalizedTensor)

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
    choice_or_value_error("normalization", normalization, NORMALIZATION_MODES)
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
        except (ParamError, ValueError, TypeError) as exc:
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
    image_ops.append(EnsureSize(ctx.image_size))
    if to_tensor is None:
        to_tensor = STEPS["normalize"](ctx)
    return FaceTransform(image_ops, to_tensor, tensor_ops, image_size=ctx.image_size, steps=canonical)

"""The registry of named preprocessing steps: :data:`STEPS` and the :func:`register_step` decorator."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["STEPS", "StepContext", "StepFactory", "register_step"]


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

"""A FaceNet ``config.json``: its fields and :func:`validate_config`, the strict check every load runs."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

import timm

from facenet_hf.constants import DEFAULT_IMAGE_SIZE, DISTANCES, FLIP_MODES, MAX_DISTANCE
from facenet_hf.validation import is_int, is_real

__all__ = [
    "CONFIG_FIELDS",
    "IMAGE_SIZE_RANGE",
    "MAX_EMBEDDING_DIM",
    "REQUIRED_CONFIG_FIELDS",
    "InvalidConfigError",
    "validate_config",
]

# config.json fields (= the constructor arguments) and the bounds a loaded config must respect.
CONFIG_FIELDS = (
    "backbone",
    "embedding_dim",
    "head_bn",
    "dropout",
    "image_size",
    "mean",
    "std",
    "eval_transforms",
    "threshold",
    "distance",
    "threshold_flip",
    "alignment",
    "calibration",
    "library_version",
)
REQUIRED_CONFIG_FIELDS = ("backbone", "embedding_dim")
MAX_EMBEDDING_DIM = 65536
IMAGE_SIZE_RANGE = (16, 4096)


class InvalidConfigError(ValueError):
    """A model ``config.json`` (or a ``from_pretrained`` keyword) has an unknown field or an absurd value."""

    def __init__(self, field: str, message: str, source: str = "config.json") -> None:
        self.field = field
        self.source = source
        super().__init__(f"{source}: field {field!r} {message}")


def validate_config(config: Any, *, source: str = "config.json", require: bool = True) -> None:
    """Check a model config dict; raises :class:`InvalidConfigError` naming the first bad field.

    Refused: a non-dict, unknown fields, missing ``backbone``/``embedding_dim`` (with ``require``), a backbone that
    is not a registered timm architecture (``hf-hub:``/``local-dir:`` references would fetch or read files at load
    time), ``embedding_dim`` outside [1, 65536], ``image_size`` outside [16, 4096], ``mean``/``std`` not 3 finite
    numbers (std > 0), ``dropout`` outside [0, 1), a negative (or impossible, > the largest distance between unit
    vectors) ``threshold``, an unknown ``distance``, ``eval_transforms`` that do not build, an ``alignment``
    that is not a valid :class:`~facenet_hf.faces.AlignmentSpec` and a ``calibration`` that is not a valid
    :class:`~facenet_hf.model.calibration.Calibration` of the model's distance.
    """
    if not isinstance(config, Mapping):
        raise InvalidConfigError("<root>", f"must be a JSON object, got {type(config).__name__}", source)
    unknown = [k for k in config if k not in CONFIG_FIELDS]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), CONFIG_FIELDS, n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise InvalidConfigError(
            str(key), f"is unknown{hint}; a FaceNet config holds only {', '.join(CONFIG_FIELDS)}", source
        )
    if require:
        for key in REQUIRED_CONFIG_FIELDS:
            if key not in config:
                raise InvalidConfigError(key, "is missing (it defines the architecture)", source)

    def bad(field: str, message: str) -> InvalidConfigError:
        return InvalidConfigError(field, f"{message}, got {config[field]!r}", source)

    if "backbone" in config:
        name = config["backbone"]
        if not isinstance(name, str) or not name or ":" in name or not timm.is_model(name):
            raise bad("backbone", "must be the name of a timm architecture (see timm.list_models())")
    if "embedding_dim" in config:
        v = config["embedding_dim"]
        if not is_int(v) or not 1 <= v <= MAX_EMBEDDING_DIM:
            raise bad("embedding_dim", f"must be an integer in [1, {MAX_EMBEDDING_DIM}]")
    if "head_bn" in config and not isinstance(config["head_bn"], bool):
        raise bad("head_bn", "must be true or false")
    if "dropout" in config:
        v = config["dropout"]
        if not is_real(v) or not 0.0 <= v < 1.0:
            raise bad("dropout", "must be a number in [0, 1)")
    if "image_size" in config:
        v = config["image_size"]
        lo, hi = IMAGE_SIZE_RANGE
        if not is_int(v) or not lo <= v <= hi:
            raise bad("image_size", f"must be an integer in [{lo}, {hi}]")
    for key in ("mean", "std"):
        if key in config and config[key] is not None:
            v = config[key]
            if (
                not isinstance(v, (list, tuple))
                or len(v) != 3
                or not all(is_real(x) for x in v)
                or (key == "std" and not all(x > 0 for x in v))
            ):
                rule = "3 finite numbers (one per RGB channel)" + (", all > 0" if key == "std" else "")
                raise bad(key, f"must be {rule}")
    distance = config.get("distance", "squared_euclidean")
    if "distance" in config and distance not in DISTANCES:
        raise bad("distance", f"must be one of {list(DISTANCES)}")
    if config.get("threshold") is not None:
        v = config["threshold"]
        top = MAX_DISTANCE[distance]
        if not is_real(v) or not 0.0 <= v <= top:
            raise bad("threshold", f"must be null or a number in [0, {top:g}] (a {distance} distance)")
    if "threshold_flip" in config and config["threshold_flip"] not in FLIP_MODES:
        raise bad("threshold_flip", f"must be one of {list(FLIP_MODES)}")
    if config.get("alignment") is not None:
        from facenet_hf.faces.align import AlignmentSpec

        try:
            AlignmentSpec.from_dict(config["alignment"])
        except (ValueError, TypeError) as e:
            raise InvalidConfigError("alignment", f"is not a valid alignment spec: {e}", source) from None
    if config.get("calibration") is not None:
        from facenet_hf.model.calibration import Calibration

        try:
            cal = Calibration.from_dict(config["calibration"])
        except (ValueError, TypeError) as e:
            raise InvalidConfigError("calibration", f"is not a valid calibration: {e}", source) from None
        if cal.distance != distance:
            raise InvalidConfigError(
                "calibration",
                f"was fitted on {cal.distance} distances but the model's distance is {distance!r}: recalibrate",
                source,
            )
    if "library_version" in config and not isinstance(config["library_version"], str):
        raise bad("library_version", "must be a string")
    if config.get("eval_transforms") is not None:
        steps = config["eval_transforms"]
        if not isinstance(steps, list):
            raise bad("eval_transforms", "must be null or a list of preprocessing steps")
        from facenet_hf.data.transforms import build_transform

        try:
            build_transform(
                steps,
                image_size=config.get("image_size", DEFAULT_IMAGE_SIZE),
                mean=config.get("mean") or (0.5, 0.5, 0.5),
                std=config.get("std") or (0.5, 0.5, 0.5),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidConfigError("eval_transforms", f"does not build: {e}", source) from None

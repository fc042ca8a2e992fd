"""One home for the facts several modules share: option names, defaults and FaceNet's fixed normalisation.

Each choice list is a ``Literal`` type (what the config dataclasses annotate, so a config file is checked against
it) and the tuple of its values (what the library checks arguments against). This module imports nothing heavy:
``facenet_hf.config`` and ``facenet-hf --help`` read it without loading torch.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

__all__ = [
    "ALIGNMENT_KINDS",
    "BAD_IMAGE_POLICIES",
    "DEFAULT_EVAL_STEPS",
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_TRAIN_STEPS",
    "DEFAULT_WORKER_NICE",
    "DISTANCES",
    "FIXED_MEAN",
    "FIXED_STD",
    "FLIP_MODES",
    "MAX_DISTANCE",
    "MINING_MODES",
    "MIXED_PRECISIONS",
    "NONFINITE_POLICIES",
    "NORMALIZATION_MODES",
    "OPTIMIZERS",
    "PRESCAN_MODES",
    "SCHEDULERS",
    "AlignmentKind",
    "BadImagePolicy",
    "Distance",
    "FlipMode",
    "MiningMode",
    "MixedPrecision",
    "NonFinitePolicy",
    "Normalization",
    "OptimizerName",
    "PrescanMode",
    "SchedulerName",
    "check_worker_nice",
]

MiningMode = Literal["semihard", "batch_hard", "batch_all"]
Distance = Literal["squared_euclidean", "euclidean"]
FlipMode = Literal[
    "off", "sum", "concat"
]  # flip test-time augmentation: none, normalise(f(x) + f(flip x)), [f, f]
Normalization = Literal["backbone", "fixed"]  # the backbone's mean/std, or FaceNet's (x - 127.5) / 128
BadImagePolicy = Literal["skip", "error"]
PrescanMode = Literal["off", "header", "decode"]
NonFinitePolicy = Literal["skip", "error"]
OptimizerName = Literal["adam", "adamw", "sgd"]
SchedulerName = Literal["cosine", "step", "constant"]
MixedPrecision = Literal["no", "fp16", "bf16"]
AlignmentKind = Literal["five_point", "lfw_crop"]  # 5-point-aligned crops, or LFW deep-funneled style crops

MINING_MODES: tuple[str, ...] = get_args(MiningMode)
DISTANCES: tuple[str, ...] = get_args(Distance)
FLIP_MODES: tuple[str, ...] = get_args(FlipMode)
NORMALIZATION_MODES: tuple[str, ...] = get_args(Normalization)
BAD_IMAGE_POLICIES: tuple[str, ...] = get_args(BadImagePolicy)
PRESCAN_MODES: tuple[str, ...] = get_args(PrescanMode)
NONFINITE_POLICIES: tuple[str, ...] = get_args(NonFinitePolicy)
OPTIMIZERS: tuple[str, ...] = get_args(OptimizerName)
SCHEDULERS: tuple[str, ...] = get_args(SchedulerName)
MIXED_PRECISIONS: tuple[str, ...] = get_args(MixedPrecision)
ALIGNMENT_KINDS: tuple[str, ...] = get_args(AlignmentKind)

# Largest possible distance between two unit vectors: 4 (squared Euclidean) or 2 (Euclidean).
MAX_DISTANCE: dict[str, float] = {"squared_euclidean": 4.0, "euclidean": 2.0}

DEFAULT_IMAGE_SIZE = 112  # px, the model input side (ArcFace's aligned crop size; 2x faster than 160 on CPU)

FIXED_MEAN: tuple[float, float, float] = (127.5 / 255,) * 3
"""FaceNet's fixed standardisation ``(x*255 - 127.5) / 128`` written as a mean/std on ``[0, 1]`` pixels."""
FIXED_STD: tuple[float, float, float] = (128 / 255,) * 3

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

DEFAULT_WORKER_NICE = 19  # DataLoader workers' added niceness (docs/benchmarks.md, section 2)


def check_worker_nice(nice: object, key: str = "worker_nice") -> int:
    """``nice`` as an int in 0..19, or a ValueError naming ``key``."""
    if isinstance(nice, bool) or not isinstance(nice, int) or not 0 <= nice <= 19:
        raise ValueError(f"{key} must be an int from 0 (unchanged) to 19 (lowest priority), got {nice!r}")
    return nice

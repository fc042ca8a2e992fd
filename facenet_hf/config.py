"""One typed configuration: dataclass defaults < YAML file < dotted overrides (``train.lr=1e-3``).

Every key is checked: an unknown key fails with the nearest valid one, a value of the wrong type or out of
range fails with the key, the value and what would be valid. Validity depends on the file alone, never on the
machine reading it (whether fp16 has a GPU is checked where the run is built); this module imports neither torch
nor the data stack. ``save_config`` writes the resolved config
beside a run's outputs so the run can be reproduced with ``--config <run>/config.yaml``.
"""

from __future__ import annotations

import difflib
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from facenet_hf.constants import (
    DEFAULT_EVAL_STEPS,
    DEFAULT_IMAGE_SIZE,
    DEFAULT_TRAIN_STEPS,
    DEFAULT_WORKER_NICE,
    AlignmentKind,
    BadImagePolicy,
    FlipMode,
    MiningMode,
    MixedPrecision,
    NonFinitePolicy,
    Normalization,
    OptimizerName,
    PrescanMode,
    SchedulerName,
    check_worker_nice,
)
from facenet_hf.fileio import atomic_write_text


class ConfigError(ValueError):
    """A config key or value is invalid; the message names it and says what is valid."""


Objective = Literal["triplet", "arcface", "cosface", "triplet+arcface", "triplet+cosface"]
"""``loss.objective``: the triplet loss, a margin softmax over the training identities, or their sum."""
OBJECTIVES: tuple[str, ...] = get_args(Objective)

_SOURCE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@dataclass
class ModelConfig:
    backbone: str = "resnet18"  # any timm model name
    embedding_dim: int = 128
    head_bn: bool = True  # BatchNorm1d after the linear head (before L2 normalisation)
    dropout: float = 0.0
    image_size: int = DEFAULT_IMAGE_SIZE
    pretrained_weights: str | None = None  # local .safetensors with backbone (e.g. ImageNet) weights
    normalization: Normalization = "backbone"  # backbone mean/std or FaceNet's (x-127.5)/128
    # what the model is trained on (and so what it expects): LFW deep-funneled style crops, or five-point-aligned
    # crops made by `facenet-hf align` at align_size px with align_margin (stored in the model's config.json, so
    # FaceNet.embed detects and aligns raw photos the same way)
    alignment: AlignmentKind = "lfw_crop"
    align_size: int = DEFAULT_IMAGE_SIZE
    align_margin: float = 0.0


@dataclass
class SourceConfig:
    """One more training source (``data.extra_sources``): its identities are its own, never merged with another
    source's (labels offset after the sources before it, names prefixed ``<name>:``)."""

    path: str | None = (
        None  # image folder (with labels_file: the folder its file names are relative to), parquet, Hub id
    )
    name: str | None = None  # the identity prefix; default: the last part of path
    labels_file: str | None = None  # `file identity` lines (CelebA) or a .csv / .tsv with a header
    image_column: str | None = None  # parquet / Hub column, or the labels file's path column
    label_column: str | None = None  # parquet / Hub column, or the labels file's identity column
    name_column: str | None = None
    train_transforms: list | None = (
        None  # this source's augmentations (its framing); default: data.train_transforms
    )


@dataclass
class DataConfig:
    train_source: str | None = None  # image folder / parquet / Hub id; default: lfw_dir
    # with train_source an image folder: `file identity` lines (CelebA's identity_CelebA.txt) or a .csv / .tsv
    # with a header (columns: image_column / label_column, else found by name); file names relative to the folder
    labels_file: str | None = None
    extra_sources: list[SourceConfig] = field(
        default_factory=list
    )  # more training sources, disjoint identities
    lfw_dir: str | None = None  # folder of Name/Name_NNNN.jpg (LFW deep-funneled)
    pairs: str | None = None  # LFW pairs.txt
    holdout_folds: list[int] = field(default_factory=lambda: [10])  # [] = outside-data mode, all folds scored
    image_column: str | None = None
    label_column: str | None = None
    name_column: str | None = None
    p: int = 16  # identities per batch
    k: int = 4  # images per identity
    min_images: int = 2  # identities with fewer images are never sampled (1: single-image people too, their
    # K "images" being augmented copies of one photo: negatives for everyone, augmentation-only positives)
    replacement: bool = True  # identities with < k images are sampled with replacement (else dropped)
    num_workers: int = 2
    worker_nice: int = DEFAULT_WORKER_NICE  # added to the DataLoader workers' niceness (0..19): they yield cores to the model
    train_transforms: list = field(default_factory=lambda: list(DEFAULT_TRAIN_STEPS))
    eval_transforms: list = field(default_factory=lambda: list(DEFAULT_EVAL_STEPS))
    bad_images: BadImagePolicy = "skip"  # what an unusable image file does (docs/robustness.md)
    prescan: PrescanMode = "header"  # check every training image before training
    max_bad_fraction: float = 0.5  # refuse to train when more of the files are bad (0..1)
    # a text file of identity names (one a line, `#` comments) dropped from every training source before
    # sampling, e.g. VGGFace2's people who are also LFW's (n000123 folder names); `source:name` targets one of
    # data.extra_sources; read when training (read_exclusion_file), not when the config is read
    exclude_identities_file: str | None = None


@dataclass
class LossConfig:
    # triplet | arcface | cosface | triplet+arcface | triplet+cosface: the loss is the triplet loss (if named)
    # + margin_softmax_weight x the margin softmax (if named) over a classifier of the training identities
    objective: Objective = "triplet"
    margin: float = 0.2  # the triplet margin
    mining: MiningMode = "semihard"
    # a mining schedule: from this fraction of the training (0..1, after warm-up; by steps, or by time with
    # train.time_budget_minutes) the triplet loss mines with mining_after instead (e.g. semihard, then batch_hard)
    mining_switch_at: float | None = None
    mining_after: MiningMode = "batch_hard"
    squared: bool = True  # squared Euclidean distance (FaceNet) or plain Euclidean
    global_mining: bool = False  # mine over the batch gathered from all processes
    margin_softmax_weight: float = 1.0  # the margin-softmax term's weight
    arcface_margin: float = 0.5  # ArcFace's additive angular margin m, radians: cos(theta + m)
    cosface_margin: float = 0.35  # CosFace's additive cosine margin m: cos(theta) - m
    margin_softmax_scale: float = 64.0  # the logits' scale s (ArcFace's and CosFace's 64)


@dataclass
class TrainConfig:
    optimizer: OptimizerName = "adamw"
    lr: float = 1e-3
    weight_decay: float = 5e-4  # not applied to norms and biases
    momentum: float = 0.9  # sgd only
    scheduler: SchedulerName = "cosine"
    warmup_steps: int = 100
    step_every: int = 1000  # step scheduler: decay every N steps
    step_gamma: float = 0.1
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    time_budget_minutes: float | None = None  # stop (and evaluate) after this much training time
    grad_accum: int = 1
    grad_clip: float | None = None  # max gradient norm (unscaled), None = off
    mixed_precision: MixedPrecision = "no"  # fp16 needs a CUDA GPU (checked by train)
    channels_last: bool = False
    seed: int = 0
    log_every: int = 10
    eval_every_epochs: int = 1  # 0 = only at the end
    eval_flip: FlipMode = "sum"  # flip test-time augmentation
    eval_batch_size: int = 128
    checkpoint_every_steps: int = 0  # 0 = only at epoch ends
    keep_checkpoints: int = 2
    nonfinite_loss: NonFinitePolicy = "skip"  # what a NaN/Inf loss does
    ema_decay: float = 0.0  # weight EMA (e.g. 0.998) evaluated and saved instead of the live weights; 0 = off


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/default"
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # allow writing into an output_dir that already holds a run
    push_to_hub: str | None = None  # repo id to push the final model to


_RANGES: dict[str, tuple[str, Any]] = {
    "model.embedding_dim": (">=", 1),
    "model.image_size": (">=", 16),
    "model.align_size": (">=", 16),
    "model.align_margin": (">=", 0),
    "data.p": (">=", 2),
    "data.k": (">=", 2),
    "data.min_images": (">=", 1),
    "data.num_workers": (">=", 0),
    "loss.margin": (">", 0),
    "loss.margin_softmax_weight": (">", 0),
    "loss.margin_softmax_scale": (">", 0),
    "loss.cosface_margin": (">=", 0),
    "train.lr": (">", 0),
    "train.weight_decay": (">=", 0),
    "train.epochs": (">=", 1),
    "train.max_steps": (">=", 1),
    "train.time_budget_minutes": (">", 0),
    "train.grad_accum": (">=", 1),
    "train.grad_clip": (">", 0),
    "train.warmup_steps": (">=", 0),
    "train.log_every": (">=", 1),
    "train.eval_every_epochs": (">=", 0),
    "train.eval_batch_size": (">=", 1),
    "train.checkpoint_every_steps": (">=", 0),
    "train.keep_checkpoints": (">=", 1),
}


_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(key: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to the annotated type ``tp`` or raise ConfigError naming ``key``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_value(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if isinstance(tp, type) and is_dataclass(tp):
        if isinstance(value, tp):
            return value
        names = [f.name for f in fields(tp)]
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {names}, got {value!r}")
        obj = tp()
        _merge(obj, value, prefix=f"{key}.")
        return obj
    if origin is Literal:
        choices = get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads no/off/false as False: map back to the spelled choice
            spellings = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((c for c in spellings if c in choices), value)
        if value not in choices:
            hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}{extra}")
        return value
    if origin is list or tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp) or (Any,)
        return (
            value
            if item_tp is Any
            else [_check_value(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
        )
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def _unknown(key: str, valid: list[str]) -> ConfigError:
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    extra = f"; did you mean {hint[0]!r}?" if hint else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"unknown config key {key!r}{extra}")


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = _type_hints(type(obj))
    names = [f.name for f in fields(obj)]
    for name, value in updates.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown(key, [f"{prefix}{n}" for n in names])
        current = getattr(obj, name)
        if is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"{key}: expected a mapping of {[f.name for f in fields(current)]}, got {value!r}"
                )
            _merge(current, value, prefix=f"{key}.")
        else:
            setattr(obj, name, _check_value(key, value, hints[name]))


def all_keys(cfg: Config | None = None) -> list[str]:
    """Every dotted key, e.g. ``train.lr``."""
    cfg = cfg or Config()
    out: list[str] = []
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        out += [f"{f.name}.{g.name}" for g in fields(v)] if is_dataclass(v) else [f.name]
    return out


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value, e.g. train.lr=1e-3")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else None
    if isinstance(value, str) and _SCIENTIFIC.match(value):  # YAML 1.1 reads 1e-3 (no dot) as a string
        value = float(value)
    return key.strip().lstrip("-"), value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def validate(cfg: Config) -> Config:
    """Check ranges and option combinations; raise ConfigError naming the key and the valid range."""
    for key, (op, bound) in _RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        ok = value > bound if op == ">" else value >= bound
        if not ok:
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {op} {bound}")
    try:
        check_worker_nice(cfg.data.worker_nice, "data.worker_nice")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not cfg.data.train_source and not cfg.data.lfw_dir:
        raise ConfigError(
            "data.train_source or data.lfw_dir must be set (a folder, parquet file or Hub dataset)"
        )
    if cfg.data.holdout_folds and not cfg.data.pairs:
        raise ConfigError(
            "data.holdout_folds needs data.pairs (LFW pairs.txt) to know whose people to hold out"
        )
    if cfg.model.align_size > 4096:
        raise ConfigError(
            f"model.align_size: {cfg.model.align_size!r} is out of range; it must be <= 4096 px"
        )
    if not cfg.model.align_margin < 1.0:
        raise ConfigError(
            f"model.align_margin: {cfg.model.align_margin!r} is out of range; it must be in [0, 1)"
        )
    if not 0.0 <= cfg.data.max_bad_fraction <= 1.0:
        raise ConfigError(
            f"data.max_bad_fraction: {cfg.data.max_bad_fraction!r} is out of range; it must be in [0, 1]"
        )
    if not 0.0 <= cfg.train.ema_decay < 1.0:
        raise ConfigError(
            f"train.ema_decay: {cfg.train.ema_decay!r} is out of range; it must be in [0, 1) (0 = no EMA)"
        )
    if cfg.data.pairs and not cfg.data.lfw_dir:
        raise ConfigError(
            "data.pairs needs data.lfw_dir (the folder holding the pair images Name/Name_NNNN.jpg)"
        )
    if cfg.data.exclude_identities_file is not None and not cfg.data.exclude_identities_file.strip():
        raise ConfigError(
            "data.exclude_identities_file: an empty path; give a text file of identity names (one a line) or null"
        )
    _validate_loss(cfg.loss)
    _validate_sources(cfg.data)
    return cfg


def _validate_loss(loss: LossConfig) -> None:
    if not 0.0 <= loss.arcface_margin <= math.pi / 2:
        raise ConfigError(
            f"loss.arcface_margin: {loss.arcface_margin!r} is out of range; it must be in [0, pi/2] radians "
            "(the paper's 0.5; pytorch-metric-learning's ArcFaceLoss takes degrees: 28.6 degrees = 0.5 radians)"
        )
    if loss.cosface_margin > 1.0:
        raise ConfigError(
            f"loss.cosface_margin: {loss.cosface_margin!r} is out of range; it must be in [0, 1] (a cosine; "
            "the paper's 0.35)"
        )
    if loss.mining_switch_at is not None:
        if not 0.0 <= loss.mining_switch_at < 1.0:
            raise ConfigError(
                f"loss.mining_switch_at: {loss.mining_switch_at!r} is out of range; it must be in [0, 1) (the "
                "fraction of the training after which loss.mining_after is used), or null for no schedule"
            )
        if loss.objective in ("arcface", "cosface"):
            raise ConfigError(
                f"loss.mining_switch_at schedules the triplet loss's mining; loss.objective={loss.objective!r} "
                "has no triplet term (use triplet, triplet+arcface or triplet+cosface)"
            )
    for key in ("arcface_margin", "cosface_margin", "margin_softmax_weight", "margin_softmax_scale"):
        if not math.isfinite(getattr(loss, key)):
            raise ConfigError(f"loss.{key}: {getattr(loss, key)!r} must be a finite number")


def source_name(source: SourceConfig) -> str:
    """An extra source's name (its identities' prefix): ``name``, else the last part of ``path``."""
    if source.name:
        return source.name
    return Path(str(source.path).rstrip("/\\")).name or str(source.path)


def _validate_sources(d: DataConfig) -> None:
    if d.labels_file and not d.train_source:
        raise ConfigError(
            "data.labels_file needs data.train_source: the image folder whose files it labels (its file names "
            "are relative to that folder)"
        )
    seen: dict[str, int] = {}
    for i, src in enumerate(d.extra_sources):
        key = f"data.extra_sources[{i}]"
        if not src.path:
            raise ConfigError(
                f"{key}.path must be set: an image folder (<root>/<Identity>/<image>, or any folder with "
                "labels_file), a .parquet file or folder, or a Hub dataset id"
            )
        name = source_name(src)
        if not _SOURCE_NAME.match(name):
            raise ConfigError(
                f"{key}.name: {name!r} is not a valid source name (letters, digits, '_', '.', '-'; it prefixes "
                "the source's identities as '<name>:<identity>'); set name: explicitly"
            )
        if name in seen:
            raise ConfigError(
                f"{key}: source name {name!r} is also data.extra_sources[{seen[name]}]'s; give each source its own "
                "name: (the prefix that keeps their identities apart)"
            )
        seen[name] = i


@dataclass(frozen=True)
class IdentityExclusions:
    """The names of a ``data.exclude_identities_file`` (:func:`read_exclusion_file`).

    ``lines`` maps ``(source, name)`` to the line that first lists it: ``source`` is ``None`` for a plain name
    (matched against every training source's raw names) or the name of the one ``data.extra_sources`` entry a
    ``source:name`` line targets.
    """

    path: str
    lines: dict[tuple[str | None, str], int]

    def names_for(self, source: str | None) -> set[str]:
        """The raw names to drop from ``source`` (``None``: the first source): the plain names, and for an
        extra source also the ones its ``source:`` prefix targets."""
        return {n for (s, n) in self.lines if s is None or (source is not None and s == source)}

    def __len__(self) -> int:
        return len(self.lines)


_NOT_IN_A_NAME = re.compile(r"[\s,\"]")


def read_exclusion_file(path: str | Path, source_names: typing.Collection[str] = ()) -> IdentityExclusions:
    """Read a ``data.exclude_identities_file``: one identity name a line, as the source names it (a VGGFace2
    folder name ``n000123``, an LFW name ``Aaron_Eckhart``, a labels file's identity); everything from ``#`` to
    the end of a line is a comment; blank lines are ignored; a name listed twice counts once.

    ``source:name`` (``source`` one of ``source_names``, the names of ``data.extra_sources``) drops ``name`` from
    that source only; any other line, colons included, is one name matched against every source. Raises
    :class:`ConfigError` naming the file (and the line) when the file is missing or not UTF-8 text, or a line
    holds something that is not one name (spaces, commas or quotes inside: a CSV row, two names on a line).
    """
    file = Path(path).expanduser()
    try:
        raw = file.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"data.exclude_identities_file: {str(file)!r} does not exist (a text file of identity names to drop "
            "from training, one a line; relative paths are relative to the working folder)"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"data.exclude_identities_file: {str(file)!r} is a folder, not a file") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"data.exclude_identities_file {str(file)!r}, line {line}: not UTF-8 text ({exc.reason}); save it as UTF-8"
        ) from None
    known = set(source_names)
    lines: dict[tuple[str | None, str], int] = {}
    for no, line in enumerate(text.splitlines(), start=1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        where = f"data.exclude_identities_file {str(file)!r}, line {no}"
        if _NOT_IN_A_NAME.search(entry):
            raise ConfigError(
                f"{where}: {entry!r} is not one identity name (a name has no spaces, commas or quotes); list one "
                "name a line as the source names it (a VGGFace2 folder name n000123, an LFW name Aaron_Eckhart), "
                "optionally '<source>:<name>' for one of data.extra_sources; reduce a CSV such as VGGFace2's "
                "identity_meta.csv to its Class_ID column first"
            )
        source, sep, name = entry.partition(":")
        if entry.startswith(":") or (sep and source in known and not name):
            raise ConfigError(
                f"{where}: {entry!r} has an empty source or name; write '<source>:<name>' (source one of "
                f"{sorted(known) or 'data.extra_sources, none configured'}) or a plain name"
            )
        key = (source, name) if sep and source in known else (None, entry)
        lines.setdefault(key, no)
    return IdentityExclusions(str(file), lines)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path``, then ``key=value`` overrides; validated."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
        try:
            _merge(cfg, data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
    for item in overrides or []:
        key, value = parse_override(item)
        if key not in all_keys(cfg):
            raise _unknown(key, all_keys(cfg))
        _merge(cfg, _nest(key, value))
    return validate(cfg)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    return asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))

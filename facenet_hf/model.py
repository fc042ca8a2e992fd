"""FaceNet: a timm backbone, a linear embedding head and an L2-normalised output.

The model's ``config.json`` (written by :meth:`FaceNet.save_pretrained`) carries everything needed to use it:
the backbone name, the embedding size, the preprocessing (input size, mean/std, the eval pipeline) and the
calibrated verification threshold with the distance it applies to.

Loading (:meth:`FaceNet.from_pretrained`, a local folder or a Hub repo id) is strict: ``config.json`` must exist and
pass :func:`validate_config` (no unknown fields, no absurd values), the weights must be ``model.safetensors`` with
exactly the model's keys and shapes; pickled weights (``.bin``/``.pt``) are never opened, and the timm backbone is
always built with ``pretrained=False`` (nothing is downloaded besides the two files).
"""

from __future__ import annotations

import difflib
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from safetensors.torch import load_file, save_file
from torch import nn

from facenet_hf import __version__

if TYPE_CHECKING:
    from PIL import Image

    ImageLike = Image.Image | str | os.PathLike

DISTANCES = ("squared_euclidean", "euclidean")
_WEIGHTS = constants.SAFETENSORS_SINGLE_FILE  # "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

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
    "library_version",
)
REQUIRED_CONFIG_FIELDS = ("backbone", "embedding_dim")
MAX_EMBEDDING_DIM = 65536
IMAGE_SIZE_RANGE = (16, 4096)
# Largest possible distance between two unit vectors: 4 (squared Euclidean) or 2 (Euclidean).
_MAX_DISTANCE = {"squared_euclidean": 4.0, "euclidean": 2.0}


class InvalidConfigError(ValueError):
    """A model ``config.json`` (or a ``from_pretrained`` keyword) has an unknown field or an absurd value."""

    def __init__(self, field: str, message: str, source: str = "config.json") -> None:
        self.field = field
        self.source = source
        super().__init__(f"{source}: field {field!r} {message}")


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def validate_config(config: Any, *, source: str = "config.json", require: bool = True) -> None:
    """Check a model config dict; raises :class:`InvalidConfigError` naming the first bad field.

    Refused: a non-dict, unknown fields, missing ``backbone``/``embedding_dim`` (with ``require``), a backbone that
    is not a registered timm architecture (``hf-hub:``/``local-dir:`` references would fetch or read files at load
    time), ``embedding_dim`` outside [1, 65536], ``image_size`` outside [16, 4096], ``mean``/``std`` not 3 finite
    numbers (std > 0), ``dropout`` outside [0, 1), a negative (or impossible, > the largest distance between unit
    vectors) ``threshold``, an unknown ``distance``, and ``eval_transforms`` that do not build.
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
        if not _is_int(v) or not 1 <= v <= MAX_EMBEDDING_DIM:
            raise bad("embedding_dim", f"must be an integer in [1, {MAX_EMBEDDING_DIM}]")
    if "head_bn" in config and not isinstance(config["head_bn"], bool):
        raise bad("head_bn", "must be true or false")
    if "dropout" in config:
        v = config["dropout"]
        if not _is_real(v) or not 0.0 <= v < 1.0:
            raise bad("dropout", "must be a number in [0, 1)")
    if "image_size" in config:
        v = config["image_size"]
        lo, hi = IMAGE_SIZE_RANGE
        if not _is_int(v) or not lo <= v <= hi:
            raise bad("image_size", f"must be an integer in [{lo}, {hi}]")
    for key in ("mean", "std"):
        if key in config and config[key] is not None:
            v = config[key]
            if (
                not isinstance(v, (list, tuple))
                or len(v) != 3
                or not all(_is_real(x) for x in v)
                or (key == "std" and not all(x > 0 for x in v))
            ):
                rule = "3 finite numbers (one per RGB channel)" + (", all > 0" if key == "std" else "")
                raise bad(key, f"must be {rule}")
    distance = config.get("distance", "squared_euclidean")
    if "distance" in config and distance not in DISTANCES:
        raise bad("distance", f"must be one of {list(DISTANCES)}")
    if config.get("threshold") is not None:
        v = config["threshold"]
        top = _MAX_DISTANCE[distance]
        if not _is_real(v) or not 0.0 <= v <= top:
            raise bad("threshold", f"must be null or a number in [0, {top:g}] (a {distance} distance)")
    if "threshold_flip" in config and config["threshold_flip"] not in ("off", "sum", "concat"):
        raise bad("threshold_flip", "must be one of ['off', 'sum', 'concat']")
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
                image_size=config.get("image_size", 112),
                mean=config.get("mean") or (0.5, 0.5, 0.5),
                std=config.get("std") or (0.5, 0.5, 0.5),
            )
        except (ValueError, TypeError, KeyError) as e:
            raise InvalidConfigError("eval_transforms", f"does not build: {e}", source) from None


class FaceNet(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="facenet-hf",
    tags=["face-recognition", "face-verification", "facenet", "triplet-loss", "timm"],
    license="apache-2.0",
    pipeline_tag="image-feature-extraction",
):
    """Maps a batch of face images ``[B, 3, H, W]`` to unit embeddings ``[B, embedding_dim]`` (float32)."""

    def __init__(
        self,
        backbone: str = "resnet18",
        embedding_dim: int = 128,
        head_bn: bool = True,
        dropout: float = 0.0,
        image_size: int = 112,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        eval_transforms: list | None = None,
        threshold: float | None = None,
        distance: str = "squared_euclidean",
        threshold_flip: str = "sum",
        library_version: str = __version__,
    ) -> None:
        super().__init__()
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be >= 1, got {embedding_dim}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0)
        data_cfg = timm.data.resolve_model_data_config(self.backbone)
        self.backbone_name = backbone
        self.embedding_dim = embedding_dim
        self.head_bn = head_bn
        self.dropout_p = dropout
        self.image_size = image_size
        self.mean = [float(m) for m in (mean if mean is not None else data_cfg["mean"])]
        self.std = [float(s) for s in (std if std is not None else data_cfg["std"])]
        self.eval_transforms = eval_transforms
        self.threshold = threshold
        self.distance = distance
        self.threshold_flip = threshold_flip  # the flip TTA mode the threshold was calibrated with
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # pooled width: timm's head_hidden_size where a pre-logits layer sits after the features (mobilenetv3)
        feat_dim = getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features
        self.head = nn.Linear(feat_dim, embedding_dim)
        self.bn = nn.BatchNorm1d(embedding_dim) if head_bn else nn.Identity()

    @property
    def config(self) -> dict[str, Any]:
        """The JSON-serialisable constructor arguments (what ``config.json`` holds)."""
        return {
            "backbone": self.backbone_name,
            "embedding_dim": self.embedding_dim,
            "head_bn": self.head_bn,
            "dropout": self.dropout_p,
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "eval_transforms": self.eval_transforms,
            "threshold": self.threshold,
            "distance": self.distance,
            "threshold_flip": self.threshold_flip,
            "library_version": __version__,
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixel_values)
        emb = self.bn(self.head(self.dropout(features)))
        return F.normalize(emb.float(), dim=-1)

    # -- inference helpers ---------------------------------------------------------------------------------
    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Images (``PIL.Image`` or file paths) -> float32 ``[N, 3, image_size, image_size]``.

        Uses the eval preprocessing stored in the config (:func:`facenet_hf.evaluation.embed.model_transform`).
        """
        from PIL import Image

        from facenet_hf.data.images import load_image
        from facenet_hf.evaluation.embed import model_transform

        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        transform = model_transform(self)
        if len(images) == 0:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        return torch.stack([transform(load_image(img)) for img in images])

    def embed(
        self, images: ImageLike | Sequence[ImageLike], batch_size: int = 64, flip: str = "off"
    ) -> torch.Tensor:
        """Unit embeddings ``[N, D]`` (float32, on the CPU) of images, in eval mode, without gradients.

        ``flip``: ``off``, ``sum`` (normalise(f(x) + f(flipped x))) or ``concat`` (``[N, 2D]``), as in evaluation.
        """
        from PIL import Image

        from facenet_hf.evaluation.embed import FLIP_MODES, flip_embed

        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, (Image.Image, str, os.PathLike)):
            images = [images]
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        try:
            with torch.no_grad():
                for start in range(0, len(images), batch_size):
                    x = self.preprocess(images[start : start + batch_size]).to(device)
                    out.append(flip_embed(self, x, flip).float().cpu())
        finally:
            self.train(was_training)
        if not out:
            return torch.zeros(0, self.embedding_dim * (2 if flip == "concat" else 1))
        return torch.cat(out)

    def verify(self, img1: ImageLike, img2: ImageLike, *, flip: str | None = None) -> tuple[bool, float]:
        """Same person? Returns ``(distance <= threshold, distance)`` with the stored threshold and distance.

        ``flip`` defaults to ``threshold_flip``, the test-time augmentation the threshold was calibrated with.
        Raises ``ValueError`` if no threshold is calibrated.
        """
        flip = flip or self.threshold_flip
        if self.threshold is None:
            raise ValueError(
                "this model has no calibrated verification threshold (config.json 'threshold' is null): calibrate "
                "one with `facenet-hf evaluate MODEL_DIR --lfw-dir ... --pairs ...`, set `model.threshold`, or "
                "compare the distances of `model.embed(...)` yourself"
            )
        emb = self.embed([img1, img2], flip=flip).double()
        d = float(torch.sum((emb[0] - emb[1]) ** 2))
        if self.distance == "euclidean":
            d = math.sqrt(d)
        return d <= self.threshold, d

    def load_backbone_weights(self, path: str | os.PathLike) -> None:
        """Load backbone weights (e.g. ImageNet ones) from a local safetensors file; the classifier is dropped."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"backbone weights must be a .safetensors file, got {path}")
        state = load_file(str(path))
        own = self.backbone.state_dict()
        state = {k: v for k, v in state.items() if k in own}
        missing = sorted(set(own) - set(state))
        if missing:
            raise ValueError(f"{path} lacks {len(missing)} backbone weights, e.g. {missing[:5]}")
        self.backbone.load_state_dict(state, strict=True)

    # -- Hub mixin ---------------------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = save_directory / f".{_WEIGHTS}.tmp"
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, save_directory / _WEIGHTS)
        self.write_config(save_directory)

    def write_config(self, save_directory: str | os.PathLike) -> None:
        """(Re)write ``config.json`` atomically, e.g. after calibrating the threshold."""
        tmp = Path(save_directory) / ".config.json.tmp"
        tmp.write_text(json.dumps(self.config, indent=2, sort_keys=True))
        os.replace(tmp, Path(save_directory) / constants.CONFIG_NAME)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        config: dict[str, Any] | None = None,
        **model_kwargs: Any,
    ) -> FaceNet:
        """Validate ``config.json``, build the model, load ``model.safetensors`` strictly; never unpickles anything.

        ``config`` is the raw ``config.json`` the mixin read (its unknown keys included); ``model_kwargs`` are the
        known fields merged with the caller's keyword overrides.
        """
        where = f"{model_id}" + (f" (revision {revision})" if revision else "")
        if config is None:
            if not os.path.isdir(model_id):
                # The mixin swallows Hub errors on config.json (a missing repo, a bad token): surface them.
                try:
                    hf_hub_download(
                        repo_id=model_id,
                        filename=constants.CONFIG_NAME,
                        revision=revision,
                        cache_dir=cache_dir,
                        token=token,
                        local_files_only=local_files_only,
                    )
                except EntryNotFoundError as e:
                    if isinstance(e, LocalEntryNotFoundError):
                        raise
            raise FileNotFoundError(
                f"{where} has no {constants.CONFIG_NAME}: a FaceNet folder or repo holds model.safetensors and "
                "config.json (written by FaceNet.save_pretrained)"
            )
        validate_config(config, source=f"{constants.CONFIG_NAME} of {where}")
        validate_config(model_kwargs, source="from_pretrained keyword arguments", require=False)
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, _WEIGHTS)
            if not os.path.isfile(weights):
                raise FileNotFoundError(_no_safetensors_message(where, os.listdir(model_id)))
        else:
            try:
                weights = hf_hub_download(
                    repo_id=model_id,
                    filename=_WEIGHTS,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    token=token,
                    local_files_only=local_files_only,
                )
            except EntryNotFoundError as e:
                # Offline and not cached: the Hub client's own message says so.
                if isinstance(e, LocalEntryNotFoundError):
                    raise
                raise FileNotFoundError(_no_safetensors_message(where, [])) from e
        model = cls(**model_kwargs)
        load_weights(model, weights, strict=strict, map_location=map_location)
        return model.eval()


def _no_safetensors_message(where: str, files: list[str]) -> str:
    pickles = sorted(f for f in files if f.endswith(_PICKLE_SUFFIXES))
    found = f" (found {', '.join(pickles)})" if pickles else ""
    return (
        f"{where} has no {_WEIGHTS}{found}: only safetensors weights are loaded; pickled weights (.bin/.pt) are "
        "never opened because unpickling can run arbitrary code. Convert them yourself, from a source you trust: "
        "FaceNet(**config).load_state_dict(torch.load(path, weights_only=True)); model.save_pretrained(dir)"
    )


def load_weights(model: nn.Module, path: str, *, strict: bool = True, map_location: str = "cpu") -> None:
    """Load a safetensors state dict into ``model``; with ``strict`` a missing or unexpected key is an error."""
    state = load_file(path, device=map_location)
    own = model.state_dict()
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"weights in {path} do not match the model: missing keys {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                f"{' ...' if len(unexpected) > 10 else ''}"
            )
        bad_shape = [k for k in own if tuple(own[k].shape) != tuple(state[k].shape)]
        if bad_shape:
            k = bad_shape[0]
            raise ValueError(
                f"weights in {path}: {k} has shape {tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}"
            )
    model.load_state_dict(state, strict=strict)

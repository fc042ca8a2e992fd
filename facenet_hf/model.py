"""FaceNet: a timm backbone, a linear embedding head and an L2-normalised output.

The model's ``config.json`` (written by :meth:`FaceNet.save_pretrained`) carries everything needed to use it:
the backbone name, the embedding size, the preprocessing (input size, mean/std, the eval pipeline) and the
calibrated verification threshold with the distance it applies to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn

from facenet_hf import __version__

DISTANCES = ("squared_euclidean", "euclidean")
_WEIGHTS = constants.SAFETENSORS_SINGLE_FILE  # "model.safetensors"


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
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(self.backbone.num_features, embedding_dim)
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
            "library_version": __version__,
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixel_values)
        emb = self.bn(self.head(self.dropout(features)))
        return F.normalize(emb.float(), dim=-1)

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
        **model_kwargs: Any,
    ) -> FaceNet:
        """Build from config and load ``model.safetensors`` strictly; never unpickles anything."""
        model = cls(**model_kwargs)
        if os.path.isdir(model_id):
            weights = os.path.join(model_id, _WEIGHTS)
            if not os.path.isfile(weights):
                raise FileNotFoundError(f"{model_id} has no {_WEIGHTS} (only safetensors weights are loaded)")
        else:
            weights = hf_hub_download(
                repo_id=model_id,
                filename=_WEIGHTS,
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                token=token,
                local_files_only=local_files_only,
            )
        load_weights(model, weights, strict=strict, map_location=map_location)
        return model.eval()


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

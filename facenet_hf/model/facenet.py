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

import json
import os
from collections.abc import Sequence
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
from facenet_hf.constants import DEFAULT_IMAGE_SIZE, DISTANCES
from facenet_hf.faces.align import AlignmentSpec
from facenet_hf.fileio import atomic_path, atomic_write_text
from facenet_hf.model.calibration import Calibration
from facenet_hf.model.schema import validate_config

if TYPE_CHECKING:
    from facenet_hf.model.inference import ImageLike

__all__ = ["FaceNet", "load_weights"]

_WEIGHTS = constants.SAFETENSORS_SINGLE_FILE  # "model.safetensors"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
        image_size: int = DEFAULT_IMAGE_SIZE,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        eval_transforms: list | None = None,
        threshold: float | None = None,
        distance: str = "squared_euclidean",
        threshold_flip: str = "sum",
        alignment: dict | None = None,
        calibration: dict | None = None,
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
        # the input it was trained on: an AlignmentSpec dict (five-point crops), None = LFW deep-funneled crops
        self.alignment = None if alignment is None else AlignmentSpec.from_dict(alignment).to_dict()
        # P(same | distance) and thresholds at FARs, fitted by `facenet-hf calibrate` (a Calibration dict)
        self.calibration = None if calibration is None else Calibration.from_dict(calibration).to_dict()
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
            **(
                {"alignment": self.alignment} if self.alignment is not None else {}
            ),  # absent: LFW-style crops
            **({"calibration": self.calibration} if self.calibration is not None else {}),
            "library_version": __version__,
        }

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixel_values)
        emb = self.bn(self.head(self.dropout(features)))
        return F.normalize(emb.float(), dim=-1)

    # -- inference helpers ---------------------------------------------------------------------------------
    def preprocess(
        self, images: ImageLike | Sequence[ImageLike], *, detect: bool | None = None
    ) -> torch.Tensor:
        """Images (``PIL.Image`` or file paths) -> float32 ``[N, 3, image_size, image_size]``: detected and
        aligned like :meth:`embed`, then the eval preprocessing stored in the config
        (:func:`facenet_hf.model.inference.preprocess`)."""
        from facenet_hf.model.inference import preprocess

        return preprocess(self, images, detect=detect)

    def embed(
        self,
        images: ImageLike | Sequence[ImageLike],
        batch_size: int = 64,
        flip: str = "off",
        *,
        detect: bool | None = None,
    ) -> torch.Tensor:
        """Unit embeddings ``[N, D]`` (float32, on the CPU) of images, in eval mode, without gradients.

        ``flip``: ``off``, ``sum`` (normalise(f(x) + f(flipped x))) or ``concat`` (``[N, 2D]``), as in evaluation.
        ``detect``: find and align the face first, the way the model was trained (``alignment`` in its config);
        None = when the model was trained on five-point-aligned crops; False = the images already are such
        crops (or LFW-style crops for an LFW-crop model). An image without a face raises
        :class:`~facenet_hf.model.inference.NoFaceError` naming it.
        """
        from facenet_hf.model.inference import embed_images

        return embed_images(self, images, batch_size=batch_size, flip=flip, detect=detect)

    def verify(
        self, img1: ImageLike, img2: ImageLike, *, flip: str | None = None, detect: bool | None = None
    ) -> tuple[bool, float]:
        """Same person? Returns ``(distance <= threshold, distance)`` with the stored threshold and distance.

        ``flip`` defaults to ``threshold_flip``, the test-time augmentation the threshold was calibrated with.
        Raises ``ValueError`` if no threshold is calibrated.
        """
        from facenet_hf.model.inference import verify_images

        return verify_images(self, img1, img2, flip=flip, detect=detect)

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
        with atomic_path(save_directory / _WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        self.write_config(save_directory)

    def write_config(self, save_directory: str | os.PathLike) -> None:
        """(Re)write ``config.json`` atomically, e.g. after calibrating the threshold."""
        atomic_write_text(
            Path(save_directory) / constants.CONFIG_NAME, json.dumps(self.config, indent=2, sort_keys=True)
        )

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

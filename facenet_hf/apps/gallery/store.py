"""What a gallery's vectors are (:class:`GalleryInfo`, the model fingerprint) and its file: the format's
metadata, the lock, telling a gallery from an embeddings table."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from facenet_hf.constants import DISTANCES, FLIP_MODES
from facenet_hf.model.calibration import model_calibration

logger = logging.getLogger(__name__)

GALLERY_FORMAT = "facenet-hf-gallery/1"
METADATA_KEY = b"facenet_hf.gallery"
BACKENDS = ("exact", "faiss", "faiss-hnsw")
UNKNOWN = "unknown"
UNIT_TOLERANCE = 1e-3  # |norm - 1| allowed for an embedding (float32 rounding, fp16 models)
DEFAULT_CHUNK_BYTES = 64 * 1024**2
HNSW_MAX_ROWS = 4096  # an approximate index is not asked for more rows than this per query
ENROL_CHUNK = 256  # images embedded per progress step
_ARCH_FIELDS = (
    "backbone",
    "embedding_dim",
    "head_bn",
    "image_size",
    "mean",
    "std",
    "eval_transforms",
    "alignment",
)


# -- what made the vectors ---------------------------------------------------------------------------------------
def model_fingerprint(model: torch.nn.Module) -> str:
    """``sha256:...`` of what decides a model's embeddings: its architecture and preprocessing fields and every
    weight (as float32). The threshold, calibration and library version are left out: calibrating a model again
    does not change its embeddings. An exported model (``weights_fingerprint``) is identified by its file's hash."""
    given = getattr(model, "weights_fingerprint", None)
    if isinstance(given, str):
        return given
    h = hashlib.sha256()
    config = getattr(model, "config", {}) or {}
    h.update(json.dumps({k: config.get(k) for k in _ARCH_FIELDS}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def default_flip(model: Any) -> str:
    """The flip test-time augmentation a gallery is enrolled with by default: the one the model's threshold was
    calibrated with (its calibration's, else ``threshold_flip``), so that the threshold applies."""
    cal = model_calibration(model)
    return cal.flip if cal is not None else getattr(model, "threshold_flip", "off")


def _model_dim(model: Any, flip: str) -> int:
    return int(model.embedding_dim) * (2 if flip == "concat" else 1)


@dataclass
class GalleryInfo:
    """What a gallery's vectors are: their size, the distance reported, the flip TTA they were embedded with and
    the model that made them (``None``: unknown, e.g. enrolled from an embeddings file without a model)."""

    dim: int
    distance: str = "squared_euclidean"
    flip: str | None = None
    model_id: str | None = None
    model_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"a gallery's dim must be an integer >= 1, got {self.dim!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {list(DISTANCES)}, got {self.distance!r}")
        if self.flip is not None and self.flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {list(FLIP_MODES)} or None, got {self.flip!r}")

    @classmethod
    def for_model(cls, model: Any, *, flip: str | None = None, model_id: str | None = None) -> GalleryInfo:
        flip = flip or default_flip(model)
        return cls(
            dim=_model_dim(model, flip),
            distance=model.distance,
            flip=flip,
            model_id=model_id,
            model_fingerprint=model_fingerprint(model),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "gallery") -> GalleryInfo:
        known = {"dim", "distance", "flip", "model_id", "model_fingerprint"}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad gallery metadata: {e}") from None


# -- the file ----------------------------------------------------------------------------------------------------
def _gallery_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".parquet":
        raise ValueError(f"a gallery file must end in .parquet, got {str(p)!r}")
    return p


def _read_metadata(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"gallery file not found: {path}")
    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise ValueError(
            f"{path} is not a facenet-hf gallery (no gallery metadata); if it is an embeddings table, enrol it into "
            f"a gallery: facenet-hf enrol GALLERY.parquet {path}"
        )
    data = json.loads(meta[METADATA_KEY])
    if data.get("format") != GALLERY_FORMAT:
        raise ValueError(f"{path}: gallery format {data.get('format')!r} is not {GALLERY_FORMAT!r}")
    return data


def read_gallery_info(path: str | os.PathLike) -> GalleryInfo:
    """The :class:`GalleryInfo` of a gallery file, from its metadata only (no vector is read)."""
    p = _gallery_path(path)
    return GalleryInfo.from_dict(_read_metadata(p).get("info", {}), where=str(p))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``.<name>.lock`` beside ``path`` (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_embeddings_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an embeddings file (``.npz``, or ``.parquet`` with an ``embedding`` column) rather than
    images or an image dataset."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".npz":
        return True
    if p.suffix.lower() != ".parquet":
        return False
    import pyarrow.parquet as pq

    try:
        return "embedding" in pq.read_schema(p).names
    except Exception:  # not a readable parquet: let the image loader say what is wrong
        return False

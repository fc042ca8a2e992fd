"""Face detection behind a small interface: :class:`Face`, the :class:`Detector` protocol, MTCNN, a registry.

A detector takes a batch of RGB ``PIL`` images and returns, per image, its faces sorted by score (highest
first), each with a box and five landmarks in image pixel coordinates. Coordinates follow the pixel-index
convention of OpenCV and insightface: the centre of the pixel in column ``i``, row ``j`` is ``(i, j)``.

A new backend (e.g. RetinaFace on ONNX Runtime) is one class with ``name`` and ``detect`` plus one entry in
:data:`DETECTORS`. Importing this module loads neither torch nor facenet-pytorch: :class:`MTCNNDetector` does,
when it is built.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from facenet_hf.validation import choice, integer, number

if TYPE_CHECKING:
    import torch

__all__ = ["DETECTORS", "LANDMARK_NAMES", "Detector", "Face", "MTCNNDetector", "build_detector"]

logger = logging.getLogger(__name__)

LANDMARK_NAMES: tuple[str, ...] = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
"""Order of :attr:`Face.landmarks` rows; left/right as seen in the image (the subject's right eye is "left")."""

INSTALL_HINT = "pip install facenet-pytorch==2.5.3  (facenet-pytorch==2.5.3)"


@dataclass(frozen=True, eq=False)
class Face:
    """One detected face: ``box`` (x1, y1, x2, y2), ``score`` in [0, 1], ``landmarks`` (5, 2) as (x, y) rows.

    Rows of ``landmarks`` are in :data:`LANDMARK_NAMES` order. The array is a read-only float64 copy.
    """

    box: tuple[float, float, float, float]
    score: float
    landmarks: np.ndarray

    def __post_init__(self) -> None:
        box = tuple(float(v) for v in self.box)
        if len(box) != 4 or not all(math.isfinite(v) for v in box):
            raise ValueError(f"Face.box must be 4 finite numbers (x1, y1, x2, y2), got {self.box!r}")
        if box[2] < box[0] or box[3] < box[1]:
            raise ValueError(f"Face.box must have x2 >= x1 and y2 >= y1, got {box!r}")
        score = float(self.score)
        if not math.isfinite(score):
            raise ValueError(f"Face.score must be a finite number, got {self.score!r}")
        pts = np.array(self.landmarks, dtype=np.float64)
        if pts.shape != (5, 2) or not np.isfinite(pts).all():
            raise ValueError(f"Face.landmarks must be a finite (5, 2) array, got shape {pts.shape}")
        pts.setflags(write=False)
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "score", score)
        object.__setattr__(self, "landmarks", pts)

    @property
    def width(self) -> float:
        """Box width in px."""
        return self.box[2] - self.box[0]

    @property
    def height(self) -> float:
        """Box height in px."""
        return self.box[3] - self.box[1]

    @property
    def area(self) -> float:
        """Box area in px²."""
        return self.width * self.height

    @property
    def center(self) -> tuple[float, float]:
        """Box centre (x, y)."""
        return ((self.box[0] + self.box[2]) / 2.0, (self.box[1] + self.box[3]) / 2.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"box": [4 floats], "score": float, "landmarks": [[x, y] x 5]}``."""
        return {"box": list(self.box), "score": self.score, "landmarks": self.landmarks.tolist()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Face:
        """Inverse of :meth:`to_dict`; unknown or missing keys raise ``ValueError``."""
        keys = {"box", "score", "landmarks"}
        if not isinstance(d, Mapping) or set(d) != keys:
            got = sorted(d) if isinstance(d, Mapping) else type(d).__name__
            raise ValueError(f"a Face dict must have exactly the keys {sorted(keys)}, got {got}")
        return cls(box=tuple(d["box"]), score=d["score"], landmarks=np.asarray(d["landmarks"]))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Face):
            return NotImplemented
        return (
            self.box == other.box
            and self.score == other.score
            and np.array_equal(self.landmarks, other.landmarks)
        )

    def __hash__(self) -> int:
        return hash((self.box, self.score, self.landmarks.tobytes()))

    def __repr__(self) -> str:
        box = ", ".join(f"{v:.1f}" for v in self.box)
        return f"Face(box=({box}), score={self.score:.4f})"


@runtime_checkable
class Detector(Protocol):
    """What :class:`~facenet_hf.faces.FaceAligner` needs from a face detector."""

    name: str

    def detect(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """One list of faces per image (RGB ``PIL`` images), each sorted by score, highest first."""
        ...


def _rgb(img: Any, index: int) -> Image.Image:
    if not isinstance(img, Image.Image):
        raise TypeError(f"images[{index}] must be a PIL.Image.Image, got {type(img).__name__}")
    return img if img.mode == "RGB" else img.convert("RGB")


def _floats(value: Any, shape: tuple[int, ...]) -> np.ndarray | None:
    """An MTCNN output item as float64 of ``shape`` (-1 allowed), or None when it holds no face."""
    if value is None:
        return None
    arr = np.asarray(value, dtype=object)
    if arr.size == 0 or any(v is None for v in arr.flat):
        return None
    return np.asarray(arr.tolist(), dtype=np.float64).reshape(shape)


class MTCNNDetector:
    """MTCNN (Zhang et al. 2016) from facenet-pytorch, with its bundled weights; nothing is downloaded.

    ``device`` None picks CUDA when available, else the CPU. ``min_face_size`` (px) and ``thresholds`` (the
    three stages' probability thresholds) go to ``facenet_pytorch.MTCNN``; faces scoring below ``min_score``
    are dropped. Images of the same size are detected together, ``batch_size`` at a time (MTCNN batches only
    equal-size images); results come back in input order.
    """

    name = "mtcnn"

    def __init__(
        self,
        device: str | torch.device | None = None,
        *,
        min_face_size: int = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.7),
        min_score: float = 0.0,
        batch_size: int = 16,
    ) -> None:
        self.min_face_size = integer("min_face_size", min_face_size, lo=1)
        if (
            isinstance(thresholds, (str, bytes))
            or not isinstance(thresholds, Sequence)
            or len(thresholds) != 3
        ):
            raise ValueError(
                f"thresholds must be 3 numbers in [0, 1] (one per MTCNN stage), got {thresholds!r}"
            )
        self.thresholds = tuple(number("thresholds", t, lo=0.0, hi=1.0) for t in thresholds)
        self.min_score = number("min_score", min_score, lo=0.0, hi=1.0)
        self.batch_size = integer("batch_size", batch_size, lo=1)
        try:
            from facenet_pytorch import MTCNN
        except ImportError as exc:
            raise ImportError(f"MTCNNDetector needs facenet-pytorch: {INSTALL_HINT}") from exc
        import torch

        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self._mtcnn = MTCNN(
            keep_all=True,
            device=self.device,
            min_face_size=self.min_face_size,
            thresholds=list(self.thresholds),
            post_process=False,
            select_largest=False,
        )

    def __repr__(self) -> str:
        return (
            f"MTCNNDetector(device={str(self.device)!r}, min_face_size={self.min_face_size}, "
            f"thresholds={self.thresholds}, min_score={self.min_score}, batch_size={self.batch_size})"
        )

    def detect(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """One list of faces per image, sorted by score (highest first); [] for an image without a face."""
        import torch

        rgb = [_rgb(img, i) for i, img in enumerate(images)]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(rgb):
            groups.setdefault(img.size, []).append(i)
        out: list[list[Face]] = [[] for _ in rgb]
        with torch.no_grad():
            for size, indices in groups.items():
                if min(size) < self.min_face_size:  # MTCNN's scale pyramid is empty: no face can be found
                    continue
                for start in range(0, len(indices), self.batch_size):
                    chunk = indices[start : start + self.batch_size]
                    boxes, probs, points = self._mtcnn.detect([rgb[i] for i in chunk], landmarks=True)
                    for k, i in enumerate(chunk):
                        out[i] = self._faces(boxes[k], probs[k], points[k], i)
        return out

    def _faces(self, boxes: Any, probs: Any, points: Any, index: int) -> list[Face]:
        """Cast one image's MTCNN outputs (object arrays, or None / [None] without a face) to faces."""
        b, p, pts = _floats(boxes, (-1, 4)), _floats(probs, (-1,)), _floats(points, (-1, 5, 2))
        if b is None or p is None or pts is None:
            return []
        if not len(b) == len(p) == len(pts):
            raise RuntimeError(
                f"MTCNN returned {len(b)} boxes, {len(p)} scores and {len(pts)} landmark sets for image {index}"
            )
        faces = []
        for box, score, lm in zip(b, p, pts, strict=True):
            if not (np.isfinite(box).all() and np.isfinite(score) and np.isfinite(lm).all()):
                logger.warning("image %d: dropped an MTCNN face with non-finite values", index)
                continue
            if score >= self.min_score:
                faces.append(Face(box=tuple(box), score=float(score), landmarks=lm))
        faces.sort(key=lambda f: -f.score)
        return faces


DETECTORS: dict[str, type] = {"mtcnn": MTCNNDetector}
"""Detector classes by name, for :func:`build_detector` (and a CLI's ``--detector``)."""


def build_detector(name: str = "mtcnn", **kwargs: Any) -> Detector:
    """A detector by registry name; ``kwargs`` go to its constructor."""
    choice("detector", name, tuple(DETECTORS))
    return DETECTORS[name](**kwargs)

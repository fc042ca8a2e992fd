"""Five-point face alignment: the ArcFace template, :class:`AlignmentSpec`, Umeyama's similarity fit, warping.

Coordinates (landmarks, templates, boxes) follow the pixel-index convention of OpenCV and insightface: the
centre of the pixel in column ``i``, row ``j`` is ``(i, j)``. :func:`warp_face` maps the five landmarks onto
the template with the least-squares similarity transform (rotation, uniform scale, translation) and resamples
the image once, so that source content at a landmark lands at the template point of the crop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal, get_args

import numpy as np
from PIL import Image

from facenet_hf.constants import ALIGNMENT_KINDS, AlignmentKind
from facenet_hf.faces.detect import Face
from facenet_hf.validation import choice, is_int, number

__all__ = [
    "ALIGNMENT_KINDS",
    "ARCFACE_TEMPLATE_112",
    "FACE_SELECTIONS",
    "LFW_FRAMING_SPEC",
    "LFW_TEMPLATE_250",
    "TEMPLATES",
    "AlignmentKind",
    "AlignmentSpec",
    "FaceSelection",
    "choose_faces",
    "transform_points",
    "umeyama",
    "warp_face",
]

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # left eye (image left)
        [73.5318, 51.5014],  # right eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # left mouth corner
        [70.7299, 92.2041],  # right mouth corner
    ],
    dtype=np.float64,
)
"""insightface's five-point template (``utils/face_align.py``, ``arcface_dst``) for a 112x112 crop."""
ARCFACE_TEMPLATE_112.setflags(write=False)

LFW_TEMPLATE_250 = np.array(
    [
        [104.83, 113.41],
        [146.97, 112.46],
        [126.15, 137.60],
        [108.46, 159.05],
        [145.15, 158.36],
    ],
    dtype=np.float64,
)
"""Where the five points sit in LFW's deep-funneled 250x250 images: the median MTCNN landmarks of the central
face over all 13,233 LFW images (docs/alignment.md). Aligning a photo onto it reproduces the framing LFW-crop models learnt."""
LFW_TEMPLATE_250.setflags(write=False)

TEMPLATES: dict[str, tuple[np.ndarray, int]] = {
    "arcface": (ARCFACE_TEMPLATE_112, 112),
    "lfw_deepfunneled": (LFW_TEMPLATE_250, 250),
}
"""Landmark templates by name: (points, the crop side they are defined for)."""

FaceSelection = Literal["largest", "central", "all"]
FACE_SELECTIONS: tuple[str, ...] = get_args(FaceSelection)

MIN_SIZE, MAX_SIZE = 16, 4096


@dataclass(frozen=True)
class AlignmentSpec:
    """How a face crop is made.

    - ``kind="five_point"``: detect, then warp the five landmarks onto ``template`` in a ``size`` x ``size``
      crop. ``kind="lfw_crop"``: no detection; the input is taken to be an LFW deep-funneled style image (the
      face centred in a 250x250 picture, as the older models were trained on) and the aligner returns its
      centred square, resized to ``size`` (unchanged for a 250x250 image with ``size=250``).
    - ``margin`` (in [0, 1)): extra border around the template's face region. With ``margin=0`` the template
      fills the crop as at 112x112 (scaled to ``size``); with margin ``m`` that region is shrunk about the crop
      centre by ``1 / (1 + 2m)``, i.e. a border of ``m`` x the region's side is added on each side. FaceNet-style
      160x160 crops with some context: ``size=160, margin=0.1``.
    """

    kind: AlignmentKind = "five_point"
    size: int = 112
    margin: float = 0.0
    template: str = "arcface"

    def __post_init__(self) -> None:
        choice("kind", self.kind, ALIGNMENT_KINDS)
        if not is_int(self.size) or not MIN_SIZE <= self.size <= MAX_SIZE:
            raise ValueError(f"size must be an integer in [{MIN_SIZE}, {MAX_SIZE}] (px), got {self.size!r}")
        margin = number("margin", self.margin, lo=0.0)
        if not margin < 1.0:
            raise ValueError(f"margin must be in [0, 1), got {self.margin!r}")
        choice("template", self.template, tuple(TEMPLATES))
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "margin", margin)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (all four fields)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlignmentSpec:
        """Strict inverse of :meth:`to_dict`: missing keys take defaults, unknown keys or bad values raise."""
        if not isinstance(d, Mapping):
            raise ValueError(f"an alignment spec must be a mapping, got {type(d).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(valid), key=str)
        if unknown:
            raise ValueError(f"unknown alignment key(s) {unknown}; valid keys: {valid}")
        return cls(**d)

    def landmarks_template(self) -> np.ndarray:
        """The (5, 2) target points in the ``size`` x ``size`` crop (pixel-index coordinates).

        The template is scaled from its own crop side to ``size`` (about the crop's top-left corner, in
        continuous coordinates: ``(p + 0.5) * size / side - 0.5``, so the face covers the same fraction of the
        crop at any size) and then shrunk by ``1 / (1 + 2 * margin)`` about the crop centre.
        """
        if self.kind != "five_point":
            raise ValueError(f"landmarks_template() needs kind='five_point', got kind={self.kind!r}")
        points, side = TEMPLATES[self.template]
        corner = (points + 0.5) * (self.size / side)
        half = self.size / 2.0
        return half + (corner - half) / (1.0 + 2.0 * self.margin) - 0.5


def _points(name: str, value: Any) -> np.ndarray:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{name} must be an (N, 2) array of (x, y) points, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def umeyama(src: np.ndarray, dst: np.ndarray, *, estimate_scale: bool = True) -> np.ndarray:
    """The 2x3 similarity ``M`` minimising ``sum |dst_i - M @ [src_i, 1]|²`` (Umeyama 1991).

    Rotation (no reflection), uniform scale (1 when ``estimate_scale`` is False) and translation; ``src`` and
    ``dst`` are matching (N, 2) point sets, N >= 2. Raises ``ValueError`` for bad shapes, non-finite values or
    a degenerate set (all points equal).
    """
    s, d = _points("src", src), _points("dst", dst)
    if s.shape != d.shape:
        raise ValueError(f"src and dst must have the same shape, got {s.shape} and {d.shape}")
    n = len(s)
    if n < 2:
        raise ValueError(f"umeyama needs at least 2 point pairs, got {n}")
    mu_s, mu_d = s.mean(axis=0), d.mean(axis=0)
    xs, xd = s - mu_s, d - mu_d
    for name, pts, x in (("src", s, xs), ("dst", d, xd)):
        if np.sqrt((x**2).sum(axis=1).mean()) <= 1e-9 * max(1.0, float(np.abs(pts).max())):
            raise ValueError(f"{name} is degenerate: all {n} points are (nearly) equal, {pts[0].tolist()}")
    var_s = (xs**2).sum(axis=1).mean()
    cov = xd.T @ xs / n
    u, sv, vt = np.linalg.svd(cov)
    sign = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[-1] = -1.0
    rot = u @ np.diag(sign) @ vt
    scale = float((sv * sign).sum() / var_s) if estimate_scale else 1.0
    m = np.empty((2, 3))
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def _matrix(m: Any) -> np.ndarray:
    arr = np.asarray(m, dtype=np.float64)
    if arr.shape != (2, 3) or not np.isfinite(arr).all():
        raise ValueError(f"M must be a finite 2x3 affine matrix, got shape {arr.shape}")
    return arr


def transform_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """``M @ [p, 1]`` for each row p of the (N, 2) ``pts``."""
    a = _matrix(m)
    p = _points("pts", pts)
    return p @ a[:, :2].T + a[:, 2]


def _pil_affine(m: np.ndarray) -> tuple[float, ...]:
    """PIL ``AFFINE`` data for ``M`` (source -> crop, pixel-index coordinates).

    PIL maps an output pixel's centre ``(x + 0.5, y + 0.5)`` through the data to input coordinates whose pixel
    centres are at ``k + 0.5``; in index coordinates that is ``P(u) = M⁻¹(u - 0.5) + 0.5``.
    """
    a = m[:, :2]
    det = float(np.linalg.det(a))
    if not abs(det) > 1e-12:
        raise ValueError(f"the alignment transform is singular (det {det:g}); the landmarks are degenerate")
    inv = np.linalg.inv(a)
    t = -inv @ m[:, 2]
    t = t + 0.5 - inv @ np.array([0.5, 0.5])
    return (inv[0, 0], inv[0, 1], t[0], inv[1, 0], inv[1, 1], t[1])


def warp_face(
    image: Image.Image,
    landmarks: np.ndarray,
    spec: AlignmentSpec,
    *,
    resample: Image.Resampling | int = Image.BILINEAR,
) -> Image.Image:
    """The ``spec.size`` x ``spec.size`` RGB crop with ``landmarks`` (5, 2) moved onto the spec's template.

    One resampling (PIL ``AFFINE``, black outside the image). Note PIL's affine transform does not low-pass
    filter: a face much larger than the crop aliases a little (as ``cv2.warpAffine`` does).
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image.Image, got {type(image).__name__}")
    pts = _points("landmarks", landmarks)
    if pts.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2), got {pts.shape}")
    m = umeyama(pts, spec.landmarks_template())
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    size = (spec.size, spec.size)
    return rgb.transform(size, Image.AFFINE, data=_pil_affine(m), resample=resample, fillcolor=(0, 0, 0))


def choose_faces(faces: Sequence[Face], image_size: tuple[int, int], policy: FaceSelection) -> list[Face]:
    """The face(s) to keep: ``"largest"`` box area, ``"central"`` (box centre nearest the image centre; ties go to
    the larger), or ``"all"`` (sorted by score, highest first). [] when there is no face.

    ``image_size`` is (width, height), as PIL's ``Image.size``. Remaining ties go to the higher score.
    """
    choice("policy", policy, FACE_SELECTIONS)
    if (
        isinstance(image_size, (str, bytes))
        or len(image_size) != 2
        or not all(is_int(v) and v > 0 for v in image_size)
    ):
        raise ValueError(f"image_size must be (width, height) in px, got {image_size!r}")
    faces = list(faces)
    if not faces:
        return []
    if policy == "all":
        return sorted(faces, key=lambda f: -f.score)
    if policy == "largest":
        return [max(faces, key=lambda f: (f.area, f.score))]
    cx, cy = (image_size[0] - 1) / 2.0, (image_size[1] - 1) / 2.0

    def key(f: Face) -> tuple[float, float, float]:
        x, y = f.center
        return ((x - cx) ** 2 + (y - cy) ** 2, -f.area, -f.score)

    return [min(faces, key=key)]


LFW_FRAMING_SPEC = AlignmentSpec(kind="five_point", size=250, template="lfw_deepfunneled")
"""A raw photo as an LFW deep-funneled style 250x250 image (what LFW-crop models take)."""

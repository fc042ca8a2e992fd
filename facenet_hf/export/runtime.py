"""Running an exported embedder with numpy, PIL and onnxruntime only: no torch is imported.

An exported folder (``facenet-hf export``) holds ``model.onnx`` (optionally ``model.int8.onnx``) and
``facenet_export.json``: the input (NCHW float32, RGB, ``image_size``, mean/std), the eval preprocessing steps,
the alignment the model expects, and the distance and calibrated threshold. :class:`OnnxEmbedder` reads it and
reproduces the model's eval preprocessing with PIL and numpy (:class:`Preprocessor`), to the bit for RGB images.

Images are used as given: no face is detected. A five-point model (``alignment`` set) wants crops made by
``facenet-hf align`` with that alignment; an LFW-crop model (``alignment`` null) wants LFW deep-funneled-style
images (the face centred, about 60% of a 250 px square).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, ImageOps

from facenet_hf.distances import row_distances
from facenet_hf.export.errors import NotAModelError, require

__all__ = [
    "EXPORT_JSON",
    "INT8_FILE",
    "ONNX_FILE",
    "SUPPORTED_STEPS",
    "OnnxEmbedder",
    "Preprocessor",
    "is_export",
    "is_export_folder",
    "load_rgb",
    "read_export_metadata",
]

EXPORT_JSON = "facenet_export.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
FORMAT = "facenet-hf-onnx"
FORMAT_VERSION = 1
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "embeddings"
FLIP_MODES = ("off", "sum", "concat")  # as facenet_hf.constants.FLIP_MODES
DEFAULT_EVAL_STEPS: list[dict[str, dict[str, Any]]] = [{"face_crop": {"fraction": 0.6}}, {"resize": {}}]
# facenet_hf.constants.FIXED_MEAN / FIXED_STD: the "fixed" normalisation, (x * 255 - 127.5) / 128
FIXED_MEAN = (127.5 / 255,) * 3
FIXED_STD = (128 / 255,) * 3
SUPPORTED_STEPS = ("face_crop", "center_crop", "resize", "square_pad", "normalize", "to_tensor")
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})

ImageLike = Union[Image.Image, str, os.PathLike]  # noqa: UP007 (a runtime alias on Python 3.10)


def is_export_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local folder written by ``facenet-hf export`` (it holds ``facenet_export.json``)."""
    return (Path(path) / EXPORT_JSON).is_file()


def is_export(path: str | os.PathLike) -> bool:
    """An exported folder, or one of its ONNX files (``DIR/model.int8.onnx`` selects the int8 model)."""
    p = Path(path)
    return is_export_folder(p) or (p.suffix == ".onnx" and p.is_file() and is_export_folder(p.parent))


def read_export_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """``facenet_export.json`` of an exported folder; :class:`NotAModelError` if it is not one."""
    path = Path(folder) / EXPORT_JSON
    if not path.is_file():
        raise NotAModelError(
            f"{folder} is not an exported embedder: it has no {EXPORT_JSON} (write one with "
            "`facenet-hf export MODEL_DIR --out DIR`)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise NotAModelError(
            f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; this facenet_hf "
            f"reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return meta


def load_rgb(img: ImageLike) -> Image.Image:
    """A path or PIL image -> an upright RGB image (EXIF orientation applied, transparency on black), as
    :func:`facenet_hf.data.images.load_image` does for 8-bit images."""
    if isinstance(img, (str, os.PathLike)):
        with Image.open(img) as opened:
            img = ImageOps.exif_transpose(opened)  # a decoded copy, upright
    elif isinstance(img, Image.Image):
        img = ImageOps.exif_transpose(img)  # a copy: the caller's image is never modified
    else:
        raise TypeError(f"expected a path or a PIL image, got {type(img).__name__}")
    if img.mode in _ALPHA_MODES or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


class Preprocessor:
    """The model's eval preprocessing in PIL + numpy: RGB image -> float32 ``[3, image_size, image_size]``.

    Implements the deterministic steps (:data:`SUPPORTED_STEPS`) exactly as torchvision does on PIL images, then
    an exact bilinear resize to ``image_size`` when needed, then ``(pixel - 255 mean) / (255 std)`` in float32.
    A step outside that list (a random augmentation in an eval pipeline) raises ``ValueError``.
    """

    def __init__(
        self,
        steps: Sequence[dict[str, dict[str, Any]]] | None,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.steps = [dict(s) for s in (DEFAULT_EVAL_STEPS if steps is None else steps)]
        self.image_size = int(image_size)
        mean, std = tuple(mean), tuple(std)
        for step in self.steps:
            ((name, params),) = step.items()
            if name not in SUPPORTED_STEPS:
                raise ValueError(
                    f"eval step {name!r} has no numpy implementation (supported: {', '.join(SUPPORTED_STEPS)}); "
                    "preprocess with facenet_hf (facenet_hf.model.inference.model_transform) and pass the "
                    "tensors to OnnxEmbedder.run"
                )
            if name == "normalize" and (params or {}).get("mode") == "fixed":
                mean, std = FIXED_MEAN, FIXED_STD
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        # the same float32 operations as facenet_hf's ToNormalizedTensor: (x - mean * 255) * (1 / (std * 255))
        self._shift = np.asarray(self.mean, dtype=np.float32) * np.float32(255.0)
        self._scale = np.float32(1.0) / (np.asarray(self.std, dtype=np.float32) * np.float32(255.0))

    @classmethod
    def from_metadata(cls, meta: dict[str, Any]) -> Preprocessor:
        """The preprocessing an exported folder describes (its ``facenet_export.json``)."""
        cfg = meta["model_config"]
        return cls(meta["preprocessing"], image_size=cfg["image_size"], mean=cfg["mean"], std=cfg["std"])

    def prepare(self, img: ImageLike) -> Image.Image:
        """The image steps alone: the RGB image at ``image_size`` before the tensor conversion."""
        img = load_rgb(img)
        for step in self.steps:
            ((name, params),) = step.items()
            img = self._apply(name, dict(params or {}), img)
        if img.size != (self.image_size, self.image_size):
            img = img.resize((self.image_size, self.image_size), Image.Resampling.BILINEAR)
        return img

    def __call__(self, img: ImageLike) -> np.ndarray:
        x = np.asarray(self.prepare(img), dtype=np.float32)  # H x W x RGB, 0..255
        return np.ascontiguousarray(((x - self._shift) * self._scale).transpose(2, 0, 1))

    def batch(self, images: Sequence[ImageLike]) -> np.ndarray:
        """float32 ``[N, 3, image_size, image_size]``."""
        if not images:
            return np.zeros((0, 3, self.image_size, self.image_size), dtype=np.float32)
        return np.stack([self(img) for img in images])

    def _apply(self, name: str, params: dict[str, Any], img: Image.Image) -> Image.Image:
        w, h = img.size
        if name == "face_crop":
            side = max(1, round(float(params.get("fraction", 0.6)) * min(h, w)))
            return _center_crop(img, side, side)
        if name == "center_crop":
            size = params.get("size", self.image_size)
            ch, cw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
            return _center_crop(img, ch, cw)
        if name == "resize":
            s = int(params.get("size") or self.image_size)
            if params.get("keep_aspect", False):
                short, long = (w, h) if w <= h else (h, w)
                new_short, new_long = s, int(s * long / short)
                size = (new_short, new_long) if w <= h else (new_long, new_short)
            else:
                size = (s, s)
            if size == (w, h):
                return img
            return img.resize(size, _RESAMPLE[params.get("interpolation", "bilinear")])
        if name == "square_pad":
            if h == w:
                return img
            d = abs(h - w)
            a, b = d // 2, d - d // 2
            ltrb = (a, 0, b, 0) if h > w else (0, a, 0, b)
            return _pad(img, ltrb, params.get("fill", 0), params.get("padding_mode", "constant"))
        return img  # normalize / to_tensor: the tensor conversion, done in __call__


def _center_crop(img: Image.Image, ch: int, cw: int) -> Image.Image:
    """torchvision's ``center_crop`` on a PIL image: zero padding when the crop is larger, anchor rounded."""
    w, h = img.size
    if ch > h or cw > w:
        ltrb = (
            (cw - w) // 2 if cw > w else 0,
            (ch - h) // 2 if ch > h else 0,
            (cw - w + 1) // 2 if cw > w else 0,
            (ch - h + 1) // 2 if ch > h else 0,
        )
        img = _pad(img, ltrb, 0, "constant")
        w, h = img.size
        if (cw, ch) == (w, h):
            return img
    top, left = round((h - ch) / 2.0), round((w - cw) / 2.0)  # as torchvision: Python's round
    return img.crop((left, top, left + cw, top + ch))


def _pad(img: Image.Image, ltrb: Sequence[int], fill: Any, mode: str) -> Image.Image:
    left, top, right, bottom = ltrb
    x = np.asarray(img)
    pad = ((top, bottom), (left, right), (0, 0))
    if mode == "constant":
        fills = list(fill) if isinstance(fill, (list, tuple)) else [fill] * 3
        out = np.stack(
            [np.pad(x[..., c], pad[:2], mode="constant", constant_values=int(fills[c])) for c in range(3)],
            axis=-1,
        )
    else:
        out = np.pad(x, pad, mode={"edge": "edge", "reflect": "reflect", "symmetric": "symmetric"}[mode])
    return Image.fromarray(out.astype(np.uint8), "RGB")


def _unit(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation, as ``torch.nn.functional.normalize`` (eps 1e-12)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class OnnxEmbedder:
    """An exported folder, run with onnxruntime: images -> unit embeddings ``[N, D]`` (float32 numpy).

    ``folder``: the folder, or one of its ONNX files. ``int8``: run ``model.int8.onnx`` (written by
    ``facenet-hf export --int8``) instead of ``model.onnx`` (default: the file given, else fp32).
    ``threads``: onnxruntime intra-op threads (default: onnxruntime's, one per core). ``providers``:
    onnxruntime execution providers (default: the CPU one).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        int8: bool | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
    ) -> None:
        path = Path(folder)
        if path.suffix == ".onnx" and path.is_file():
            path, given = path.parent, path.name
            if int8 is None:
                int8 = given == INT8_FILE
            elif given != (INT8_FILE if int8 else ONNX_FILE):
                raise ValueError(f"{folder}: int8={int8} contradicts the file given")
        self.folder = path
        self.metadata = read_export_metadata(self.folder)
        kind = "int8" if int8 else "fp32"
        entry = self.metadata["files"].get(kind)
        if entry is None:
            raise FileNotFoundError(
                f"{self.folder} has no int8 model: export it with `facenet-hf export MODEL --out DIR --int8`"
            )
        self.path = self.folder / entry["path"]
        self.sha256 = entry.get(
            "sha256"
        )  # what the gallery's model check compares (the weights are in the file)
        ort = require("onnxruntime")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(
            str(self.path), options, providers=list(providers or ["CPUExecutionProvider"])
        )
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self._preprocessor: Preprocessor | None = None

    # -- what the folder says ------------------------------------------------------------------------------
    @property
    def model_config(self) -> dict[str, Any]:
        """The exported model's ``config.json`` (architecture, preprocessing, threshold, calibration)."""
        return self.metadata["model_config"]

    @property
    def image_size(self) -> int:
        return int(self.model_config["image_size"])

    @property
    def embedding_dim(self) -> int:
        return int(self.model_config["embedding_dim"])

    @property
    def threshold(self) -> float | None:
        return self.model_config.get("threshold")

    @property
    def distance(self) -> str:
        return self.model_config.get("distance", "squared_euclidean")

    @property
    def threshold_flip(self) -> str:
        return self.model_config.get("threshold_flip", "sum")

    @property
    def alignment(self) -> dict[str, Any] | None:
        return self.model_config.get("alignment")

    @property
    def preprocessor(self) -> Preprocessor:
        if self._preprocessor is None:
            self._preprocessor = Preprocessor.from_metadata(self.metadata)
        return self._preprocessor

    # -- running ---------------------------------------------------------------------------------------------
    def run(self, pixel_values: np.ndarray) -> np.ndarray:
        """Preprocessed float32 ``[N, 3, S, S]`` (NCHW, RGB) -> unit embeddings float32 ``[N, D]``."""
        x = np.ascontiguousarray(pixel_values, dtype=np.float32)
        if x.ndim != 4 or x.shape[1:] != (3, self.image_size, self.image_size):
            raise ValueError(
                f"expected float32 [N, 3, {self.image_size}, {self.image_size}] (NCHW, RGB), got {list(x.shape)}"
            )
        if x.shape[0] == 0:
            return np.zeros((0, self.embedding_dim), dtype=np.float32)
        return self.session.run([self.output_name], {self.input_name: x})[0]

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> np.ndarray:
        """Images (paths or PIL images, used as given) -> float32 ``[N, 3, S, S]``: the model's eval steps."""
        return self.preprocessor.batch(_as_list(images))

    def embed(
        self, images: ImageLike | Sequence[ImageLike], *, batch_size: int = 64, flip: str = "off"
    ) -> np.ndarray:
        """Unit embeddings ``[N, D]`` of images; ``flip``: off | sum | concat (``[N, 2D]``), as in evaluation."""
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        images = _as_list(images)
        out = []
        for start in range(0, len(images), batch_size):
            x = self.preprocess(images[start : start + batch_size])
            out.append(self.flip_embed(x, flip))
        if not out:
            return np.zeros((0, self.embedding_dim * (2 if flip == "concat" else 1)), dtype=np.float32)
        return np.concatenate(out)

    def flip_embed(self, pixel_values: np.ndarray, flip: str) -> np.ndarray:
        """Embed a preprocessed batch with flip test-time augmentation (facenet_hf's ``flip_embed``)."""
        emb = self.run(pixel_values)
        if flip == "off":
            return emb
        emb_flip = self.run(pixel_values[..., ::-1])
        if flip == "sum":
            return _unit(emb + emb_flip).astype(np.float32)
        return (np.concatenate([emb, emb_flip], axis=-1) / np.float32(math.sqrt(2.0))).astype(np.float32)

    def verify(self, img1: ImageLike, img2: ImageLike, *, flip: str | None = None) -> tuple[bool, float]:
        """Same person? ``(distance <= threshold, distance)`` with the exported threshold and distance; ``flip``
        defaults to the one the threshold was calibrated with."""
        if self.threshold is None:
            raise ValueError(
                "this export has no calibrated threshold (its model_config 'threshold' is null): calibrate the "
                "PyTorch model (`facenet-hf calibrate`) and export it again"
            )
        a, b = self.embed([img1, img2], flip=flip or self.threshold_flip)
        d = float(row_distances(a, b, squared=self.distance == "squared_euclidean"))
        return d <= self.threshold, d

    def __repr__(self) -> str:
        return f"OnnxEmbedder({str(self.folder)!r}, file={self.path.name!r})"


def _as_list(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    if isinstance(images, (Image.Image, str, os.PathLike)):
        return [images]
    return list(images)

"""Robust image loading: any path / bytes / ``datasets`` Image row / PIL image -> an RGB ``PIL.Image``.

Every way an image file can be unusable (missing, unreadable, empty, truncated, not an image, a decompression
bomb, too small to hold a face) ends in one exception type, :class:`BadImageError`, whose ``reason`` says what
to do about it; the training data pipeline skips or reports such images (see ``transforms.BatchTransform``).

Colour handling (the result is always mode ``"RGB"``, 8 bits per channel):

- ``L``, ``1``, ``P`` (no transparency), ``CMYK``, ``YCbCr``, ... : ``Image.convert("RGB")``.
- Images with an alpha channel (``RGBA``, ``LA``, ``PA``, ``P`` with a transparency entry, premultiplied
  ``RGBa``/``La``) are composited on **black** (:data:`ALPHA_BACKGROUND`): black is also what ``square_pad``,
  rotation corners and ``random_erasing`` put where there is no picture, so "no information" looks the same
  everywhere, and transparent pixels of most files are already stored as black.
- 16-bit greyscale (``I;16``, ``I;16B``, ...) keeps its top 8 bits (``v >> 8``); 32-bit ``I`` and float ``F``
  images are scaled by their value range (``0..255`` kept, ``0..65535`` divided by 257, ``F`` in ``0..1``
  times 255, anything else stretched min..max).
- The EXIF orientation tag is applied (``ImageOps.exif_transpose``), so phone photos come out upright.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "ALPHA_BACKGROUND",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MIN_SIZE",
    "BadImageError",
    "check_image",
    "describe_source",
    "load_image",
    "to_rgb",
]

ALPHA_BACKGROUND: tuple[int, int, int] = (0, 0, 0)
"""Colour that transparent pixels are composited on."""

DEFAULT_MAX_PIXELS = 64_000_000
DEFAULT_MIN_SIZE = 16

_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})


class BadImageError(ValueError):
    """An image that cannot be used; ``source`` is its path (or ``"<bytes>"``), ``reason`` what is wrong.

    The one-argument form ``BadImageError(message)`` exists for torch's DataLoader, which re-raises a worker's
    exception as ``type(exc)(text_with_traceback)``: ``source`` and ``reason`` are then parsed back from the
    text, so a bad image in a worker still surfaces as a ``BadImageError`` in the main process.
    """

    def __init__(self, source: str, reason: str | None = None) -> None:
        if reason is None:
            message = str(source)
            found = _MESSAGE_RE.findall(message)
            self.source, self.reason = found[-1] if found else ("<unknown>", message)
            super().__init__(message)
            return
        self.source = str(source)
        self.reason = reason
        super().__init__(f"cannot use image {self.source}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:  # picklable across DataLoader worker processes
        return (type(self), (self.source, self.reason))


_MESSAGE_RE = re.compile(r"cannot use image (.+?): (.*)$", re.MULTILINE)


def describe_source(obj: Any) -> str:
    """The name :class:`BadImageError` uses for ``obj``: its path, or ``"<bytes>"`` / ``"<PIL image>"``."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    if isinstance(obj, Mapping):
        path = obj.get("path")
        return str(path) if path else "<bytes>"
    if isinstance(obj, Image.Image):
        name = getattr(obj, "filename", "")
        return str(name) if name else "<PIL image>"
    return "<bytes>"


def load_image(
    obj: Any, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_size: int = DEFAULT_MIN_SIZE
) -> Image.Image:
    """Open, fully decode and convert an image to RGB (EXIF orientation applied).

    ``obj`` is a path (``str`` / ``Path``), encoded bytes, a ``datasets`` Image row ``{"bytes", "path"}`` (the
    bytes are used when not None, else the path) or a ``PIL.Image`` (never modified; may be returned as is when
    it is already an upright RGB image). Images with more than ``max_pixels`` pixels are refused from their
    header, before any decoding; images with a side shorter than ``min_size`` px are refused too.

    Raises :class:`BadImageError` for every unusable image, ``TypeError`` for an ``obj`` of the wrong type.
    """
    _check_limits(max_pixels, min_size)
    source = describe_source(obj)
    if isinstance(obj, Image.Image):
        return _finish(obj, source, max_pixels, min_size, owned=False)
    data_or_path = _resolve(obj, source)
    with _open(data_or_path, source, max_pixels) as img:
        return _finish(img, source, max_pixels, min_size, owned=True)


def check_image(
    obj: Any,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
    decode: bool = False,
) -> str | None:
    """The reason ``obj`` is unusable, or None; for pre-scanning a dataset.

    Cheap by default: reads the header (format, size: the pixel and ``min_size`` limits) and runs PIL's
    ``verify()`` (which checks PNG chunk CRCs but not JPEG data). A truncated JPEG is only found by decoding it:
    ``decode=True`` runs the full :func:`load_image` (about 1 ms for a 250x250 JPEG).
    """
    try:
        if decode or isinstance(obj, Image.Image):
            load_image(obj, max_pixels=max_pixels, min_size=min_size)
            return None
        _check_limits(max_pixels, min_size)
        source = describe_source(obj)
        with _open(_resolve(obj, source), source, max_pixels) as img:
            _check_size(img.size, source, max_pixels, min_size)
            try:
                img.verify()
            except Exception as exc:
                if isinstance(exc, MemoryError):
                    raise
                raise BadImageError(source, _corrupt_reason(exc)) from exc
    except BadImageError as exc:
        return exc.reason
    return None


# ---------------------------------------------------------------------------------------------------------
# helpers


def _check_limits(max_pixels: int, min_size: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise ValueError(f"min_size must be a positive int, got {min_size!r}")


def _resolve(obj: Any, source: str) -> bytes | str:
    """Bytes to decode or a path to open; checks that the path is a readable, non-empty file."""
    if isinstance(obj, Mapping):
        data = obj.get("bytes")
        if data is not None:
            obj = data
        elif obj.get("path"):
            obj = obj["path"]
        else:
            raise BadImageError(source, "the row has neither 'bytes' nor 'path' (both are None or missing)")
    if isinstance(obj, (bytes, bytearray, memoryview)):
        data = bytes(obj)
        if not data:
            raise BadImageError(source, "empty data (0 bytes)")
        return data
    if isinstance(obj, (str, os.PathLike)):
        path = os.fspath(obj)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise BadImageError(source, "file not found (check the path and the dataset root)") from None
        except PermissionError:
            raise BadImageError(source, "permission denied (check the permissions of the folders)") from None
        except OSError as exc:
            raise BadImageError(source, f"cannot stat the file: {exc.strerror or exc}") from None
        if Path(path).is_dir():
            raise BadImageError(source, "is a directory, not an image file")
        if st.st_size == 0:
            raise BadImageError(source, "empty file (0 bytes); re-download or remove it")
        return path
    raise TypeError(
        "load_image expects a path (str / pathlib.Path), bytes, a datasets Image row {'bytes', 'path'} "
        f"or a PIL.Image.Image, got {type(obj).__name__}"
    )


def _open(data_or_path: bytes | str, source: str, max_pixels: int) -> Image.Image:
    """``Image.open`` (header only, no decoding) with every failure turned into :class:`BadImageError`."""
    fp: Any = io.BytesIO(data_or_path) if isinstance(data_or_path, bytes) else data_or_path
    try:
        with warnings.catch_warnings():
            # max_pixels is checked by the caller; PIL's own limit (Image.MAX_IMAGE_PIXELS) must not leak a
            # warning, and its hard error (2x that limit) is converted below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as exc:
        # PIL refused the header size itself (above 2 x Image.MAX_IMAGE_PIXELS): report it like max_pixels does
        found = re.search(r"\((\d+) pixels\)", str(exc))
        if found and int(found.group(1)) > max_pixels:
            reason = (
                f"image has {int(found.group(1)):,} pixels, more than max_pixels={max_pixels:,} "
                "(possible decompression bomb); raise max_pixels if the image is genuine"
            )
            raise BadImageError(source, reason) from None
        raise BadImageError(source, _corrupt_reason(exc)) from None
    except PermissionError:
        raise BadImageError(source, "permission denied (check the file's read permissions)") from None
    except FileNotFoundError:
        raise BadImageError(source, "file not found (check the path and the dataset root)") from None
    except UnidentifiedImageError:
        raise BadImageError(source, _not_an_image_reason(data_or_path)) from None
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        raise BadImageError(source, _corrupt_reason(exc)) from exc


def _not_an_image_reason(data_or_path: bytes | str) -> str:
    head = data_or_path[:64] if isinstance(data_or_path, bytes) else _read_head(data_or_path)
    reason = "not an image in a format PIL can read"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return reason + f" (starts with bytes {head[:8].hex(' ')})"
    if text.strip() and all(c.isprintable() or c.isspace() for c in text):
        snippet = " ".join(text.split())[:40]
        return reason + f": the file holds text ({snippet!r}...), e.g. an HTML error page saved as an image"
    return reason


def _read_head(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(64)
    except OSError:
        return b""


def _corrupt_reason(exc: BaseException) -> str:
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, Image.DecompressionBombError):
        return (
            f"refused by PIL as a possible decompression bomb ({msg}); raise PIL.Image.MAX_IMAGE_PIXELS "
            "(and max_pixels) if the image is genuine"
        )
    if "truncated" in msg.lower() or isinstance(exc, EOFError):
        return f"truncated image data ({msg}); re-download the file"
    return f"corrupt image data ({type(exc).__name__}: {msg}); re-download or remove the file"


def _check_size(size: tuple[int, int], source: str, max_pixels: int, min_size: int) -> None:
    """Size limits, from the header alone (nothing decoded yet)."""
    w, h = size
    if w * h > max_pixels:
        raise BadImageError(
            source,
            f"image is {w}x{h} = {w * h:,} pixels, more than max_pixels={max_pixels:,} "
            "(possible decompression bomb); raise max_pixels if the image is genuine",
        )
    if min(w, h) < min_size:
        raise BadImageError(
            source,
            f"image is {w}x{h} px, smaller than min_size={min_size} px on a side: too small to hold a usable face",
        )


def _finish(img: Image.Image, source: str, max_pixels: int, min_size: int, *, owned: bool) -> Image.Image:
    """Check the size from the header, decode, apply EXIF orientation, convert to RGB."""
    _check_size(img.size, source, max_pixels, min_size)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()  # full decode here, so truncation is caught here and not in a DataLoader worker later
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        raise BadImageError(source, _corrupt_reason(exc)) from exc
    img = _exif_upright(img, owned=owned)
    try:
        return to_rgb(img)
    except Exception as exc:
        if isinstance(exc, MemoryError):
            raise
        raise BadImageError(source, f"cannot convert colour mode {img.mode!r} to RGB ({exc})") from exc


def _exif_upright(img: Image.Image, *, owned: bool) -> Image.Image:
    try:
        orientation = img.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # a broken EXIF block does not make the pixels unusable: ignore it
        return img
    if orientation in (None, 1):
        return img
    try:
        if owned:
            ImageOps.exif_transpose(img, in_place=True)
            return img
        out = ImageOps.exif_transpose(img)
        return out if out is not None else img
    except Exception:
        return img


def to_rgb(img: Image.Image) -> Image.Image:
    """A decoded image of any mode -> RGB (alpha on :data:`ALPHA_BACKGROUND`, 16-bit scaled; see module docs)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, ALPHA_BACKGROUND)
        out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I;16"):
        arr = np.asarray(img).astype(np.uint16)
        return Image.fromarray((arr >> 8).astype(np.uint8), "L").convert("RGB")
    if mode in ("I", "F"):
        return Image.fromarray(_rescale_to_uint8(np.asarray(img), mode), "L").convert("RGB")
    return img.convert("RGB")


def _rescale_to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    arr = np.nan_to_num(arr.astype(np.float64))
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if mode == "F" and lo >= 0.0 and hi <= 1.0:
        arr = arr * 255.0
    elif lo >= 0.0 and hi <= 255.0:
        pass
    elif lo >= 0.0 and hi <= 65535.0:
        arr = arr / 257.0
    elif hi > lo:
        arr = (arr - lo) * (255.0 / (hi - lo))
    else:
        arr = np.zeros_like(arr)
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)

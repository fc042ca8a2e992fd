"""What can go wrong when exporting or running an exported embedder, and the optional-dependency check.

Standard library only: importing it (and so :mod:`facenet_hf.export`) loads neither onnx nor onnxruntime.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = [
    "EXTRA_HINT",
    "ExportError",
    "MissingExtraError",
    "NotAModelError",
    "ParityError",
    "UnsupportedModelError",
    "require",
]

EXTRA_HINT = "pip install 'facenet-hf[export]'"


class MissingExtraError(ImportError):
    """onnx, onnxscript or onnxruntime is not installed; the message says how to install them."""


class ExportError(RuntimeError):
    """An export that did not complete; nothing was written to the output folder."""


class NotAModelError(ExportError, ValueError):
    """The source is not a FaceNet model folder / Hub repo (or is an exported folder already)."""


class UnsupportedModelError(ExportError):
    """torch's ONNX exporter could not capture or translate the model; the message says what to do."""


class ParityError(ExportError):
    """onnxruntime's embeddings differ from PyTorch's by more than the tolerance. ``parity``: the figures."""

    def __init__(self, message: str, parity: dict[str, Any]) -> None:
        super().__init__(message)
        self.parity = parity


def require(module: str) -> ModuleType:
    """Import ``module`` (``onnx``, ``onnxscript``, ``onnxruntime``, ...) or raise :class:`MissingExtraError`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingExtraError(
            f"{top} is not installed; ONNX export and onnxruntime inference need the 'export' extra: "
            f"{EXTRA_HINT} (onnx, onnxscript, onnxruntime) [{type(e).__name__}: {e}]"
        ) from e

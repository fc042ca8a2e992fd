"""Deploying an embedder without PyTorch: ONNX export with a parity check, int8 quantisation, onnxruntime.

- :func:`export_onnx` (``facenet-hf export``): a FaceNet -> a folder with ``model.onnx`` (+ ``model.int8.onnx``)
  and ``facenet_export.json``, proven against PyTorch on real images (:mod:`~facenet_hf.export.parity`).
- :class:`OnnxEmbedder` (:mod:`~facenet_hf.export.runtime`): runs such a folder with numpy, PIL and onnxruntime
  only, the model's eval preprocessing included; it imports no torch.
- :class:`OnnxFaceNet` (:mod:`~facenet_hf.export.module`): the folder as a torch module, so
  ``facenet-hf evaluate EXPORTED_DIR`` scores it with the same LFW protocol code.

Names are imported lazily: ``import facenet_hf.export`` loads neither torch, onnx nor onnxruntime; onnx,
onnxscript and onnxruntime (the ``export`` extra: ``pip install 'facenet-hf[export]'``) are imported only when
used, and a missing one raises :class:`MissingExtraError` saying so.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "EXPORT_JSON": "runtime",
    "INT8_FILE": "runtime",
    "ONNX_FILE": "runtime",
    "OnnxEmbedder": "runtime",
    "Preprocessor": "runtime",
    "is_export": "runtime",
    "is_export_folder": "runtime",
    "read_export_metadata": "runtime",
    "ExportError": "errors",
    "MissingExtraError": "errors",
    "NotAModelError": "errors",
    "ParityError": "errors",
    "UnsupportedModelError": "errors",
    "ExportResult": "onnx_export",
    "export_onnx": "onnx_export",
    "check_parity": "parity",
    "compare_embeddings": "parity",
    "OnnxFaceNet": "module",
    "ReadOnlyExportError": "module",
    "load_embedder": "module",
}

__all__ = [
    "EXPORT_JSON",
    "INT8_FILE",
    "ONNX_FILE",
    "ExportError",
    "ExportResult",
    "MissingExtraError",
    "NotAModelError",
    "OnnxEmbedder",
    "OnnxFaceNet",
    "ParityError",
    "Preprocessor",
    "ReadOnlyExportError",
    "UnsupportedModelError",
    "check_parity",
    "compare_embeddings",
    "export_onnx",
    "is_export",
    "is_export_folder",
    "load_embedder",
    "read_export_metadata",
]

if TYPE_CHECKING:
    from .errors import ExportError, MissingExtraError, NotAModelError, ParityError, UnsupportedModelError
    from .module import OnnxFaceNet, ReadOnlyExportError, load_embedder
    from .onnx_export import ExportResult, export_onnx
    from .parity import check_parity, compare_embeddings
    from .runtime import (
        EXPORT_JSON,
        INT8_FILE,
        ONNX_FILE,
        OnnxEmbedder,
        Preprocessor,
        is_export,
        is_export_folder,
        read_export_metadata,
    )


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

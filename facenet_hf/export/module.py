"""An exported folder as a torch module, so that facenet_hf's evaluation code scores it unchanged.

:class:`OnnxFaceNet` has the attributes the evaluation reads from a :class:`~facenet_hf.model.FaceNet`
(``image_size``, ``mean``, ``std``, ``eval_transforms``, ``alignment``, ``distance``, ``threshold`` ...) and its
``forward`` runs the onnxruntime session: :func:`~facenet_hf.evaluation.lfw_eval.evaluate_lfw` and
:func:`~facenet_hf.evaluation.embed.embed_files` (facenet_hf's own torch preprocessing, flip TTA, the protocol)
work on it as on the PyTorch model. It is read-only: an exported folder's threshold is the one it was exported
with (calibrate the PyTorch model and export again).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
from torch import nn

from facenet_hf.export.runtime import OnnxEmbedder, is_export

__all__ = ["OnnxFaceNet", "ReadOnlyExportError", "load_embedder"]


class ReadOnlyExportError(PermissionError):
    """Something tried to change an exported folder (write its threshold, save it)."""


class OnnxFaceNet(nn.Module):
    """Unit embeddings ``[B, D]`` of ``[B, 3, S, S]`` batches, computed by onnxruntime (on the CPU) from an
    exported folder (or one of its ONNX files: ``DIR/model.int8.onnx`` is the int8 model); results come back on
    the input's device."""

    def __init__(
        self, folder: str | os.PathLike, *, int8: bool | None = None, threads: int | None = None
    ) -> None:
        super().__init__()
        self.embedder = OnnxEmbedder(folder, int8=int8, threads=threads)
        cfg = self.embedder.model_config
        self.folder = self.embedder.folder
        self.backbone_name = f"{cfg['backbone']} (onnx: {self.embedder.path.name})"
        self.embedding_dim = int(cfg["embedding_dim"])
        self.image_size = int(cfg["image_size"])
        self.mean = list(cfg["mean"])
        self.std = list(cfg["std"])
        self.eval_transforms = copy.deepcopy(cfg.get("eval_transforms"))
        self.threshold = cfg.get("threshold")
        self.distance = cfg.get("distance", "squared_euclidean")
        self.threshold_flip = cfg.get("threshold_flip", "sum")
        self.alignment = copy.deepcopy(cfg.get("alignment"))
        self.calibration = copy.deepcopy(cfg.get("calibration"))
        self.read_only = True
        # identifies the embeddings (model_fingerprint): the ONNX file's hash, as its weights are not tensors here
        self.weights_fingerprint = f"sha256:{self.embedder.sha256}" if self.embedder.sha256 else None
        # facenet_hf finds a model's device from its parameters (embed_files, the aligner): an empty one
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)

    @property
    def config(self) -> dict[str, Any]:
        """The exported model's config (a copy)."""
        return copy.deepcopy(self.embedder.model_config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.embedder.run(x)).to(pixel_values.device)

    def write_config(self, *args: Any, **kwargs: Any) -> None:
        raise ReadOnlyExportError(
            f"{self.folder} is an exported folder: its threshold and config are fixed at export. Calibrate the "
            "PyTorch model (`facenet-hf calibrate MODEL_DIR ...`) and export it again"
        )

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        raise ReadOnlyExportError(
            f"{self.folder} is an exported folder; it cannot be saved as a PyTorch model"
        )

    def extra_repr(self) -> str:
        return f"folder={str(self.folder)!r}, file={self.embedder.path.name!r}"


def load_embedder(model_id: str | os.PathLike, *, revision: str | None = None) -> nn.Module:
    """A folder written by ``facenet-hf export`` (or one of its ONNX files) as :class:`OnnxFaceNet`; anything
    else through ``FaceNet.from_pretrained`` (a model folder or Hub repo id)."""
    if is_export(model_id):
        return OnnxFaceNet(model_id)
    from facenet_hf.model import FaceNet

    return FaceNet.from_pretrained(os.fspath(model_id), revision=revision)

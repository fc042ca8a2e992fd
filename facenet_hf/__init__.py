"""facenet_hf: FaceNet face embedders trained with triplet loss on the Hugging Face stack.

``from facenet_hf import FaceNet`` loads the model stack on first use only, so ``import facenet_hf.config``
(and ``facenet-hf --help``) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["FaceNet", "__version__"]

if TYPE_CHECKING:
    from facenet_hf.model import FaceNet


def __getattr__(name: str) -> Any:
    if name == "FaceNet":
        from facenet_hf.model import FaceNet

        return FaceNet
    raise AttributeError(f"module 'facenet_hf' has no attribute {name!r}")

"""facenet_hf: FaceNet face embedders trained with triplet loss on the Hugging Face stack."""

__version__ = "0.1.0"

from facenet_hf.model import FaceNet

__all__ = ["FaceNet", "__version__"]

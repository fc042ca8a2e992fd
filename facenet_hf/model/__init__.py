"""The embedder: :class:`FaceNet` (a timm backbone + linear head + L2 norm, Hub loading and saving), the
``config.json`` schema it loads strictly, and the inference helpers (:mod:`facenet_hf.model.inference`)."""

from facenet_hf.model.facenet import FaceNet, load_weights
from facenet_hf.model.inference import NoFaceError
from facenet_hf.model.schema import CONFIG_FIELDS, InvalidConfigError, validate_config

__all__ = ["CONFIG_FIELDS", "FaceNet", "InvalidConfigError", "NoFaceError", "load_weights", "validate_config"]

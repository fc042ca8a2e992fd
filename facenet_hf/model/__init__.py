"""The embedder: :class:`FaceNet` (a timm backbone + linear head + L2 norm, Hub loading and saving), the
``config.json`` schema it loads strictly, and the inference helpers (:mod:`facenet_hf.model.inference`)."""

from facenet_hf.model.calibration import Calibration, fit_calibration, model_calibration
from facenet_hf.model.facenet import FaceNet, load_weights
from facenet_hf.model.inference import NoFaceError
from facenet_hf.model.schema import CONFIG_FIELDS, InvalidConfigError, validate_config

__all__ = [
    "CONFIG_FIELDS",
    "Calibration",
    "FaceNet",
    "InvalidConfigError",
    "NoFaceError",
    "fit_calibration",
    "load_weights",
    "model_calibration",
    "validate_config",
]

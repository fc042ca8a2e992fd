"""Face detection and five-point alignment for raw photos (see docs/alignment.md).

``FaceAligner(detector, AlignmentSpec(size=112)).align(images)`` detects faces (MTCNN by default, through the
:class:`Detector` interface), picks one per image and warps it onto the ArcFace five-point template. Importing
this package loads neither torch nor facenet-pytorch; building an :class:`MTCNNDetector` does.
"""

from facenet_hf.faces.align import (
    ALIGNMENT_KINDS,
    ARCFACE_TEMPLATE_112,
    FACE_SELECTIONS,
    LFW_FRAMING_SPEC,
    LFW_TEMPLATE_250,
    TEMPLATES,
    AlignmentKind,
    AlignmentSpec,
    FaceSelection,
    choose_faces,
    transform_points,
    umeyama,
    warp_face,
)
from facenet_hf.faces.aligner import (
    ALIGN_STATUSES,
    NO_FACE_POLICIES,
    AlignResult,
    AlignStatus,
    FaceAligner,
    NoFacePolicy,
)
from facenet_hf.faces.detect import DETECTORS, LANDMARK_NAMES, Detector, Face, MTCNNDetector, build_detector

__all__ = [
    "ALIGNMENT_KINDS",
    "ALIGN_STATUSES",
    "ARCFACE_TEMPLATE_112",
    "DETECTORS",
    "FACE_SELECTIONS",
    "LANDMARK_NAMES",
    "LFW_FRAMING_SPEC",
    "LFW_TEMPLATE_250",
    "NO_FACE_POLICIES",
    "TEMPLATES",
    "AlignResult",
    "AlignStatus",
    "AlignmentKind",
    "AlignmentSpec",
    "Detector",
    "Face",
    "FaceAligner",
    "FaceSelection",
    "MTCNNDetector",
    "NoFacePolicy",
    "build_detector",
    "choose_faces",
    "transform_points",
    "umeyama",
    "warp_face",
]

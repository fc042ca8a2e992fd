"""Verification with a score you can trust: the distance, the decision at the stored threshold, P(same person)
from the model's calibration, and the decision at a false-accept rate the user chooses."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from facenet_hf.distances import row_distances
from facenet_hf.model.calibration import model_calibration
from facenet_hf.model.inference import ImageLike, embed_images

__all__ = ["Verdict", "verdict", "verify_pair"]


@dataclass
class Verdict:
    """One comparison. ``same`` is the decision at ``threshold`` (the model's stored one, or the one at ``far``
    when a FAR was asked for); ``probability`` is P(same person) from the calibration (None without one)."""

    distance: float
    same: bool
    threshold: float
    threshold_source: str  # "stored" | "far=<value>"
    probability: float | None
    distance_kind: str
    flip: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verdict(model: Any, distance: float, *, far: float | None = None, flip: str | None = None) -> Verdict:
    """Decide on one distance with the model's threshold (or its calibration's threshold at ``far``).

    Raises ``ValueError`` when the model has no threshold (or, with ``far``, no calibration)."""
    cal = model_calibration(model)
    if far is not None:
        if cal is None:
            raise ValueError(
                "this model has no calibration, so no threshold at a false-accept rate: fit one with "
                "`facenet-hf calibrate MODEL_DIR --lfw-dir ... --pairs ...` (or drop --far to use the stored threshold)"
            )
        threshold, source = cal.threshold_at_far(far), f"far={far:g}"
    elif model.threshold is not None:
        threshold, source = float(model.threshold), "stored"
    else:
        raise ValueError(
            "this model has no verification threshold (config.json 'threshold' is null): calibrate one with "
            "`facenet-hf calibrate MODEL_DIR --lfw-dir ... --pairs ...`"
        )
    prob = None if cal is None else float(cal.probability(distance))
    return Verdict(
        distance=float(distance),
        same=bool(distance <= threshold),
        threshold=float(threshold),
        threshold_source=source,
        probability=prob,
        distance_kind=model.distance,
        flip=flip or model.threshold_flip,
    )


def verify_pair(
    model: Any,
    img1: ImageLike,
    img2: ImageLike,
    *,
    far: float | None = None,
    flip: str | None = None,
    detect: bool | None = None,
) -> Verdict:
    """Embed two images (detected and aligned as the model expects, see ``FaceNet.embed``) and decide.

    ``flip`` defaults to the TTA the threshold was calibrated with (``model.threshold_flip``)."""
    cal = model_calibration(model)
    flip = flip or (cal.flip if cal is not None and far is not None else model.threshold_flip)
    emb = embed_images(model, [img1, img2], flip=flip, detect=detect)
    d = float(row_distances(emb[0], emb[1], squared=model.distance == "squared_euclidean"))
    return verdict(model, d, far=far, flip=flip)

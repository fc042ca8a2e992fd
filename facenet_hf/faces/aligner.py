"""The detect -> choose -> warp pipeline a CLI or an embedder calls: :class:`FaceAligner`, :class:`AlignResult`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from PIL import Image

from facenet_hf.faces.align import FACE_SELECTIONS, AlignmentSpec, FaceSelection, choose_faces, warp_face
from facenet_hf.faces.detect import Detector, Face, build_detector
from facenet_hf.validation import choice, integer, number

__all__ = ["ALIGN_STATUSES", "NO_FACE_POLICIES", "AlignResult", "AlignStatus", "FaceAligner", "NoFacePolicy"]

logger = logging.getLogger(__name__)

AlignStatus = Literal["ok", "several_faces", "no_face", "fallback_center", "too_small", "error"]
ALIGN_STATUSES: tuple[str, ...] = get_args(AlignStatus)
NoFacePolicy = Literal["skip", "center_crop"]
NO_FACE_POLICIES: tuple[str, ...] = get_args(NoFacePolicy)


@dataclass
class AlignResult:
    """What became of one image.

    ``status``: ``"ok"`` (one face), ``"several_faces"`` (more than one found; ``chosen`` holds the kept one(s)),
    ``"no_face"`` (no crop), ``"fallback_center"`` (no face; a centre crop was returned, as the policy asks),
    ``"too_small"`` (a side below the aligner's minimum; not detected) or ``"error"`` (could not be decoded).
    ``faces`` are all the detected faces, ``crops`` one RGB image per chosen face (or the fallback crop).
    """

    status: AlignStatus
    reason: str
    faces: list[Face] = field(default_factory=list)
    chosen: list[Face] = field(default_factory=list)
    crops: list[Image.Image] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when there is at least one crop."""
        return bool(self.crops)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no pixels): status, reason, faces, indices of the chosen faces in ``faces``."""
        return {
            "status": self.status,
            "reason": self.reason,
            "faces": [f.to_dict() for f in self.faces],
            "chosen": [self.faces.index(c) for c in self.chosen],
        }


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB via the data layer's converter (alpha on black, 16-bit scaled); imported late, it pulls in datasets."""
    if img.mode == "RGB":
        return img
    from facenet_hf.data.images import to_rgb

    return to_rgb(img)


class FaceAligner:
    """Detects faces in batches, picks one (or all) per image and warps each to an aligned crop.

    ``detector`` None builds MTCNN (on first use; ``kind="lfw_crop"`` never needs one). ``select`` is a
    :func:`~facenet_hf.faces.choose_faces` policy. ``no_face="center_crop"`` returns, for an image without a
    face, the centred square of ``center_crop_fraction`` x its short side resized to ``spec.size``; ``"skip"``
    returns no crop. Images with a side below ``min_image_size`` px are ``"too_small"`` and not detected.
    """

    def __init__(
        self,
        detector: Detector | None = None,
        spec: AlignmentSpec = AlignmentSpec(),  # noqa: B008 (frozen, immutable)
        *,
        select: FaceSelection = "largest",
        no_face: NoFacePolicy = "skip",
        min_image_size: int = 32,
        center_crop_fraction: float = 0.6,
    ) -> None:
        if detector is not None and not isinstance(detector, Detector):
            raise TypeError(
                f"detector must have a name and a detect(images) method, got {type(detector).__name__}"
            )
        if not isinstance(spec, AlignmentSpec):
            raise TypeError(f"spec must be an AlignmentSpec, got {type(spec).__name__}")
        self._detector = detector
        self.spec = spec
        self.select = choice("select", select, FACE_SELECTIONS)
        self.no_face = choice("no_face", no_face, NO_FACE_POLICIES)
        self.min_image_size = integer("min_image_size", min_image_size, lo=1)
        self.center_crop_fraction = number("center_crop_fraction", center_crop_fraction, hi=1.0)
        if not self.center_crop_fraction > 0:
            raise ValueError(f"center_crop_fraction must be in (0, 1], got {center_crop_fraction!r}")

    @property
    def detector(self) -> Detector:
        """The detector (MTCNN built here on first use when none was given)."""
        if self._detector is None:
            self._detector = build_detector("mtcnn")
        return self._detector

    def align(self, images: Sequence[Image.Image]) -> list[AlignResult]:
        """One :class:`AlignResult` per image, in order; all detectable images go to the detector at once."""
        results: list[AlignResult | None] = [None] * len(images)
        todo: list[tuple[int, Image.Image]] = []
        for i, img in enumerate(images):
            if not isinstance(img, Image.Image):
                raise TypeError(f"images[{i}] must be a PIL.Image.Image, got {type(img).__name__}")
            try:
                rgb = _to_rgb(img)
            except (OSError, ValueError) as exc:  # a lazily opened file that fails to decode
                results[i] = AlignResult("error", f"cannot decode the image: {exc}")
                continue
            w, h = rgb.size
            if min(w, h) < self.min_image_size:
                results[i] = AlignResult(
                    "too_small", f"image is {w}x{h}, smaller than {self.min_image_size} px"
                )
            elif self.spec.kind == "lfw_crop":
                results[i] = AlignResult("ok", "lfw_crop: no detection", crops=[self._square(rgb, 1.0)])
            else:
                todo.append((i, rgb))
        if todo:
            detected = self.detector.detect([rgb for _, rgb in todo])
            if len(detected) != len(todo):
                raise RuntimeError(
                    f"detector {self.detector.name!r} returned {len(detected)} results for {len(todo)} images"
                )
            for (i, rgb), faces in zip(todo, detected, strict=True):
                results[i] = self._finish(rgb, list(faces))
        return [r for r in results if r is not None]

    def align_files(
        self, paths: Iterable[str | os.PathLike[str]], *, chunk_size: int = 64
    ) -> list[AlignResult]:
        """:meth:`align` on image files (decoded as the data layer does: EXIF upright, RGB); see :meth:`iter_files`."""
        return [result for _, result in self.iter_files(paths, chunk_size=chunk_size)]

    def iter_files(
        self, paths: Iterable[str | os.PathLike[str]], *, chunk_size: int = 64
    ) -> Iterator[tuple[str, AlignResult]]:
        """``(path, result)`` per file, in order, decoding and detecting ``chunk_size`` files at a time.

        A file that cannot be used (missing, not an image, truncated, ...) gives status ``"error"``.
        """
        from facenet_hf.data.images import BadImageError, load_image

        chunk_size = integer("chunk_size", chunk_size, lo=1)
        chunk: list[tuple[str, Image.Image | AlignResult]] = []

        def flush() -> Iterator[tuple[str, AlignResult]]:
            images = [v for _, v in chunk if isinstance(v, Image.Image)]
            aligned = iter(self.align(images))
            for path, v in chunk:
                yield path, (next(aligned) if isinstance(v, Image.Image) else v)
            chunk.clear()

        for p in paths:
            path = os.fspath(p)
            try:
                chunk.append((path, load_image(path, min_size=1)))
            except BadImageError as exc:
                logger.info("cannot use %s: %s", path, exc.reason)
                chunk.append((path, AlignResult("error", exc.reason)))
            if len(chunk) >= chunk_size:
                yield from flush()
        if chunk:
            yield from flush()

    def _finish(self, rgb: Image.Image, faces: list[Face]) -> AlignResult:
        if not faces:
            min_score = getattr(self.detector, "min_score", None)
            detail = self.detector.name + (f", min score {min_score:g}" if min_score is not None else "")
            if self.no_face == "center_crop":
                crop = self._square(rgb, self.center_crop_fraction)
                return AlignResult("fallback_center", f"no face found ({detail}); centre crop", crops=[crop])
            return AlignResult("no_face", f"no face found ({detail})")
        chosen = choose_faces(faces, rgb.size, self.select)
        try:
            crops = [warp_face(rgb, f.landmarks, self.spec) for f in chosen]
        except ValueError as exc:  # degenerate landmarks (all five points on one spot): listed, never a crash
            return AlignResult("error", f"cannot align the face: {exc}", faces)
        if len(faces) == 1:
            return AlignResult("ok", "one face", faces, chosen, crops)
        kept = f"kept all {len(chosen)}" if self.select == "all" else f"kept the {self.select} one"
        return AlignResult("several_faces", f"{len(faces)} faces found; {kept}", faces, chosen, crops)

    def _square(self, rgb: Image.Image, fraction: float) -> Image.Image:
        """The centred square of ``fraction`` x the short side, resized (once) to ``spec.size``."""
        w, h = rgb.size
        side = max(1, round(fraction * min(w, h)))
        left, top = round((w - side) / 2.0), round((h - side) / 2.0)
        size = self.spec.size
        if side == size and (w, h) == (side, side):
            return rgb.copy()
        return rgb.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))

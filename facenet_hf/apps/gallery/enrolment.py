"""Files in, answers out: the open-set threshold (given, at a false-accept rate, or stored), enrolling images,
folders and embeddings files into a gallery file, identifying query images against it."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

from facenet_hf.apps.gallery.index import Gallery, _complete, _convert
from facenet_hf.apps.gallery.results import EnrolSummary, Identification
from facenet_hf.apps.gallery.store import (
    ENROL_CHUNK,
    GalleryInfo,
    _gallery_path,
    _locked,
    default_flip,
    is_embeddings_file,
)
from facenet_hf.evaluation.embeddings_io import EmbeddingTable, read_table
from facenet_hf.model.calibration import Calibration, model_calibration

logger = logging.getLogger(__name__)


# -- thresholds --------------------------------------------------------------------------------------------------
def expected_fpir(far: float, people: int) -> float:
    """The chance that a stranger is matched to someone in a gallery of ``people`` at a per-comparison false-accept
    rate ``far``, if the comparisons were independent: 1 - (1 - far)^people."""
    return float(-math.expm1(people * math.log1p(-far))) if far < 1 else 1.0


def _warn_flip(calibrated: str | None, used: str | None) -> None:
    if calibrated is not None and used is not None and calibrated != used:
        logger.warning(
            "the threshold was calibrated on flip %r embeddings but the gallery's are flip %r: the false-accept "
            "rate it promises may not hold",
            calibrated,
            used,
        )


def resolve_threshold(
    model: Any = None,
    *,
    threshold: float | None = None,
    far: float | None = None,
    calibration: Calibration | None = None,
    distance: str = "squared_euclidean",
    flip: str | None = None,
) -> tuple[float, str]:
    """The open-set threshold, in ``distance`` (the gallery's), and where it came from: ``threshold`` as given;
    else the calibration's (``calibration`` or the model's) threshold at false-accept rate ``far``; else the
    model's stored threshold. ``flip``: the gallery's flip mode; a threshold calibrated with another one is
    used with a warning. Raises ``ValueError`` when none of them is available."""
    if threshold is not None:
        if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
            raise ValueError(f"threshold must be a finite distance >= 0, got {threshold!r}")
        return float(threshold), "given"
    if far is not None:
        cal = (
            calibration
            if calibration is not None
            else (model_calibration(model) if model is not None else None)
        )
        if cal is None:
            raise ValueError(
                "a threshold at a false-accept rate needs the model's calibration, and "
                + ("no model was given" if model is None else "this model has none")
                + ": fit one with `facenet-hf calibrate MODEL_DIR --lfw-dir ... --pairs ...`, or give --threshold"
            )
        _warn_flip(cal.flip, flip)
        return float(_convert(cal.threshold_at_far(far), cal.distance, distance)), f"far={far:g}"
    if model is not None and getattr(model, "threshold", None) is not None:
        _warn_flip(getattr(model, "threshold_flip", None), flip)
        return float(_convert(float(model.threshold), model.distance, distance)), "stored"
    raise ValueError(
        "no threshold for open-set identification: "
        + ("the model has no calibrated threshold" if model is not None else "no model was given")
        + "; give one (--threshold T), a false-accept rate with a calibrated model (--far 1e-3), or search the "
        "closed set (--closed-set)"
    )


# -- files in, answers out ------------------------------------------------------------------------------------
def _embed_sources(
    model: Any,
    sources: Sequence[str],
    *,
    flip: str,
    detect: bool | None,
    faces: str,
    identity: str | None,
    batch_size: int,
    progress: bool,
    need_identity: bool,
) -> tuple[EmbeddingTable, list[tuple[str, str]]]:
    from tqdm.auto import tqdm

    from facenet_hf.apps.embed_folder import EmbedItem, collect_items, embed_items

    items = collect_items(list(sources))
    if identity is not None:
        items = [EmbedItem(i.key, i.image, identity) for i in items]
    if need_identity:
        missing = [i.key for i in items if not i.identity]
        if missing:
            raise ValueError(
                f"no person for {len(missing)} image(s), e.g. {missing[0]}: enrol a folder of people "
                "(Person/img.jpg), an embeddings file with an 'identity' column, or name the person (--identity NAME)"
            )
    tables, failures = [], []
    with tqdm(total=len(items), desc="embedding", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(items), ENROL_CHUNK):
            chunk = items[start : start + ENROL_CHUNK]
            table, bad = embed_items(
                model, chunk, flip=flip, detect=detect, faces=faces, batch_size=batch_size
            )
            tables.append(table)
            failures += bad
            bar.update(len(chunk))
    return EmbeddingTable.concat(tables), failures


def _named(table: EmbeddingTable, identity: str | None) -> EmbeddingTable:
    """``table`` with every row given to ``identity`` (unchanged when None)."""
    if identity is None:
        return table
    return EmbeddingTable(
        table.paths, table.embeddings, [identity] * len(table), table.face_index, table.boxes
    )


def enrol(
    gallery_path: str | os.PathLike,
    sources: str | os.PathLike | EmbeddingTable | Sequence[str | os.PathLike | EmbeddingTable],
    *,
    model: Any = None,
    model_id: str | None = None,
    identity: str | None = None,
    flip: str | None = None,
    detect: bool | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> EnrolSummary:
    """Append people to the gallery file ``gallery_path`` (created if missing); see the module doc.

    ``sources``: folders of people (``Person/img.jpg``), images or image folders with ``identity`` (one person
    for all), embeddings files (``.parquet`` with an ``identity`` column, ``.npz`` with ``identity``) or
    :class:`~facenet_hf.evaluation.EmbeddingTable`\\ s. Images need ``model``: they are detected and aligned as
    it expects (``detect``), with ``flip`` (default: the gallery's, else :func:`default_flip`); the largest face
    of each image is enrolled; images that cannot be used are listed in ``failures`` (they stop nothing). A
    model given is checked against the gallery's (:meth:`Gallery.check_model`) and recorded when the gallery
    did not know its model. Raises ``ValueError`` when nothing can be enrolled."""
    path = _gallery_path(gallery_path)
    if isinstance(sources, (str, os.PathLike, EmbeddingTable)):
        sources = [sources]
    sources = list(sources)
    if not sources:
        raise ValueError("nothing to enrol: give at least one source")
    if identity is not None and not str(identity).strip():
        raise ValueError("identity must be a non-empty name")
    with _locked(path):
        gallery = Gallery.load(path) if path.exists() else None
        if model is not None:
            if gallery is not None:
                gallery.check_model(model, flip=flip)
            flip = flip or (gallery.info.flip if gallery is not None else None) or default_flip(model)
            if gallery is None:
                gallery = Gallery(GalleryInfo.for_model(model, flip=flip, model_id=model_id))
            else:
                gallery.fill_info(model, flip=flip, model_id=model_id)
        parts: list[tuple[str, EmbeddingTable]] = []
        failures: list[tuple[str, str]] = []
        images: list[str] = []
        for src in sources:
            if isinstance(src, EmbeddingTable):
                parts.append(("<table>", _named(src, identity)))
            elif is_embeddings_file(src):
                parts.append((os.fspath(src), _named(read_table(src), identity)))
            else:
                images.append(os.fspath(src))
        if images:
            if model is None:
                known = gallery is not None and gallery.info.model_id
                hint = f" (the gallery was enrolled with {gallery.info.model_id})" if known else ""
                raise ValueError(
                    f"{images[0]} holds images, which need a model to embed them: pass model= (--model MODEL){hint}"
                )
            table, failures = _embed_sources(
                model,
                images,
                flip=flip,
                detect=detect,
                faces="largest",
                identity=identity,
                batch_size=batch_size,
                progress=progress,
                need_identity=True,
            )
            parts.append((", ".join(images), table))
        if gallery is None:
            first = next((t for _, t in parts if len(t)), None)
            if first is None:
                raise ValueError(f"nothing to enrol: {[w for w, _ in parts]} hold no rows")
            gallery = Gallery(GalleryInfo(dim=first.dim, flip=flip, model_id=model_id))
        for where, table in parts:
            gallery.check_table(table, where)
        rows = [_complete(t) for _, t in parts if len(t)]
        if not rows:
            example = f", e.g. {failures[0][0]}: {failures[0][1]}" if failures else ""
            raise ValueError(f"nothing to enrol: no image of {[w for w, _ in parts]} could be used{example}")
        summary = gallery.add(EmbeddingTable.concat(rows), source=", ".join(w for w, _ in parts))
        if summary.added:
            gallery.save(path)
    summary.gallery = path
    summary.failures = failures
    return summary


def load_queries(
    sources: Sequence[str | os.PathLike],
    gallery: Gallery,
    *,
    model: Any = None,
    flip: str | None = None,
    detect: bool | None = None,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[EmbeddingTable, list[tuple[str, str]]]:
    """The queries of ``sources`` as one table: embeddings files as they are (checked against the gallery's
    dimension, the message naming the file), images embedded by ``model`` (every detected face of a photo is a
    query; a people folder gives each query its identity, for evaluation). Returns the table and the images
    that could not be used, with the reason (unreadable, no face)."""
    parts: list[EmbeddingTable] = []
    images: list[str] = []
    for src in sources:
        text = os.fspath(src)
        if is_embeddings_file(text):
            table = read_table(text)
            gallery.check_queries(table.embeddings, where=text)
            parts.append(table)
        else:
            images.append(text)
    failures: list[tuple[str, str]] = []
    if images:
        if model is None:
            raise ValueError(
                f"{images[0]} holds images, which need a model to embed them: pass model= (--model MODEL)"
            )
        gallery.check_model(model, flip=flip)
        flip = flip or gallery.info.flip or default_flip(model)
        table, failures = _embed_sources(
            model,
            images,
            flip=flip,
            detect=detect,
            faces="auto",
            identity=None,
            batch_size=batch_size,
            progress=progress,
            need_identity=False,
        )
        parts.append(table)
    if not parts:
        raise ValueError("no queries: give images, folders or embeddings files")
    table = EmbeddingTable.concat(parts)
    if len(table):
        gallery.check_queries(table.embeddings, where=", ".join(os.fspath(s) for s in sources))
    return table, failures


def identify_images(
    gallery: Gallery,
    model: Any,
    images: Any,
    k: int = 5,
    *,
    threshold: float | None = None,
    far: float | None = None,
    closed_set: bool = False,
    flip: str | None = None,
    detect: bool | None = None,
    backend: str = "exact",
) -> list[Identification]:
    """Embed ``images`` (paths or PIL images; the largest face of each, as ``FaceNet.embed``: an image without a
    face raises :class:`~facenet_hf.model.NoFaceError` naming it) and identify them in ``gallery``.

    The threshold: ``threshold``, else the model's calibration at ``far``, else its stored threshold (see
    :func:`resolve_threshold`); ``closed_set=True`` never answers unknown."""
    from PIL import Image

    from facenet_hf.model.inference import embed_images

    gallery.check_model(model, flip=flip)
    flip = flip or gallery.info.flip or default_flip(model)
    thr = None
    if not closed_set:
        thr, _ = resolve_threshold(
            model, threshold=threshold, far=far, distance=gallery.info.distance, flip=flip
        )
    images = [images] if isinstance(images, (str, os.PathLike, Image.Image)) else list(images)
    emb = embed_images(model, images, flip=flip, detect=detect)
    names = [
        os.fspath(i) if isinstance(i, (str, os.PathLike)) else f"image {n}" for n, i in enumerate(images)
    ]
    return gallery.identify(
        emb, k, threshold=thr, calibration=model_calibration(model), names=names, backend=backend
    )

"""Embed images, photo folders, people folders or any dataset source into an embeddings table (parquet).

Rows are images (or, when faces are detected, one row per face with its index and box). Work is done in chunks;
each finished chunk is a part file beside the output, so a killed run resumes where it stopped and a finished run
can be extended with new files (only what is not in the table yet is embedded). A file that cannot be used (not
an image, truncated, no face) is listed with its reason in ``<out>.failures.csv``; it never stops the run.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from facenet_hf.data.images import BadImageError, load_image
from facenet_hf.evaluation.embeddings_io import EmbeddingTable, read_table, read_table_metadata, write_table
from facenet_hf.faces import FaceAligner, build_detector
from facenet_hf.faces.tree import list_images
from facenet_hf.fileio import atomic_path
from facenet_hf.model.inference import (
    DETECT_MIN_SCORE,
    flip_embed,
    is_channels_last,
    model_spec,
    model_transform,
)

__all__ = [
    "FACE_CHOICES",
    "DatasetRow",
    "EmbedItem",
    "EmbedSummary",
    "collect_items",
    "embed_items",
    "embed_sources",
]

logger = logging.getLogger(__name__)

FACE_CHOICES = ("auto", "all", "largest", "central")
FAILURE_COLUMNS = ("path", "reason")


@dataclass(frozen=True)
class DatasetRow:
    """Row ``index`` of a dataset's (undecoded) ``image`` column, read when it is embedded: a parquet file or Hub
    dataset of millions of images is never held in memory (Arrow memory-maps it), only the chunk being embedded."""

    dataset: Any
    index: int

    def read(self) -> Any:
        """The row's ``{"bytes", "path"}`` (what :func:`load_image` reads)."""
        return self.dataset[self.index]["image"]


@dataclass(frozen=True)
class EmbedItem:
    """One image to embed: ``key`` names it in the table (a path), ``image`` is what :func:`load_image` reads
    (a path, a ``{"bytes", "path"}`` row) or a :class:`DatasetRow` read on use, ``identity`` the person when
    the source says."""

    key: str
    image: Any
    identity: str | None = None


@dataclass
class EmbedSummary:
    """What a run did: rows in the table, images embedded now, skipped (already there), failed."""

    out: Path
    rows: int
    embedded: int
    skipped: int
    failed: int
    failures_path: Path | None
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "rows": self.rows,
            "embedded": self.embedded,
            "skipped": self.skipped,
            "failed": self.failed,
            "failures_path": None if self.failures_path is None else str(self.failures_path),
        }


# -- what to embed --------------------------------------------------------------------------------------------
def collect_items(sources: Sequence[str | os.PathLike], *, identities: str = "auto") -> list[EmbedItem]:
    """The images of ``sources``: image files, folders (a people layout ``Person/img.jpg`` gives identities; any
    other folder is walked for images), parquet files or Hub datasets (through ``load_source``).

    ``identities``: ``auto`` (from the source's layout or label column), ``none`` (never). Raises
    ``FileNotFoundError`` for a missing source and ``ValueError`` for a source with no image."""
    from facenet_hf.data.sources import SourceError, load_source

    if identities not in ("auto", "none"):
        raise ValueError(f"identities must be 'auto' or 'none', got {identities!r}")
    items: list[EmbedItem] = []
    for src in sources:
        text = os.fspath(src)
        path = Path(text)
        if path.is_file() and not text.endswith(".parquet"):
            items.append(EmbedItem(text, text))
            continue
        found: list[EmbedItem] | None = None
        if path.is_dir():
            try:
                ds = load_source(path)
            except SourceError:
                files = list_images(path)
                found = [EmbedItem(str(path / f), str(path / f)) for f in files]
            else:
                found = _dataset_items(ds, text, identities, root=path)
        elif path.exists() or text.endswith(".parquet") or "/" in text:
            found = _dataset_items(load_source(text), text, identities)
        else:
            raise FileNotFoundError(f"{text}: no such image, folder or dataset")
        if not found:
            raise ValueError(f"{text} holds no image (looked for .jpg/.jpeg/.png/.bmp/.webp files)")
        items += found
    if identities == "none":
        items = [EmbedItem(i.key, i.image) for i in items]
    unique: dict[str, EmbedItem] = {}
    for item in items:  # a file named twice (a folder and a file in it) is embedded once
        unique.setdefault(item.key, item)
    return list(unique.values())


def _dataset_items(ds, text: str, identities: str, root: Path | None = None) -> list[EmbedItem]:
    """Items of a loaded source; a folder's relative paths are joined to the folder (so the table's paths open)."""
    undecoded = ds.with_format(None).cast_column("image", _undecoded(ds))
    paths = ds["path"] if "path" in ds.column_names else [None] * len(ds)
    if any(p is None for p in paths):  # the image column's own paths: read that field alone, not the bytes
        image_paths: list[str | None] = []
        for batch in undecoded.select_columns(["image"]).with_format("arrow").iter(batch_size=4096):
            col = batch.column("image")  # {bytes, path} structs; memory-mapped, one batch at a time
            image_paths += (
                col.combine_chunks().field("path").to_pylist() if col.type.num_fields else [None] * len(col)
            )
        paths = [p if p is not None else q for p, q in zip(paths, image_paths, strict=True)]
    names = ds["identity"] if identities == "auto" and "identity" in ds.column_names else [None] * len(ds)
    out = []
    for i, (p, name) in enumerate(zip(paths, names, strict=True)):
        img = DatasetRow(undecoded, i)
        key = p or f"{text}#row{i}"
        if root is not None and not os.path.isabs(key):
            key = str(root / key)
        out.append(EmbedItem(str(key), img, None if name is None else str(name)))
    return out


def _undecoded(ds):
    import datasets

    return (
        datasets.Image(decode=False)
        if isinstance(ds.features.get("image"), datasets.Image)
        else ds.features["image"]
    )


# -- embedding --------------------------------------------------------------------------------------------------
def _batches(seq: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def _embed_pixels(model, tensors: list[torch.Tensor], flip: str, batch_size: int) -> np.ndarray:
    device = next(model.parameters()).device
    channels_last = is_channels_last(model)
    out = []
    with torch.inference_mode():
        for chunk in _batches(tensors, batch_size):
            x = torch.stack(list(chunk)).to(device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            out.append(flip_embed(model, x, flip).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def embed_items(
    model,
    items: Sequence[EmbedItem],
    *,
    flip: str = "off",
    detect: bool | None = None,
    faces: str = "auto",
    batch_size: int = 64,
    aligner: FaceAligner | None = None,
) -> tuple[EmbeddingTable, list[tuple[str, str]]]:
    """Embed ``items``; returns the table (rows in item order; per face with detection) and the failures.

    ``detect`` as in ``FaceNet.embed`` (None: as the model was trained). ``faces``: which detected faces become
    rows: ``all``, ``largest``, ``central`` or ``auto`` (largest when the items carry identities, else all)."""
    if faces not in FACE_CHOICES:
        raise ValueError(f"faces must be one of {list(FACE_CHOICES)}, got {faces!r}")
    transform = model_transform(model)
    spec = model_spec(model, detect)
    if spec is not None and aligner is None:
        aligner = _aligner(model, spec, faces, items)
    failures: list[tuple[str, str]] = []
    keys: list[str] = []
    idents: list[str | None] = []
    index: list[int] = []
    boxes: list[tuple[float, ...]] = []
    tensors: list[torch.Tensor] = []
    for group in _batches(items, batch_size):  # decoded photos are large: hold one batch of them at a time
        decoded = []
        for item in group:
            try:
                image = item.image.read() if isinstance(item.image, DatasetRow) else item.image
                decoded.append((item, load_image(image)))
            except BadImageError as e:
                failures.append((item.key, e.reason))
        if spec is None:
            for item, img in decoded:
                keys.append(item.key)
                idents.append(item.identity)
                tensors.append(transform(img))
            continue
        for (item, _), result in zip(decoded, aligner.align([img for _, img in decoded]), strict=True):
            if not result.crops:
                failures.append((item.key, f"no face ({result.reason})"))
                continue
            for face, crop in zip(result.chosen, result.crops, strict=True):
                keys.append(item.key)
                idents.append(item.identity)
                index.append(result.faces.index(face))
                boxes.append(face.box)
                tensors.append(transform(crop))
    was_training = model.training
    model.eval()
    try:
        emb = _embed_pixels(model, tensors, flip, batch_size)
    finally:
        model.train(was_training)
    dim = model.embedding_dim * (2 if flip == "concat" else 1)
    table = EmbeddingTable(
        keys,
        emb.reshape(len(keys), dim) if keys else np.zeros((0, dim), np.float32),
        idents,
        None if spec is None else np.asarray(index, dtype=np.int32),
        None if spec is None else np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
    )
    return table, failures


def _aligner(model, spec, faces: str, items: Sequence[EmbedItem]) -> FaceAligner:
    device = next(model.parameters()).device
    select = faces if faces != "auto" else ("largest" if any(i.identity for i in items) else "all")
    return FaceAligner(
        build_detector("mtcnn", device=device, min_score=DETECT_MIN_SCORE), spec, select=select
    )


# -- a resumable run ---------------------------------------------------------------------------------------------
def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def failures_path(out: Path) -> Path:
    """Where the failures of an embedding run into ``out`` are listed."""
    return out.with_name(out.stem + ".failures.csv")


def _read_failures(*paths: Path) -> list[tuple[str, str]]:
    """The failures listed in these files, one per path (the last reason wins)."""
    out: dict[str, str] = {}
    for path in paths:
        if path.is_file():
            with path.open(newline="") as f:
                rows = csv.DictReader(f)
                out.update(
                    (r["path"], r["reason"]) for r in rows if r.get("path") and r.get("reason") is not None
                )
    return list(out.items())


def _write_failures(path: Path, rows: Sequence[tuple[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(FAILURE_COLUMNS)
        w.writerows(rows)


def _check_same_embedder(path: Path, meta: dict) -> None:
    """Refuse to extend a table made by another model or flip mode (its vectors would not compare)."""
    made = read_table_metadata(path)
    if not made:
        return
    if made.get("model_fingerprint") != meta["model_fingerprint"] or made.get("flip") != meta["flip"]:
        raise ValueError(
            f"{path} was made by another model or flip mode (flip {made.get('flip')!r}, model "
            f"{str(made.get('model_fingerprint'))[:19]}...; now flip {meta['flip']!r}, model "
            f"{meta['model_fingerprint'][:19]}...): its vectors would not compare with this run's; write a new file"
        )


def embed_sources(
    model,
    sources: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    flip: str = "off",
    detect: bool | None = None,
    faces: str = "auto",
    identities: str = "auto",
    batch_size: int = 64,
    chunk_size: int = 256,
    resume: bool = True,
    retry_failed: bool = False,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> EmbedSummary:
    """Embed every image of ``sources`` into the parquet table ``out`` (see the module doc).

    ``resume``: keep what ``out`` (or an interrupted run's part files) already holds and embed only the rest;
    False refuses an existing ``out``. Failures of earlier runs are skipped unless ``retry_failed``.
    ``on_chunk(n_done)`` is called after each chunk is safely on disk."""
    out = Path(out)
    if out.suffix.lower() != ".parquet":
        raise ValueError(f"the embeddings file must end in .parquet, got {out}")
    parts = _parts_dir(out)
    fail_file = failures_path(out)
    if not resume and (out.exists() or parts.exists()):
        raise FileExistsError(f"{out} (or its part files) exists: resume it, or choose another output file")
    items = collect_items(sources, identities=identities)
    from facenet_hf.apps.gallery import model_fingerprint

    meta = {"model_fingerprint": model_fingerprint(model), "flip": flip, "detect": detect}
    tables: list[EmbeddingTable] = []
    part_files = sorted(parts.glob("part-*.parquet")) if parts.is_dir() else []
    for earlier in ([out] if out.is_file() else []) + part_files:
        _check_same_embedder(earlier, meta)
    if out.is_file():
        tables.append(read_table(out))
    in_out = set(tables[0].paths) if tables else set()
    for p in (
        part_files
    ):  # a run killed after writing `out` but before removing its parts: those rows are in `out`
        part = read_table(p)
        tables.append(part.select([j for j, key in enumerate(part.paths) if key not in in_out]))
    failures = _read_failures(fail_file, parts / "failures.csv")
    done = {p for t in tables for p in t.paths}
    if not retry_failed:
        done |= {p for p, _ in failures}
    else:
        failures = []
    todo = [i for i in items if i.key not in done]
    if tables and todo:
        dims = {t.dim for t in tables if len(t)}
        want = model.embedding_dim * (2 if flip == "concat" else 1)
        if dims and dims != {want}:
            raise ValueError(
                f"{out} holds {dims.pop()}-d embeddings but this model (flip {flip!r}) makes {want}-d ones: "
                "extend a table only with the model that made it, or write a new file"
            )
    parts.mkdir(parents=True, exist_ok=True)
    next_part = len(part_files)
    spec = model_spec(model, detect)
    aligner = _aligner(model, spec, faces, items) if spec is not None and todo else None
    embedded = 0
    bar = tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress, leave=False)
    for chunk in _batches(todo, chunk_size):
        table, bad = embed_items(
            model, chunk, flip=flip, detect=detect, faces=faces, batch_size=batch_size, aligner=aligner
        )
        part = parts / f"part-{next_part:05d}.parquet"
        write_table(part, table, metadata=meta)
        next_part += 1
        tables.append(table)
        failures += bad
        _write_failures(parts / "failures.csv", failures)
        embedded += len(chunk) - len(bad)
        bar.update(len(chunk))
        if on_chunk is not None:
            on_chunk(embedded)
    bar.close()
    merged = EmbeddingTable.concat(tables) if tables else None
    if failures:
        _write_failures(fail_file, failures)
    elif fail_file.exists():
        fail_file.unlink()
    if merged is None:
        raise ValueError(
            f"nothing to write: every image of {list(map(str, sources))} failed (see {fail_file})"
        )
    write_table(out, merged, metadata=meta)
    shutil.rmtree(parts, ignore_errors=True)
    if failures:
        logger.warning(
            "%d image(s) not embedded, listed in %s; e.g. %s (%s)", len(failures), fail_file, *failures[0]
        )
    return EmbedSummary(
        out=out,
        rows=len(merged),
        embedded=embedded,
        skipped=len(items) - len(todo),
        failed=len(failures),
        failures_path=fail_file if failures else None,
        failures=failures,
    )

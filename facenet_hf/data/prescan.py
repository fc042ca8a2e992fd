"""Pre-scan a training set for unusable images before training, and drop them.

A bad file found while training costs a zero image in a batch (``BatchTransform``'s skip policy); found before
training it costs nothing: :func:`scan_images` checks every row with :func:`facenet_hf.data.images.check_image`
(``decode=False``: header, size limits and PIL's ``verify()``, about 0.1 ms a file; ``decode=True``: the full
decode, which also catches truncated JPEGs, about 1 ms for a 250x250 JPEG), in a thread pool (PIL releases the
GIL while decoding). :func:`prescan_dataset` then applies the bad-image policy: ``"error"`` stops at the first
bad file (path + reason), ``"skip"`` drops the bad rows (labels re-densified) unless more than
``max_bad_fraction`` of the files are bad, which is refused with a summary (the data is probably not what the
config points to).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import datasets
import numpy as np
from tqdm.auto import tqdm

from facenet_hf.constants import PRESCAN_MODES
from facenet_hf.data.images import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIZE,
    BadImageError,
    check_image,
    describe_source,
)
from facenet_hf.data.sources import arrow_column, keep_rows

__all__ = [
    "PRESCAN_MODES",
    "TooManyBadImagesError",
    "drop_rows",
    "prescan_dataset",
    "scan_files",
    "scan_images",
]

_BLOCK = 2048  # rows read from Arrow (and checked) at a time: bounded memory for parquet sources with bytes


class TooManyBadImagesError(ValueError):
    """More than ``max_bad_fraction`` of a dataset's files are unusable; the message summarises the reasons."""


def scan_images(
    ds: datasets.Dataset,
    *,
    decode: bool,
    num_workers: int,
    progress: bool,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> list[tuple[int, str, str]]:
    """``(row index, path, reason)`` of every unusable image of ``ds`` (its ``image`` column), by row index.

    ``path`` is the name :class:`~facenet_hf.data.images.BadImageError` would use (the file's path), or
    ``"<bytes, row N>"`` for an image stored as bytes without a path. ``num_workers`` threads check the files
    (0: in the calling thread). No image is kept in memory; ``progress`` shows a tqdm bar on stderr.
    """
    if "image" not in ds.column_names:
        raise KeyError(
            f"dataset has no 'image' column (columns: {ds.column_names}); load it with load_source()"
        )
    column = arrow_column(ds, "image")

    def blocks() -> Iterable[list[Any]]:
        for start in range(0, len(column), _BLOCK):
            yield column.slice(start, _BLOCK).to_pylist()

    return _scan(blocks(), len(column), decode, num_workers, progress, max_pixels, min_size)


def scan_files(
    paths: Sequence[str | os.PathLike],
    *,
    decode: bool,
    num_workers: int = 0,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> list[tuple[int, str, str]]:
    """:func:`scan_images` for a list of file paths: ``(position, path, reason)`` of the unusable ones."""
    paths = [os.fspath(p) for p in paths]
    blocks = (paths[i : i + _BLOCK] for i in range(0, len(paths), _BLOCK))
    return _scan(blocks, len(paths), decode, num_workers, progress, max_pixels, min_size)


def _scan(
    blocks: Iterable[list[Any]],
    total: int,
    decode: bool,
    num_workers: int,
    progress: bool,
    max_pixels: int,
    min_size: int,
) -> list[tuple[int, str, str]]:
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be an int >= 0, got {num_workers!r}")

    def check(obj: Any) -> str | None:
        return check_image(obj, max_pixels=max_pixels, min_size=min_size, decode=decode)

    found: list[tuple[int, str, str]] = []
    desc = "pre-scanning images (decode)" if decode else "pre-scanning images"
    pool = ThreadPoolExecutor(num_workers) if num_workers > 0 else None
    mapper: Callable[[Callable[[Any], str | None], list[Any]], Iterable[str | None]] = (
        pool.map if pool is not None else map
    )
    try:
        with tqdm(total=total, desc=desc, unit="img", disable=not progress, leave=False) as bar:
            offset = 0
            for block in blocks:
                for i, (obj, reason) in enumerate(zip(block, mapper(check, block), strict=True)):
                    if reason is not None:
                        found.append((offset + i, _name(obj, offset + i), reason))
                offset += len(block)
                bar.update(len(block))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    return found


def _name(obj: Any, row: int) -> str:
    name = describe_source(obj)
    return f"<bytes, row {row}>" if name == "<bytes>" else name


def drop_rows(ds: datasets.Dataset, rows: Iterable[int]) -> datasets.Dataset:
    """``ds`` without ``rows``; ``label`` re-densified to ``0..C'-1`` if an identity lost all its images.

    Arrow ``select`` + relabel through :func:`facenet_hf.data.sources.keep_rows` (no image read).
    """
    drop = np.zeros(len(ds), dtype=bool)
    drop[np.fromiter(rows, dtype=np.int64)] = True
    if not drop.any():
        return ds
    keep = np.flatnonzero(~drop)
    if keep.size == 0:
        raise ValueError(f"dropping the bad rows leaves no training rows (all {len(ds)} are bad)")
    return keep_rows(ds, keep, tag=f"prescan-{int(drop.sum())}")


def prescan_dataset(
    ds: datasets.Dataset,
    *,
    mode: str,
    policy: str,
    max_bad_fraction: float,
    num_workers: int = 0,
    progress: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: int = DEFAULT_MIN_SIZE,
) -> tuple[datasets.Dataset, list[tuple[int, str, str]]]:
    """Scan ``ds`` (``mode`` = off | header | decode) and apply the bad-image ``policy`` (skip | error).

    Returns ``(ds without the bad rows, [(row, path, reason), ...])``. Raises
    :class:`~facenet_hf.data.images.BadImageError` naming the first bad file with ``policy="error"``, and
    :class:`TooManyBadImagesError` when more than ``max_bad_fraction`` of the rows are bad.
    """
    if mode not in PRESCAN_MODES:
        raise ValueError(f"prescan mode must be one of {list(PRESCAN_MODES)}, got {mode!r}")
    if mode == "off" or len(ds) == 0:
        return ds, []
    bad = scan_images(
        ds,
        decode=mode == "decode",
        num_workers=num_workers,
        progress=progress,
        max_pixels=max_pixels,
        min_size=min_size,
    )
    if not bad:
        return ds, []
    if policy == "error":
        _, path, reason = bad[0]
        raise BadImageError(
            path,
            f"{reason} [found by the pre-scan, {len(bad)} unusable file(s) in all; data.bad_images=skip "
            "leaves them out of training]",
        )
    if len(bad) > max_bad_fraction * len(ds):
        raise TooManyBadImagesError(summarize(bad, len(ds), max_bad_fraction))
    return drop_rows(ds, (row for row, _, _ in bad)), bad


def summarize(bad: Sequence[tuple[int, str, str]], total: int, max_bad_fraction: float) -> str:
    """One paragraph: how many files are bad, the commonest reasons, the first examples, what to do."""
    kinds = Counter(_kind(reason) for _, _, reason in bad)
    reasons = "; ".join(f"{n} x {kind}" for kind, n in kinds.most_common(5))
    examples = "; ".join(f"{path}: {reason}" for _, path, reason in bad[:3])
    return (
        f"{len(bad)} of {total} training images ({100 * len(bad) / total:.1f}%) are unusable, more than "
        f"data.max_bad_fraction={max_bad_fraction:g}: the data is probably not what the config points to. "
        f"Reasons: {reasons}. First: {examples}. Check data.train_source / data.lfw_dir, repair or remove the "
        "files (facenet_hf.data.prescan.scan_images lists them all), or raise data.max_bad_fraction"
    )


def _kind(reason: str) -> str:
    """A reason without its file-specific details (the part before the first parenthesis or colon)."""
    for sep in (" (", ": ", "; "):
        reason = reason.split(sep, 1)[0]
    return reason.strip()

"""Pack an image source into parquet shards (image bytes + identity), so that a training run on millions of files
opens a few hundred shards instead of listing and stat-ing every file on every start.

``pack_source(src, dst)`` reads any source :func:`~facenet_hf.data.sources.load_source` reads (an aligned
``Identity/image`` tree from ``facenet-hf align``, a labels-file folder, parquet) in its sorted order and writes
``dst/train-KKKKK-of-NNNNN.parquet`` with columns ``image`` (``{bytes, path}``), ``label`` (the identity name) and
``path``; ``load_source(dst)`` reads them back as the same identities and files. The plan is deterministic (row
``r`` goes to shard ``r // rows_per_shard``), so several processes or machines split the work with
``shard=(i, n)`` (process ``i`` writes shards ``k`` with ``k % n == i``), and a killed run resumes: finished shard
files (written atomically) are skipped. ``resize`` re-encodes images whose short side is larger (JPEG), which
pre-resizes the shards when decoding full-size images would starve the GPUs (docs/scaling.md); files that cannot
be decoded then are listed in ``pack_failures-i-of-n.csv``, never packed, and never stop the run.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from facenet_hf.fileio import atomic_path, atomic_write_text

__all__ = ["PACK_SCHEMA", "PackReport", "pack_source", "shard_name", "shrink_image"]

logger = logging.getLogger(__name__)

PACK_SCHEMA = pa.schema(
    [
        pa.field("image", pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])),
        pa.field("label", pa.string()),
        pa.field("path", pa.string()),
    ]
)


@dataclass
class PackReport:
    """What one worker did: the plan (rows, shards) and its share (written now, skipped as done, failures)."""

    dst: str
    rows: int
    identities: int
    shards: int
    worker: tuple[int, int]
    written: list[str]
    skipped: list[str]
    failed: int
    bytes_written: int

    def to_dict(self) -> dict:
        return asdict(self)


def shard_name(k: int, n: int) -> str:
    """``train-00003-of-00017.parquet``: the name ``datasets`` recognises as a split's shard."""
    return f"train-{k:05d}-of-{n:05d}.parquet"


def _read_bytes(image: dict) -> bytes:
    if image.get("bytes") is not None:
        return image["bytes"]
    with open(image["path"], "rb") as f:
        return f.read()


def shrink_image(data: bytes, size: int, quality: int, source: str) -> bytes:
    """JPEG bytes with the short side at most ``size`` (unchanged bytes when already small enough)."""
    from facenet_hf.data.images import load_image

    img = load_image(data if data else source)
    short = min(img.size)
    if short <= size:
        return data
    scale = size / short
    img = img.resize(
        (max(1, round(img.width * scale)), max(1, round(img.height * scale))), resample=3
    )  # bicubic
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def pack_source(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    rows_per_shard: int = 10_000,
    shard: tuple[int, int] = (0, 1),
    resize: int | None = None,
    quality: int = 90,
    labels_file: str | os.PathLike | None = None,
    on_row: Callable[[int], None] | None = None,
) -> PackReport:
    """Pack ``src`` into parquet shards in ``dst`` (see the module doc); returns this worker's :class:`PackReport`.

    ``on_row(n)`` is called after each finished shard with the rows packed so far (a progress hook)."""
    from facenet_hf.data.images import BadImageError
    from facenet_hf.data.sources import load_source

    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and 0 <= i < n):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if resize is not None and resize < 16:
        raise ValueError(f"resize must be None or a short side of at least 16 px, got {resize}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality}")
    src_path, out = Path(src), Path(dst)
    if out.resolve() == src_path.resolve():
        raise ValueError(f"the destination {out} is the source: pack into another folder")
    ds = load_source(src) if labels_file is None else _labels_source(src, labels_file)
    rows = len(ds)
    if rows == 0:
        raise ValueError(f"{src} holds no image to pack")
    n_shards = math.ceil(rows / rows_per_shard)
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "source": os.fspath(src),
        "rows": rows,
        "identities": len(set(ds["identity"])),
        "shards": n_shards,
        "rows_per_shard": rows_per_shard,
        "resize": resize,
        "quality": quality if resize else None,
        "columns": PACK_SCHEMA.names,
    }
    meta = out / "pack.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if {k: old.get(k) for k in plan} != plan:
            raise ValueError(
                f"{out} was packed with another plan ({meta}: {old}); pack into an empty folder, or remove it"
            )
    else:
        atomic_write_text(meta, json.dumps(plan, indent=2))
    alignment = src_path / "alignment.json"
    if alignment.is_file() and not (out / "alignment.json").exists():
        shutil.copyfile(alignment, out / "alignment.json")  # the aligned faces' spec travels with them

    written, skipped, failures, size, done_rows = [], [], [], 0, 0
    images = ds.with_format(None)
    for k in range(i, n_shards, n):
        name = shard_name(k, n_shards)
        target = out / name
        if target.is_file():
            skipped.append(name)
            continue
        lo, hi = k * rows_per_shard, min(rows, (k + 1) * rows_per_shard)
        part = images.select(range(lo, hi))
        blobs, labels, paths = [], [], []
        for row in part:
            image, rel = row["image"], row["path"] or row["image"].get("path") or ""
            try:
                data = _read_bytes(image)
                if resize is not None:
                    data = shrink_image(data, resize, quality, image.get("path") or rel)
            except (OSError, BadImageError) as e:
                failures.append((rel, getattr(e, "reason", None) or str(e)))
                continue
            blobs.append({"bytes": data, "path": rel})
            labels.append(row["identity"])
            paths.append(rel)
        table = pa.table(
            {"image": pa.array(blobs, PACK_SCHEMA.field("image").type), "label": labels, "path": paths},
            schema=PACK_SCHEMA,
        )
        with atomic_path(target) as tmp:
            # dictionary-encoding only the identities: image bytes are unique, paths nearly so
            pq.write_table(table, tmp, row_group_size=1024, use_dictionary=["label"])
        size += target.stat().st_size
        written.append(name)
        done_rows += hi - lo
        if on_row is not None:
            on_row(done_rows)
    if failures:
        fail_file = out / f"pack_failures-{i}-of-{n}.csv"
        with atomic_path(fail_file) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path", "reason"])
            w.writerows(failures)
        logger.warning(
            "%d file(s) not packed (listed in %s), e.g. %s: %s", len(failures), fail_file, *failures[0]
        )
    return PackReport(
        dst=str(out),
        rows=rows,
        identities=plan["identities"],
        shards=n_shards,
        worker=(i, n),
        written=written,
        skipped=skipped,
        failed=len(failures),
        bytes_written=size,
    )


def _labels_source(src, labels_file):
    from facenet_hf.data.sources import labels_file_dataset

    return labels_file_dataset(Path(src), Path(labels_file))

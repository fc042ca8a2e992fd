"""Aligning a whole image folder: the same tree of files under ``dst``, aligned, and a manifest of every file.

:func:`align_tree` lists ``src`` (``Name/file.jpg`` or any depth), takes this shard's files (``shard=(i, n)``:
every n-th file from the i-th of the sorted listing, so n machines or processes split the work without talking),
skips those the manifest already lists (a rerun resumes), decodes in DataLoader workers, detects in batches and
writes each crop as ``dst/<same relative path>`` (JPEG at quality 95, atomically). The manifest
(``manifest.csv``, ``manifest-i-of-n.csv`` for a shard) has one row per source file (one per face with
``select="all"``): source and output path, status and reason, the number of faces found, the chosen face's
score, box and five landmarks. A bad file is a row with status ``error``, never a crash. ``alignment.json`` beside
it records the :class:`~facenet_hf.faces.AlignmentSpec` and the settings.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facenet_hf.faces.aligner import AlignResult, FaceAligner
from facenet_hf.faces.detect import LANDMARK_NAMES
from facenet_hf.fileio import atomic_path, atomic_write_text

__all__ = [
    "MANIFEST_COLUMNS",
    "TreeAlignReport",
    "align_tree",
    "folder_alignment",
    "list_images",
    "manifest_name",
    "read_manifest",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
MANIFEST_COLUMNS: tuple[str, ...] = (
    "src",
    "dst",
    "status",
    "reason",
    "n_faces",
    "face_index",
    "score",
    "x1",
    "y1",
    "x2",
    "y2",
    *(f"{name}_{axis}" for name in LANDMARK_NAMES for axis in ("x", "y")),
)


@dataclass
class TreeAlignReport:
    """What one :func:`align_tree` call did."""

    src: Path
    dst: Path
    manifest: Path
    files: int  # in this shard
    already_done: int  # listed by an earlier run, skipped
    processed: int  # this run
    statuses: dict[str, int] = field(default_factory=dict)  # over this run's files
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "src": str(self.src),
            "dst": str(self.dst),
            "manifest": str(self.manifest),
            "files": self.files,
            "already_done": self.already_done,
            "processed": self.processed,
            "statuses": dict(self.statuses),
            "seconds": round(self.seconds, 2),
            "images_per_second": round(self.images_per_second, 2),
        }


def list_images(root: str | os.PathLike) -> list[str]:
    """Image files under ``root`` (relative POSIX paths, sorted; hidden files and folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of images")
    out = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel = Path(folder).relative_to(root)
        out += [
            (rel / f).as_posix()
            for f in files
            if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
        ]
    return sorted(out)


def manifest_name(shard: tuple[int, int]) -> str:
    i, n = shard
    return "manifest.csv" if n == 1 else f"manifest-{i}-of-{n}.csv"


def read_manifest(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of a manifest; a torn last line (a killed run) is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if r.get(MANIFEST_COLUMNS[-1]) is not None and r.get("status")]


def _drop_torn_tail(path: Path) -> None:
    """Cut a manifest back to its last complete line (a run killed mid-write leaves half a row, and appending
    after it would glue the next row to it)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    i, n = shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}")
    return i, n


def _rows(src_rel: str, result: AlignResult, dst_names: Sequence[str | None]) -> list[dict[str, Any]]:
    base = {"src": src_rel, "status": result.status, "reason": result.reason, "n_faces": len(result.faces)}
    if not result.chosen:
        return [{**base, "dst": dst_names[0] if dst_names else "", "face_index": ""}]
    rows = []
    for k, (face, dst) in enumerate(zip(result.chosen, dst_names, strict=True)):
        x1, y1, x2, y2 = face.box
        row = {**base, "dst": dst, "face_index": k, "score": f"{face.score:.5f}"}
        row.update({"x1": f"{x1:.2f}", "y1": f"{y1:.2f}", "x2": f"{x2:.2f}", "y2": f"{y2:.2f}"})
        for name, (x, y) in zip(LANDMARK_NAMES, face.landmarks, strict=True):
            row[f"{name}_x"], row[f"{name}_y"] = f"{x:.2f}", f"{y:.2f}"
        rows.append(row)
    return rows


def _dst_names(src_rel: str, n: int) -> list[str]:
    """Output names: the source's relative path as a JPEG, then ``.face1.jpg``, ``.face2.jpg``, ... for the
    further faces (``select="all"``)."""
    stem = Path(src_rel).with_suffix("").as_posix()
    return [f"{stem}.jpg" if k == 0 else f"{stem}.face{k}.jpg" for k in range(n)]


def _check_names(files: Sequence[str]) -> None:
    """Two sources may not map to one output (``a.jpg`` and ``a.png`` both become ``a.jpg``)."""
    seen: dict[str, str] = {}
    for rel in files:
        out = _dst_names(rel, 1)[0]
        if out in seen:
            raise ValueError(
                f"{seen[out]} and {rel} would both be written as {out}: rename one of them (outputs are JPEGs "
                "named after the source without its suffix)"
            )
        seen[out] = rel


def folder_alignment(folder: str | os.PathLike) -> dict | None:
    """The :class:`AlignmentSpec` dict a folder made by :func:`align_tree` records (``alignment.json``), found
    in the folder or the one above it; None when there is none."""
    for candidate in (Path(folder), Path(folder).parent):
        path = candidate / "alignment.json"
        if path.is_file():
            return json.loads(path.read_text()).get("spec")
    return None


class _Decode:
    """Dataset of (relative path, decoded RGB image or the reason it failed), for DataLoader workers."""

    def __init__(self, root: Path, files: Sequence[str]) -> None:
        self.root, self.files = root, list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from facenet_hf.data.images import BadImageError, load_image

        rel = self.files[i]
        try:
            return rel, load_image(self.root / rel, min_size=1)
        except BadImageError as exc:
            return rel, exc.reason


def align_tree(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    aligner: FaceAligner,
    *,
    shard: tuple[int, int] = (0, 1),
    batch_size: int = 32,
    num_workers: int = 1,
    worker_nice: int = 19,
    quality: int = 95,
    progress: bool = False,
) -> TreeAlignReport:
    """Align every image of ``src`` (this shard's share) into ``dst``; see the module docstring."""
    import torch.utils.data

    from facenet_hf.data.workers import LowPriorityWorkers

    src, dst = Path(src), Path(dst)
    i, n = _check_shard(shard)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if src.resolve() == dst.resolve():
        raise ValueError(f"dst must differ from src ({src}): the aligned copy would overwrite the originals")
    if dst.resolve().is_relative_to(src.resolve()):
        raise ValueError(f"dst ({dst}) must not be inside src ({src}): a rerun would align the crops again")
    listing = list_images(src)
    _check_names(listing)
    files = listing[i::n]
    dst.mkdir(parents=True, exist_ok=True)
    manifest = dst / manifest_name((i, n))
    _drop_torn_tail(manifest)
    done = {r["src"] for r in read_manifest(manifest)}
    todo = [f for f in files if f not in done]
    settings = {
        "spec": aligner.spec.to_dict(),
        "select": aligner.select,
        "no_face": aligner.no_face,
        "center_crop_fraction": aligner.center_crop_fraction,
        "detector": repr(aligner.detector) if aligner.spec.kind == "five_point" else None,
        "source": str(src.resolve()),
    }
    previous = dst / "alignment.json"
    if previous.is_file() and json.loads(previous.read_text()).get("spec") != settings["spec"]:
        raise ValueError(
            f"{dst} already holds faces aligned as {json.loads(previous.read_text()).get('spec')} ({previous}); "
            f"this run asks for {settings['spec']}: use another dst, or the same size and margin to resume"
        )
    atomic_write_text(previous, json.dumps(settings, indent=2))
    report = TreeAlignReport(src, dst, manifest, len(files), len(files) - len(todo), 0)
    if not todo:
        return report
    loader = torch.utils.data.DataLoader(
        _Decode(src, todo),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=list,
        worker_init_fn=LowPriorityWorkers(worker_nice),
    )
    counts: Counter[str] = Counter()
    fresh = not manifest.is_file() or manifest.stat().st_size == 0
    t0 = time.perf_counter()
    from tqdm.auto import tqdm

    with manifest.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, extrasaction="ignore")
        if fresh:
            writer.writeheader()
        bar = tqdm(total=len(todo), desc=f"aligning {src.name}", disable=not progress, unit="img")
        for batch in loader:
            images = [(rel, img) for rel, img in batch if not isinstance(img, str)]
            results = dict(
                zip([rel for rel, _ in images], aligner.align([img for _, img in images]), strict=True)
            )
            for rel, img in batch:
                result = results.get(rel) or AlignResult("error", str(img))
                names = _dst_names(rel, len(result.crops))
                for crop, name in zip(result.crops, names, strict=True):
                    out = dst / name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(out) as tmp:
                        crop.save(tmp, "JPEG", quality=quality)
                writer.writerows(_rows(rel, result, names))
                counts[result.status] += 1
            f.flush()  # a killed run keeps every finished batch
            bar.update(len(batch))
        bar.close()
    report.processed = len(todo)
    report.statuses = dict(counts)
    report.seconds = time.perf_counter() - t0
    return report

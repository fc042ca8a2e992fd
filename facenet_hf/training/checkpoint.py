"""Atomic, verifiable training checkpoints on top of ``accelerator.save_state`` (:func:`save_checkpoint`).

A checkpoint is written into ``checkpoints/.tmp-step_N`` and renamed to ``checkpoints/step_N`` only once
complete, with a ``manifest.json`` listing every file's size and sha256. A half-written checkpoint is never
taken as the latest; a corrupted one is refused with the name of the bad file, and ``latest`` falls back to the
previous complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from facenet_hf.training.state import TrainState

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupted; the message names the folder and file."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tmp_dir_for(root: Path, step: int) -> Path:
    return root / f".tmp-step_{step:08d}"


def finalize(tmp: Path, step: int, extra: dict | None = None) -> Path:
    """Write the manifest into ``tmp`` and rename it to ``step_N`` (atomic on one file system)."""
    files = sorted(p for p in tmp.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {
        "step": step,
        "files": {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files},
        **(extra or {}),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    final = tmp.parent / f"step_{step:08d}"
    if final.exists():  # same step saved again (e.g. at an epoch end): never leave a half-deleted step_N
        old = tmp.parent / f".old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def verify(ckpt: Path) -> dict:
    """Check every file against the manifest; return the manifest or raise CheckpointError naming the file."""
    manifest_path = ckpt / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"checkpoint {ckpt} has no {MANIFEST}: it is incomplete or not a facenet_hf checkpoint"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} is corrupted ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise CheckpointError(f"checkpoint {ckpt}: {MANIFEST} lists no files (corrupted)")
    for name, meta in files.items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {ckpt}: file {name} is missing")
        if path.stat().st_size != meta["size"]:
            raise CheckpointError(
                f"checkpoint {ckpt}: file {name} has {path.stat().st_size} bytes, expected {meta['size']} (truncated?)"
            )
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {ckpt}: file {name} is corrupted (sha256 mismatch)")
    return manifest


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint folders under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def resolve(resume: str, root: Path) -> Path:
    """``"latest"`` -> the newest checkpoint that verifies (older ones are tried in turn); a path -> verified."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise CheckpointError(f"resume: {path} is not a checkpoint folder (or use resume=latest)")
        verify(path)
        return path
    candidates = list_checkpoints(root)
    if not candidates:
        raise CheckpointError(f"resume=latest: no checkpoint under {root}")
    for path in reversed(candidates):
        try:
            verify(path)
            return path
        except CheckpointError as e:
            logger.warning("skipping checkpoint: %s", e)
    raise CheckpointError(f"resume=latest: none of the {len(candidates)} checkpoints under {root} is intact")


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftover temporary folders."""
    for path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    for pattern in (".tmp-step_*", ".old-step_*"):
        for tmp in root.glob(pattern):
            shutil.rmtree(tmp, ignore_errors=True)


def save_checkpoint(accelerator, state: TrainState, root: Path, keep: int) -> Path | None:
    """``save_state`` into a temporary folder, then verify-and-rename it (main process), then prune.

    A write failure (disk full, permissions, ...) removes the temporary folder and raises
    :class:`CheckpointError` naming the checkpoint and the cause; earlier checkpoints are
    untouched, so ``resume=latest`` continues from the last complete one.
    """
    tmp = tmp_dir_for(root, state.step)
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        final = None
        if accelerator.is_main_process:
            final = finalize(tmp, state.step)
            prune(root, keep)
    except Exception as e:
        if isinstance(e, CheckpointError):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = list_checkpoints(root)
        kept = f"the last complete one, {previous[-1]}, is intact" if previous else "there is no earlier one"
        raise CheckpointError(
            f"could not write checkpoint {root / f'step_{state.step:08d}'} (step {state.step}): "
            f"{type(e).__name__}: {e}. The partial folder was removed and {kept}; free disk space or fix "
            "permissions, then continue with resume=latest"
        ) from e
    accelerator.wait_for_everyone()
    return final

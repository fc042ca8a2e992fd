"""What a run carries between steps and across a resume: :class:`TrainState` (saved in every checkpoint), the
resume position, and the bookkeeping of unusable image files."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import arrow_column
from facenet_hf.fileio import atomic_write_text

__all__ = [
    "RowsByPath",
    "TrainState",
    "exclude_bad_rows",
    "position",
    "remap_position",
    "truncate_metrics",
    "write_bad_images",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Counters saved in every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this process consumed in the current epoch
    num_processes: int = 0  # of the run that saved it (0: unknown), to place a resume with another count
    elapsed: float = 0.0  # training seconds (evaluation excluded)
    images: int = 0  # training images seen, all processes together
    skipped_nonfinite: int = 0
    bad_images: list = field(default_factory=list)  # [path, reason] of files skipped so far
    excluded: list = field(default_factory=list)  # rows no longer sampled (failed to decode; 1 process)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def remap_position(state: TrainState, num_processes: int) -> int:
    """Batches per process already consumed in the epoch, for a resume with ``num_processes`` processes.

    The epoch's first ``batches_in_epoch x saved num_processes`` sampler batches are done; with another process
    count the position is rounded down to a multiple of it (at most ``num_processes - 1`` batches are seen twice).
    """
    old = state.num_processes
    if not old or old == num_processes or not state.batches_in_epoch:
        return state.batches_in_epoch
    done = state.batches_in_epoch * old
    logger.warning(
        "resuming a %d-process run with %d processes: the epoch continues at sampler batch %d (of %d done)",
        old,
        num_processes,
        done // num_processes * num_processes,
        done,
    )
    return done // num_processes


def position(state: TrainState) -> tuple[int, int, int]:
    return state.step, state.epoch, state.batches_in_epoch


def truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote after the checkpoint it resumes from (and a half-written last line)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class RowsByPath:
    """Image path -> its training row (built on first use; a path shared by several rows maps to nothing)."""

    def __init__(self, ds) -> None:
        self.ds = ds
        self._rows: dict[str, int] | None = None

    def __call__(self, path: str) -> int | None:
        if self._rows is None:
            import pyarrow.compute as pc

            paths = pc.struct_field(arrow_column(self.ds, "image"), "path").to_pylist()
            seen: dict[str, int] = {}
            for i, p in enumerate(paths):
                if p:
                    seen[p] = -1 if p in seen else i
            self._rows = {p: i for p, i in seen.items() if i >= 0}
        return self._rows.get(path)


def exclude_bad_rows(accelerator, sampler: PKBatchSampler, state: TrainState, rows_of: RowsByPath) -> None:
    """Stop sampling the rows whose files failed to decode (from the next epoch on; one process only: with
    several, each sees other failures and the samplers must stay identical, so the skip policy alone applies)."""
    if accelerator.num_processes > 1 or not state.bad_images:
        return
    rows = {r for path, _ in state.bad_images if (r := rows_of(path)) is not None} - set(state.excluded)
    if not rows:
        return
    try:
        sampler.exclude(sorted(rows))
    except ValueError as e:
        logger.warning(
            "cannot stop sampling %d unusable file(s): %s; they stay skipped batch by batch", len(rows), e
        )
        return
    state.excluded = sampler.excluded
    logger.info("%d unusable file(s) will not be sampled again", len(rows))


def write_bad_images(accelerator, state: TrainState, out: Path) -> None:
    if not (state.bad_images and accelerator.is_main_process):
        return
    try:
        with (out / "bad_images.tsv").open("w") as f:
            f.write("path\treason\n")
            seen = set()
            for path, reason in state.bad_images:
                if path not in seen:
                    seen.add(path)
                    f.write(f"{_tsv(path)}\t{_tsv(reason)}\n")
    except OSError as e:  # never hide the error that ended the run (e.g. a full disk) behind this one
        logger.warning("could not write %s: %s", out / "bad_images.tsv", e)


def _tsv(text: str) -> str:
    return " ".join(str(text).split("\t")).replace("\n", " ")

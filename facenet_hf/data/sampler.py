"""P x K batch sampler: every batch holds P distinct identities x K images each, identity-major.

Design (one epoch, O(N) numpy plus a Python pass over the few conflicting chunks):

1. Usable identities: at least ``min_images`` images, and at least ``k`` unless ``replacement`` is True.
2. Each usable identity's images are shuffled and cut into chunks of ``k``. The last chunk is padded from the
   identity's own images: with images outside that chunk when the identity has ``>= k`` (no index repeats),
   else by cycling through its shuffled images (all distinct images first, then repeats; ``replacement=True``).
3. Chunks are spread over the epoch: chunk ``i`` of an identity with ``m`` chunks gets the time
   ``(i + u) / m`` (``u`` uniform per identity) and all chunks are sorted by time. So every identity is visited
   in proportion to its image count, evenly through the epoch.
4. The sorted chunks are cut into rows of ``p``; rows whose identities are distinct are batches. The chunks of
   the other rows (an identity with more chunks than there are batches) go, in time order, through a greedy pass
   that fills batches with distinct identities, deferring a chunk whose identity is already in the batch; what
   cannot be placed is dropped for this pass.
5. The batches are shuffled. If a pass gives fewer batches than ``len(self)`` another pass (new shuffle) follows;
   the epoch is cut to ``len(self)`` batches.

Epoch length: ``num_batches`` or ``max(1, usable images // (p * k))``.

Randomness comes only from ``np.random.default_rng([seed, epoch])``, so every process of a distributed run
produces the same batches. The sampler is a cursor ``(epoch, position)``:

- iterating yields the batches of the current epoch from ``position`` on, advancing ``position``; when the epoch
  is exhausted the cursor moves to ``(epoch + 1, 0)`` by itself (accelerate does not call ``set_epoch`` on a
  custom batch sampler when it runs more than one process);
- ``skip(n)`` sets ``position = n``; ``set_epoch(e)`` moves to ``(e, 0)``, but keeps the position when ``e`` is
  already the current epoch (accelerate with one process calls ``set_epoch(dataloader.iteration)`` at the start
  of every iteration, which would otherwise undo a ``skip`` made for resuming);
- ``state_dict()`` is ``{"seed", "epoch", "skip"}`` with ``skip`` = the position. A DataLoader with worker
  processes draws batches ahead of the training loop, so a trainer should save the number of batches it has
  consumed rather than trust the position read mid-epoch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import numpy as np

__all__ = ["PKBatchSampler"]


class PKBatchSampler:
    """Yields ``list[int]`` batches of ``p`` distinct identities x ``k`` indices (see module doc for the design).

    Indices ``[i*k:(i+1)*k]`` of a batch share a label. Raises ``ValueError`` up front when fewer than ``p``
    identities are usable or ``p``/``k`` are below 2.
    """

    drop_last = True

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        *,
        seed: int = 0,
        replacement: bool = True,
        min_images: int = 2,
        num_batches: int | None = None,
    ) -> None:
        for name, value, low in (("p", p, 2), ("k", k, 2), ("min_images", min_images, 1), ("seed", seed, 0)):
            if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
                raise ValueError(f"PKBatchSampler: {name} must be an integer >= {low}, got {value!r}")
        if num_batches is not None and (
            not isinstance(num_batches, int | np.integer) or isinstance(num_batches, bool) or num_batches < 1
        ):
            raise ValueError(
                f"PKBatchSampler: num_batches must be None or an integer >= 1, got {num_batches!r}"
            )
        arr = np.asarray(labels)
        if arr.ndim != 1:
            raise ValueError(f"PKBatchSampler: labels must be one-dimensional, got shape {arr.shape}")
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"PKBatchSampler: labels must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)

        self.p, self.k = int(p), int(k)
        self.batch_size = self.p * self.k
        self.seed = int(seed)
        self.replacement = bool(replacement)
        self.min_images = int(min_images)
        self._labels = arr
        self._excluded = np.zeros(arr.size, dtype=bool)
        self._index(np.arange(arr.size, dtype=np.int64))
        self._len = (
            int(num_batches) if num_batches is not None else max(1, self.num_usable_images // self.batch_size)
        )
        self._epoch = 0
        self._skip = 0

    def _index(self, rows: np.ndarray) -> None:
        """Group ``rows`` (dataset indices) by usable identity; raise if fewer than ``p`` identities are usable."""
        arr = self._labels
        order = rows[np.argsort(arr[rows], kind="stable")]
        uniq, counts = np.unique(arr[order], return_counts=True)
        need = self.min_images if self.replacement else max(self.min_images, self.k)
        usable = counts >= need
        self.num_identities = int(uniq.size)
        self.num_usable_identities = int(usable.sum())
        self.num_usable_images = int(counts[usable].sum())
        if self.num_usable_identities < self.p:
            rule = f">= {need} images" + (
                "" if self.replacement else f" (replacement=False needs >= k={self.k})"
            )
            raise ValueError(
                f"PKBatchSampler: p={self.p} identities per batch, but only {self.num_usable_identities} of "
                f"{self.num_identities} identities ({rows.size} labels) have {rule}; lower p or min_images"
                + ("" if self.replacement else ", or allow replacement")
            )
        self._counts = counts[usable].astype(np.int64)
        keep = np.repeat(usable, counts)
        self._grouped = order[keep]  # indices grouped by usable identity, each group in index order
        self._starts = np.concatenate([[0], np.cumsum(self._counts)[:-1]]).astype(np.int64)

    def exclude(self, indices: Sequence[int] | np.ndarray) -> None:
        """Never sample these dataset indices again (e.g. files found unusable while training).

        Takes effect at the next epoch (the current epoch's batches are already drawn); ``len(self)`` is kept, so
        the run's step count does not change. Raises ``ValueError`` (and changes nothing) if fewer than ``p``
        identities would stay usable. Excluding is deterministic: the same exclusions (e.g. restored from a
        checkpoint) give the same batches.
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self._labels.size):
            raise ValueError(f"PKBatchSampler.exclude: indices must be in 0..{self._labels.size - 1}")
        excluded = self._excluded.copy()
        excluded[idx] = True
        if (excluded == self._excluded).all():
            return
        saved = (self.num_identities, self.num_usable_identities, self.num_usable_images)
        saved_arrays = (self._counts, self._grouped, self._starts)
        try:
            self._index(np.flatnonzero(~excluded))
        except ValueError:
            self.num_identities, self.num_usable_identities, self.num_usable_images = saved
            self._counts, self._grouped, self._starts = saved_arrays
            raise
        self._excluded = excluded

    @property
    def excluded(self) -> list[int]:
        """The dataset indices excluded so far (sorted)."""
        return np.flatnonzero(self._excluded).tolist()

    # --------------------------------------------------------------------------------------- cursor / state

    def __len__(self) -> int:
        return self._len

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Move to the start of ``epoch`` (a no-op when ``epoch`` is already the current one: a skip is kept)."""
        if not isinstance(epoch, int | np.integer) or epoch < 0:
            raise ValueError(f"PKBatchSampler: epoch must be an integer >= 0, got {epoch!r}")
        if int(epoch) != self._epoch:
            self._epoch = int(epoch)
            self._skip = 0

    def skip(self, n: int) -> None:
        """The next iteration starts at batch ``n`` of the current epoch (0 <= n <= len(self))."""
        if not isinstance(n, int | np.integer) or not 0 <= n <= self._len:
            raise ValueError(f"PKBatchSampler: skip must be an integer in 0..{self._len}, got {n!r}")
        self._skip = int(n)

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self._epoch, "skip": self._skip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"seed", "epoch", "skip"} - set(state)
        if missing:
            raise KeyError(f"PKBatchSampler state is missing {sorted(missing)} (got {sorted(state)})")
        self.seed = int(state["seed"])
        self._epoch = int(state["epoch"])
        self._skip = 0
        self.skip(int(state["skip"]))

    def __repr__(self) -> str:
        return (
            f"PKBatchSampler(p={self.p}, k={self.k}, batches={self._len}, identities={self.num_usable_identities}/"
            f"{self.num_identities}, images={self.num_usable_images}, replacement={self.replacement}, "
            f"epoch={self._epoch}, skip={self._skip})"
        )

    # --------------------------------------------------------------------------------------------- batches

    def __iter__(self) -> Iterator[list[int]]:
        epoch = self._epoch
        batches = self.epoch_batches(epoch)
        for i in range(self._skip, self._len):
            self._skip = i + 1
            yield batches[i].tolist()
        if self._epoch == epoch:
            self._epoch, self._skip = epoch + 1, 0

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """All batches of ``epoch`` as an int64 array of shape ``(len(self), p * k)`` (does not move the cursor)."""
        rng = np.random.default_rng([self.seed, int(epoch)])
        parts: list[np.ndarray] = []
        total = 0
        while total < self._len:
            part = self._one_pass(rng)
            parts.append(part)
            total += len(part)
        out = np.concatenate(parts)[: self._len]
        return out.reshape(self._len, self.batch_size)

    def _one_pass(self, rng: np.random.Generator) -> np.ndarray:
        """Batches (n, p*k) that use every usable image at least once, in random order."""
        p, k = self.p, self.k
        counts, starts = self._counts, self._starts
        n_ids = counts.size
        # 1. shuffle each identity's images (sort by identity + uniform key)
        group = np.repeat(np.arange(n_ids, dtype=np.int64), counts)
        shuffled = self._grouped[np.argsort(group + rng.random(group.size), kind="stable")]
        # 2. chunks of k, the last one padded from the identity's own images
        n_chunks = -(-counts // k)
        padded = n_chunks * k
        pos_group = np.repeat(np.arange(n_ids, dtype=np.int64), padded)
        j = np.arange(pos_group.size, dtype=np.int64) - np.repeat(np.cumsum(padded) - padded, padded)
        c = counts[pos_group]
        src = np.where(j < c, j, (j - c) % c)
        chunks = shuffled[starts[pos_group] + src].reshape(-1, k)
        chunk_group = np.repeat(np.arange(n_ids, dtype=np.int64), n_chunks)
        # 3. spread each identity's chunks evenly over the pass
        chunk_i = np.arange(chunk_group.size, dtype=np.int64) - np.repeat(
            np.cumsum(n_chunks) - n_chunks, n_chunks
        )
        offset = rng.random(n_ids)
        times = (chunk_i + offset[chunk_group]) / n_chunks[chunk_group]
        seq = np.argsort(times, kind="stable")
        # 4. rows of p distinct identities; the rest through the greedy pass
        n_rows = seq.size // p
        rows = seq[: n_rows * p].reshape(n_rows, p)
        ids = np.sort(chunk_group[rows], axis=1)
        clash = (ids[:, 1:] == ids[:, :-1]).any(axis=1)
        leftover = np.concatenate([rows[clash].ravel(), seq[n_rows * p :]])
        good = rows[~clash]
        if leftover.size:
            extra = _greedy_rows(leftover, chunk_group, p)
            if extra.size:
                good = np.concatenate([good, extra])
        good = good[rng.permutation(len(good))]
        return chunks[good].reshape(len(good), p * k)


def _greedy_rows(seq: np.ndarray, chunk_group: np.ndarray, p: int) -> np.ndarray:
    """Rows of p chunks with distinct identities from ``seq`` (in order), deferring clashing chunks."""
    rows: list[list[int]] = []
    current: list[int] = []
    in_current: set[int] = set()
    waiting: dict[int, deque[int]] = {}  # identity -> deferred chunks, oldest identity first

    def take_waiting() -> None:
        # start batches with deferred chunks (one per identity) while enough are waiting
        while True:
            for g in list(islice((g for g in waiting if g not in in_current), p - len(current))):
                queue = waiting[g]
                current.append(queue.popleft())
                in_current.add(g)
                if not queue:
                    del waiting[g]
            if len(current) < p:
                return
            rows.append(current.copy())
            current.clear()
            in_current.clear()

    groups = chunk_group[seq].tolist()
    for chunk, g in zip(seq.tolist(), groups, strict=True):
        if g in in_current:
            waiting.setdefault(g, deque()).append(chunk)
            continue
        current.append(chunk)
        in_current.add(g)
        if len(current) == p:
            rows.append(current.copy())
            current.clear()
            in_current.clear()
            take_waiting()
    take_waiting()
    return np.array(rows, dtype=np.int64).reshape(len(rows), p)

"""LFW verification pairs (View 1 / View 2 ``pairs*.txt``), their folds, and identity-disjoint training splits.

File formats read by :func:`read_pairs` (fields separated by tabs or spaces):

- View 2 ``pairs.txt``: header ``10 300`` (folds, pairs of each kind per fold), then for each fold 300 matched
  lines ``Name<TAB>i<TAB>j`` followed by 300 mismatched lines ``NameA<TAB>i<TAB>NameB<TAB>j``;
- View 1 ``pairsDevTrain.txt`` / ``pairsDevTest.txt``: header ``N``, then N matched and N mismatched lines
  (one fold);
- any ``n_folds n_per_fold`` header in the View 2 layout (the bundled sample uses ``10 6``).

Image ``i`` of ``Name`` is the file ``Name/Name_%04d.jpg`` under the image folder (``lfw-deepfunneled``).
The 10 View-2 folds are disjoint in people, so a model may train on the people of 9 folds and be scored on the
10th (:func:`identity_disjoint_split`); :func:`check_disjoint` refuses any overlap between training identities and
evaluation pairs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from facenet_hf.data.sources import arrow_column, keep_rows

__all__ = [
    "LFWPairs",
    "PairsFormatError",
    "SplitOverlapError",
    "check_disjoint",
    "find_image_root",
    "identity_disjoint_split",
    "missing_pair_images",
    "pair_identities",
    "read_pairs",
]

_EXPECTED_FORMATS = (
    "expected a header 'N' (View 1: N matched then N mismatched pairs) or 'n_folds n_per_fold' (View 2, e.g. "
    "'10 300'), then per fold n_per_fold matched lines 'Name<TAB>i<TAB>j' followed by n_per_fold mismatched lines "
    "'NameA<TAB>i<TAB>NameB<TAB>j' (i, j: 1-based image numbers)"
)


class PairsFormatError(ValueError):
    """A pairs file that does not follow the LFW format; the message gives file, line number, line and format."""


class SplitOverlapError(ValueError):
    """Training identities overlap the people of the evaluation pairs."""


@dataclass(eq=False)
class LFWPairs:
    """LFW pairs as parallel numpy arrays; ``fold`` is 1-based, ``is_same`` is True for matched pairs."""

    name1: np.ndarray
    idx1: np.ndarray
    name2: np.ndarray
    idx2: np.ndarray
    is_same: np.ndarray
    fold: np.ndarray

    def __post_init__(self) -> None:
        self.name1 = np.asarray(self.name1, dtype=str)
        self.name2 = np.asarray(self.name2, dtype=str)
        self.idx1 = np.asarray(self.idx1, dtype=np.int64)
        self.idx2 = np.asarray(self.idx2, dtype=np.int64)
        self.is_same = np.asarray(self.is_same, dtype=bool)
        self.fold = np.asarray(self.fold, dtype=np.int64)
        lengths = {f: len(getattr(self, f)) for f in ("name1", "idx1", "name2", "idx2", "is_same", "fold")}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"LFWPairs arrays must have one length, got {lengths}")

    def __len__(self) -> int:
        return len(self.is_same)

    def __repr__(self) -> str:
        return f"LFWPairs({len(self)} pairs, {int(self.is_same.sum())} matched, folds {self.folds})"

    @property
    def folds(self) -> list[int]:
        """The fold numbers present, sorted."""
        return sorted(int(f) for f in np.unique(self.fold))

    def paths(self) -> tuple[list[str], list[str]]:
        """Relative image paths ``Name/Name_%04d.jpg`` of the first and second image of every pair."""
        return _paths(self.name1, self.idx1), _paths(self.name2, self.idx2)

    def select_folds(self, folds: int | Iterable[int]) -> LFWPairs:
        """The pairs of the given fold(s) (fold numbers are kept)."""
        wanted = _fold_list(folds, self.folds)
        keep = np.isin(self.fold, wanted)
        return LFWPairs(
            self.name1[keep],
            self.idx1[keep],
            self.name2[keep],
            self.idx2[keep],
            self.is_same[keep],
            self.fold[keep],
        )

    def people(self, folds: int | Iterable[int] | None = None) -> set[str]:
        """Names of everyone in the pairs (of the given folds, or of all)."""
        pairs = self if folds is None else self.select_folds(folds)
        return set(pairs.name1.tolist()) | set(pairs.name2.tolist())


def _paths(names: np.ndarray, idx: np.ndarray) -> list[str]:
    return [f"{n}/{n}_{i:04d}.jpg" for n, i in zip(names.tolist(), idx.tolist(), strict=True)]


def _fold_list(folds: int | Iterable[int], present: list[int]) -> list[int]:
    wanted = [folds] if isinstance(folds, int | np.integer) else list(folds)
    if not wanted:
        raise ValueError(f"no folds given; the pairs have folds {present}")
    bad = [f for f in wanted if f not in present]
    if bad:
        raise ValueError(f"folds {bad} are not in the pairs; valid folds are {present}")
    return [int(f) for f in wanted]


def pair_identities(pairs: LFWPairs, folds: int | Iterable[int] | None = None) -> set[str]:
    """People appearing in ``pairs`` (restricted to ``folds`` if given); same as ``pairs.people(folds)``."""
    return pairs.people(folds)


def read_pairs(path: str | os.PathLike) -> LFWPairs:
    """Parse an LFW pairs file (View 2 ``pairs.txt``, View 1 ``pairsDevTrain/Test.txt``, or any ``F N`` header)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"LFW pairs file {str(path)!r} does not exist") from None
    lines = [(no, line.split()) for no, line in enumerate(text.splitlines(), start=1) if line.strip()]
    if not lines:
        raise PairsFormatError(f"{path}: the file is empty; {_EXPECTED_FORMATS}")

    def fail(no: int, what: str) -> PairsFormatError:
        raw = text.splitlines()[no - 1]
        return PairsFormatError(f"{path}, line {no}: {what}: {raw!r}; {_EXPECTED_FORMATS}")

    head_no, head = lines[0]
    if len(head) not in (1, 2) or not all(_is_int(v) for v in head):
        raise fail(head_no, "bad header")
    n_folds, per_fold = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))
    if n_folds < 1 or per_fold < 1:
        raise fail(head_no, "the header's counts must be positive")
    body = lines[1:]
    expected = n_folds * 2 * per_fold
    if len(body) != expected:
        raise PairsFormatError(
            f"{path}: the header (line {head_no}) announces {n_folds} fold(s) x 2 x {per_fold} = {expected} pairs, "
            f"but the file has {len(body)} pair lines; {_EXPECTED_FORMATS}"
        )
    name1, idx1, name2, idx2 = [], [], [], []
    for pos, (no, fields) in enumerate(body):
        fold, within = divmod(pos, 2 * per_fold)
        matched = within < per_fold
        where = f"fold {fold + 1}, {'matched' if matched else 'mismatched'} pair {within % per_fold + 1}"
        if matched and len(fields) != 3:
            raise fail(no, f"expected a matched pair 'Name<TAB>i<TAB>j' ({where})")
        if not matched and len(fields) != 4:
            raise fail(no, f"expected a mismatched pair 'NameA<TAB>i<TAB>NameB<TAB>j' ({where})")
        a, i, b, j = (fields[0], fields[1], fields[0], fields[2]) if matched else fields
        if not (_is_int(i) and _is_int(j)) or int(i) < 1 or int(j) < 1:
            raise fail(no, f"image numbers must be positive integers ({where})")
        if _is_int(a) or _is_int(b):
            raise fail(no, f"a name is a number ({where})")
        name1.append(a)
        idx1.append(int(i))
        name2.append(b)
        idx2.append(int(j))
    pos = np.arange(expected)
    return LFWPairs(
        np.array(name1, dtype=str),
        np.array(idx1, dtype=np.int64),
        np.array(name2, dtype=str),
        np.array(idx2, dtype=np.int64),
        (pos % (2 * per_fold)) < per_fold,
        pos // (2 * per_fold) + 1,
    )


def _is_int(s: str) -> bool:
    return s.isascii() and s.isdigit()


def check_disjoint(train_identities: Iterable[str] | datasets.Dataset, pairs: LFWPairs) -> None:
    """Raise :class:`SplitOverlapError` if any training identity appears in ``pairs`` (naming up to 10 of them).

    ``train_identities`` may be names or a Dataset with an ``identity`` column.
    """
    if isinstance(train_identities, datasets.Dataset):
        if "identity" not in train_identities.column_names:
            raise KeyError(f"dataset has no 'identity' column (columns: {train_identities.column_names})")
        train = set(pc.unique(arrow_column(train_identities, "identity")).to_pylist())
    else:
        train = set(train_identities)
    overlap = sorted(train & pairs.people())
    if overlap:
        shown = ", ".join(overlap[:10]) + (", ..." if len(overlap) > 10 else "")
        raise SplitOverlapError(
            f"{len(overlap)} people are both training identities and in the evaluation pairs (folds "
            f"{pairs.folds}): {shown}; evaluate on people held out of training (identity_disjoint_split) or "
            "train on other data"
        )


def identity_disjoint_split(
    ds: datasets.Dataset, pairs: LFWPairs, holdout_folds: int | Iterable[int]
) -> tuple[datasets.Dataset, LFWPairs]:
    """(training rows whose identity is in none of the held-out folds' pairs, the held-out folds' pairs).

    Filtering is an Arrow ``is_in`` + ``ds.select(indices)`` (no image is read). The training set's ``label`` is
    re-densified to ``0..C'-1`` (order kept, so still sorted by name); ``identity`` and the other columns are kept.
    """
    for col in ("label", "identity"):
        if col not in ds.column_names:
            raise KeyError(
                f"dataset has no {col!r} column (columns: {ds.column_names}); load it with load_source()"
            )
    eval_pairs = pairs.select_folds(holdout_folds)
    held = pa.array(sorted(eval_pairs.people()), pa.string())
    identity = arrow_column(ds, "identity")
    keep = np.flatnonzero(~pc.is_in(identity, value_set=held).to_numpy(zero_copy_only=False))
    if keep.size == 0:
        raise ValueError(
            f"holding out folds {eval_pairs.folds} leaves no training rows (all {len(ds)} rows are held out)"
        )
    train = keep_rows(ds, keep, tag=f"holdout-{'-'.join(map(str, eval_pairs.folds))}")
    check_disjoint(train, eval_pairs)
    return train, eval_pairs


def find_image_root(lfw_dir: str | os.PathLike) -> Path:
    """The folder holding ``Name/Name_%04d.jpg``: ``lfw_dir/lfw-deepfunneled``, ``lfw_dir/lfw`` or ``lfw_dir``."""
    root = Path(lfw_dir)
    for sub in ("lfw-deepfunneled", "lfw"):
        if (root / sub).is_dir():
            return root / sub
    return root


def missing_pair_images(root: str | os.PathLike, pairs: LFWPairs) -> list[str]:
    """Sorted relative paths of pair images that are not files under ``root`` (the ``Name/`` folders' parent)."""
    p1, p2 = pairs.paths()
    root = Path(root)
    return sorted(p for p in set(p1) | set(p2) if not (root / p).is_file())

"""Embedding files (``.npz`` / ``.parquet``) and pair distances looked up by image path.

* ``.npz``: arrays ``paths`` (str) and ``embeddings`` (float32, N x D).
* ``.parquet``: columns ``path`` (string) and ``embedding`` (list of float32), one row per image (per face when
  detection ran); optional columns ``identity`` (string), ``face_index`` (int32, -1 = the whole image) and ``box``
  (4 float32: x1, y1, x2, y2 in the source image). :func:`read_table` / :func:`write_table` read and write them all.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from facenet_hf.distances import row_distances
from facenet_hf.fileio import atomic_path

__all__ = [
    "SUFFIXES",
    "EmbeddingTable",
    "load_embeddings",
    "pair_distances",
    "read_table",
    "read_table_metadata",
    "save_embeddings",
    "write_table",
]

SUFFIXES = (".npz", ".parquet")


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"embedding file {str(path)!r} has suffix {suffix!r}; valid suffixes are {list(SUFFIXES)}"
        )
    return suffix


def _duplicates(paths: Sequence[str]) -> list[str]:
    uniq, counts = np.unique(np.asarray(paths, dtype=str), return_counts=True)
    return uniq[counts > 1].tolist()


def _check(paths: Sequence[str], emb: np.ndarray, where: str) -> None:
    if emb.ndim != 2:
        raise ValueError(f"{where}: embeddings must be 2-D (N, D), got shape {emb.shape}")
    if len(paths) != emb.shape[0]:
        raise ValueError(f"{where}: {len(paths)} paths but {emb.shape[0]} embedding rows; they must match")


def _embedding_column(emb: np.ndarray):
    import pyarrow as pa

    n, dim = emb.shape
    values = pa.array(emb.reshape(-1), type=pa.float32())
    large = n * dim >= 2**31  # int32 list offsets would overflow
    offsets = pa.array(np.arange(n + 1, dtype=np.int64) * dim, type=pa.int64() if large else pa.int32())
    return (pa.LargeListArray if large else pa.ListArray).from_arrays(offsets, values)


def save_embeddings(path: str | os.PathLike, paths: Sequence[str], embeddings: Any) -> Path:
    """Write ``paths`` and ``embeddings`` (N x D, stored as float32) to ``.npz`` or ``.parquet``; return the path.

    Paths must be unique. The file is written to a temporary name and renamed, so readers never see a partial file.
    """
    out = Path(path)
    suffix = _suffix(out)
    paths = [str(p) for p in paths]
    emb = np.asarray(embeddings, dtype=np.float32)
    _check(paths, emb, str(out))
    dups = _duplicates(paths)
    if dups:
        raise ValueError(f"{out}: paths must be unique, {len(dups)} repeated, e.g. {dups[:5]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if suffix == ".npz":
            np.savez(tmp, paths=np.asarray(paths, dtype=str), embeddings=emb)
        else:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.table({"path": pa.array(paths, type=pa.string()), "embedding": _embedding_column(emb)})
            pq.write_table(table, tmp)
    return out


def _load_npz(path: Path) -> tuple[list[str], np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in ("paths", "embeddings") if k not in data.files]
        if missing:
            raise KeyError(
                f"{path}: missing array(s) {missing}; an embeddings .npz needs 'paths' and 'embeddings', "
                f"found {sorted(data.files)}"
            )
        return [str(p) for p in data["paths"].tolist()], np.asarray(data["embeddings"], dtype=np.float32)


def _load_parquet(path: Path, extra: Sequence[str] = ()) -> tuple[list[str], np.ndarray, Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    missing = [c for c in ("path", "embedding") if c not in names]
    if missing:
        raise KeyError(
            f"{path}: missing column(s) {missing}; an embeddings .parquet needs 'path' (string) and "
            f"'embedding' (list of floats), found {names}"
        )
    table = pq.read_table(path, columns=["path", "embedding", *[c for c in extra if c in names]])
    col = table.column("embedding").combine_chunks()
    if not (
        pa.types.is_list(col.type)
        or pa.types.is_large_list(col.type)
        or pa.types.is_fixed_size_list(col.type)
    ):
        raise ValueError(f"{path}: column 'embedding' must be a list of floats, got type {col.type}")
    if col.null_count:
        raise ValueError(f"{path}: column 'embedding' has {col.null_count} null row(s)")
    n = len(col)
    lengths = np.asarray(col.value_lengths()) if n else np.zeros(0, dtype=np.int64)
    if n and np.any(lengths != lengths[0]):
        raise ValueError(
            f"{path}: all embeddings must have the same length, got lengths {np.unique(lengths)[:5].tolist()}"
        )
    dim = int(lengths[0]) if n else 0
    flat = col.flatten().to_numpy(zero_copy_only=False)
    emb = np.asarray(flat, dtype=np.float32).reshape(n, dim)
    paths = table.column("path").to_pylist()
    if any(p is None for p in paths):
        raise ValueError(f"{path}: column 'path' has null value(s)")
    return [str(p) for p in paths], emb, table


def load_embeddings(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """Read ``(paths, embeddings float32 N x D)`` from a ``.npz`` or ``.parquet`` file written as above."""
    src = Path(path)
    suffix = _suffix(src)
    if not src.is_file():
        raise FileNotFoundError(f"embedding file not found: {src}")
    paths, emb = _load_npz(src) if suffix == ".npz" else _load_parquet(src)[:2]
    _check(paths, emb, str(src))
    return paths, emb


@dataclass
class EmbeddingTable:
    """Rows of an embeddings file: one per image, or one per face when detection ran.

    ``identities``: the person of each row when known (None: no identity column); ``face_index``: -1 for a whole
    image, else the face's index in its photo; ``boxes``: (N, 4) float32 face boxes (NaN for whole images).
    """

    paths: list[str]
    embeddings: np.ndarray
    identities: list[str | None] | None = None
    face_index: np.ndarray | None = None
    boxes: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.paths = [str(p) for p in self.paths]
        self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
        _check(self.paths, self.embeddings, "EmbeddingTable")
        n = len(self.paths)
        if self.face_index is not None:
            self.face_index = np.asarray(self.face_index, dtype=np.int32).reshape(-1)
        if self.boxes is not None:
            self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        for name in ("identities", "face_index", "boxes"):
            value = getattr(self, name)
            if value is not None and len(value) != n:
                raise ValueError(f"EmbeddingTable: {len(value)} {name} for {n} rows; they must match")

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @property
    def keys(self) -> list[str]:
        """A unique name per row: the path, with ``#face_index`` appended for detected faces."""
        if self.face_index is None:
            return list(self.paths)
        return [
            p if int(f) < 0 else f"{p}#{int(f)}" for p, f in zip(self.paths, self.face_index, strict=True)
        ]

    def select(self, rows: Any) -> EmbeddingTable:
        """The table restricted to ``rows`` (indices or a boolean mask), in that order."""
        idx = np.flatnonzero(rows) if np.asarray(rows).dtype == bool else np.asarray(rows, dtype=np.int64)
        return EmbeddingTable(
            [self.paths[i] for i in idx],
            self.embeddings[idx],
            None if self.identities is None else [self.identities[i] for i in idx],
            None if self.face_index is None else self.face_index[idx],
            None if self.boxes is None else self.boxes[idx],
        )

    @classmethod
    def concat(cls, tables: Sequence[EmbeddingTable]) -> EmbeddingTable:
        """Rows of several tables, in order (their dimensions must agree)."""
        if not tables:
            raise ValueError("EmbeddingTable.concat needs at least one table")
        dims = {t.dim for t in tables if len(t)}
        if len(dims) > 1:
            raise ValueError(f"cannot concatenate embeddings of different dimensions {sorted(dims)}")

        def col(name, fill):
            if all(getattr(t, name) is None for t in tables):
                return None
            return [
                v for t in tables for v in (getattr(t, name) if getattr(t, name) is not None else fill(t))
            ]

        dim = dims.pop() if dims else tables[0].dim
        face = col("face_index", lambda t: [-1] * len(t))
        boxes = col("boxes", lambda t: [[np.nan] * 4] * len(t))
        return cls(
            [p for t in tables for p in t.paths],
            np.concatenate([t.embeddings.reshape(-1, dim) for t in tables]),
            col("identities", lambda t: [None] * len(t)),
            None if face is None else np.asarray(face, dtype=np.int32),
            None if boxes is None else np.asarray(boxes, dtype=np.float32),
        )


TABLE_METADATA_KEY = b"facenet_hf"


def write_table(
    path: str | os.PathLike, table: EmbeddingTable, *, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write an :class:`EmbeddingTable` to ``.parquet`` (all columns) atomically; row keys must be unique.

    ``metadata`` (JSON-able, e.g. the model's fingerprint and flip mode) is stored in the file's schema metadata;
    :func:`read_table_metadata` reads it back."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(path)
    if out.suffix.lower() != ".parquet":
        raise ValueError(f"embedding table {str(out)!r} must be a .parquet file (got suffix {out.suffix!r})")
    dups = _duplicates(table.keys)
    if dups:
        raise ValueError(f"{out}: rows must be unique (path, face), {len(dups)} repeated, e.g. {dups[:5]}")
    cols: dict[str, Any] = {"path": pa.array(table.paths, type=pa.string())}
    if table.identities is not None:
        cols["identity"] = pa.array(table.identities, type=pa.string())
    if table.face_index is not None:
        cols["face_index"] = pa.array(table.face_index, type=pa.int32())
    if table.boxes is not None:
        cols["box"] = pa.FixedSizeListArray.from_arrays(
            pa.array(table.boxes.reshape(-1), type=pa.float32()), 4
        )
    cols["embedding"] = _embedding_column(table.embeddings)
    out.parent.mkdir(parents=True, exist_ok=True)
    arrow = pa.table(cols)
    if metadata:
        import json

        arrow = arrow.replace_schema_metadata({TABLE_METADATA_KEY: json.dumps(dict(metadata)).encode()})
    with atomic_path(out) as tmp:
        pq.write_table(arrow, tmp)
    return out


def read_table_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata :func:`write_table` stored in a parquet file ({} when there is none)."""
    import json

    import pyarrow.parquet as pq

    raw = (pq.read_schema(path).metadata or {}).get(TABLE_METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_table(path: str | os.PathLike) -> EmbeddingTable:
    """Read an embeddings file (``.parquet`` with its optional columns, or ``.npz``) as an :class:`EmbeddingTable`."""
    src = Path(path)
    suffix = _suffix(src)
    if not src.is_file():
        raise FileNotFoundError(f"embedding file not found: {src}")
    if suffix == ".npz":
        paths, emb = _load_npz(src)
        return EmbeddingTable(paths, emb)
    paths, emb, table = _load_parquet(src, extra=("identity", "face_index", "box"))
    names = table.column_names
    identities = table.column("identity").to_pylist() if "identity" in names else None
    face = table.column("face_index").to_numpy(zero_copy_only=False) if "face_index" in names else None
    boxes = None
    if "box" in names:
        rows = table.column("box").to_pylist()
        boxes = np.asarray([r if r is not None else [np.nan] * 4 for r in rows], dtype=np.float32).reshape(
            -1, 4
        )
    try:
        return EmbeddingTable(paths, emb, identities, face, boxes)
    except ValueError as e:
        raise ValueError(f"{src}: {e}") from None


def _row_map(path_to_row: Mapping[str, int] | Sequence[str], n_rows: int) -> Mapping[str, int]:
    if isinstance(path_to_row, Mapping):
        return path_to_row
    paths = [str(p) for p in path_to_row]
    if len(paths) != n_rows:
        raise ValueError(f"{len(paths)} paths but {n_rows} embedding rows; they must match")
    dups = _duplicates(paths)
    if dups:
        raise ValueError(f"paths must be unique to map pairs to rows, {len(dups)} repeated, e.g. {dups[:5]}")
    return {p: i for i, p in enumerate(paths)}


def _rows(mapping: Mapping[str, int], wanted: Sequence[str], n_rows: int) -> np.ndarray:
    missing = sorted({str(p) for p in wanted if p not in mapping})
    if missing:
        raise KeyError(
            f"{len(missing)} pair path(s) have no embedding, e.g. {missing[:5]}; "
            f"the embeddings cover {len(mapping)} paths"
        )
    rows = np.fromiter((mapping[p] for p in wanted), dtype=np.int64, count=len(wanted))
    if rows.size and (rows.min() < 0 or rows.max() >= n_rows):
        raise IndexError(f"path_to_row maps to rows outside 0..{n_rows - 1}")
    return rows


def pair_distances(
    path_to_row: Mapping[str, int] | Sequence[str],
    embeddings: Any,
    paths1: Sequence[str],
    paths2: Sequence[str],
    *,
    squared: bool = True,
    normalize: bool = False,
) -> np.ndarray:
    """Euclidean (``squared=True``: squared) distances, float64, between the embeddings of ``paths1[i]``/``paths2[i]``.

    ``path_to_row`` is a ``{path: row}`` mapping or the list of paths of the embedding rows. Embeddings are used
    as given (callers L2-normalise them); ``normalize=True`` L2-normalises the rows first.
    """
    emb = np.asarray(embeddings, dtype=np.float64)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be 2-D (N, D), got shape {emb.shape}")
    if len(paths1) != len(paths2):
        raise ValueError(f"paths1 and paths2 must have equal length, got {len(paths1)} and {len(paths2)}")
    mapping = _row_map(path_to_row, emb.shape[0])
    a = emb[_rows(mapping, paths1, emb.shape[0])]
    b = emb[_rows(mapping, paths2, emb.shape[0])]
    if normalize:
        for m in (a, b):
            norm = np.linalg.norm(m, axis=1, keepdims=True)
            if np.any(norm == 0):
                raise ValueError("cannot normalize: some embeddings have zero norm")
            m /= norm
    return row_distances(a, b, squared=squared)

"""Galleries of enrolled people, and open-set identification against them (1:N search).

A :class:`Gallery` holds N unit embeddings (float32, N x D), the person of each row and the image (and face) it
came from, plus what made them (:class:`GalleryInfo`): the embedding size, the distance, the flip test-time
augmentation and, when a model enrolled them, the model's id and fingerprint, so that queries embedded by another
model are refused rather than silently compared.

**The file**: one parquet file, which is also an embeddings table (:func:`facenet_hf.evaluation.read_table` reads
it): columns ``path``, ``identity``, ``face_index`` (-1: the whole image), ``box`` and ``embedding`` (fixed-size
float32 lists), plus ``enrolment`` (int32: which enrolment added the row); the :class:`GalleryInfo` and the log of
enrolments are JSON in the schema metadata (key ``facenet_hf.gallery``). Enrolment is append-only: new people and
new images of enrolled people are added after the existing rows, which are never modified, reordered or removed;
a row already enrolled (same path and face) is skipped, and one enrolled as another person is refused. Every
write goes to a temporary file renamed over the old one (a reader sees the old gallery or the new one, never
half), with an exclusive lock file beside it held from the read to the rename (two enrolments never lose rows).

**Search** (:meth:`Gallery.search`): the rows nearest each query, then per-identity aggregation: an identity's
distance is its best row's, and k distinct identities are returned. This is exact: rows are taken in order of
similarity, an identity's first row is its best, so once the first m rows hold k distinct identities those are
the k nearest, in order; otherwise m grows (x4) until they do (at most every row). People at exactly the
same distance come in the order the backend returns their rows. Backends:

* ``exact`` (default): torch, one matmul of unit vectors (cosine = 1 - d^2/2) per block of queries, the block
  sized to keep the (queries x N) similarities under ``chunk_bytes``; then ``topk``.
* ``faiss``: faiss ``IndexFlatIP`` (exact: the same results, to float rounding).
* ``faiss-hnsw``: faiss ``IndexHNSWFlat`` (inner product; approximate, for millions of vectors).

faiss-cpu is an optional extra (``pip install 'facenet-hf[search]'``); its indexes are built on first use and
kept with the gallery object until it changes.

**Open set** (:meth:`Gallery.identify`): a query is "unknown" when its best distance exceeds the threshold.
:func:`resolve_threshold` takes the threshold as given, from the model's calibration at a false-accept rate, or
from the model's stored threshold. A FAR is per comparison: a stranger searched against n people is wrongly
matched with a probability of about 1 - (1 - FAR)^n (:func:`expected_fpir`), so a big gallery needs a small FAR.
With a calibration each candidate also gets P(same person | distance): a 1:1 verification probability, not a
posterior over the gallery's people.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facenet_hf.constants import DISTANCES, FLIP_MODES
from facenet_hf.evaluation.embeddings_io import EmbeddingTable, read_table
from facenet_hf.fileio import atomic_path
from facenet_hf.model.calibration import Calibration, model_calibration

__all__ = [
    "BACKENDS",
    "GALLERY_FORMAT",
    "UNKNOWN",
    "Candidate",
    "EnrolSummary",
    "Gallery",
    "GalleryInfo",
    "Identification",
    "SearchResult",
    "default_flip",
    "enrol",
    "expected_fpir",
    "identify_images",
    "is_embeddings_file",
    "load_queries",
    "model_fingerprint",
    "read_gallery_info",
    "resolve_threshold",
]

logger = logging.getLogger(__name__)

GALLERY_FORMAT = "facenet-hf-gallery/1"
METADATA_KEY = b"facenet_hf.gallery"
BACKENDS = ("exact", "faiss", "faiss-hnsw")
UNKNOWN = "unknown"
UNIT_TOLERANCE = 1e-3  # |norm - 1| allowed for an embedding (float32 rounding, fp16 models)
DEFAULT_CHUNK_BYTES = 64 * 1024**2
HNSW_MAX_ROWS = 4096  # an approximate index is not asked for more rows than this per query
ENROL_CHUNK = 256  # images embedded per progress step
_ARCH_FIELDS = (
    "backbone",
    "embedding_dim",
    "head_bn",
    "image_size",
    "mean",
    "std",
    "eval_transforms",
    "alignment",
)


# -- what made the vectors ---------------------------------------------------------------------------------------
def model_fingerprint(model: torch.nn.Module) -> str:
    """``sha256:...`` of what decides a model's embeddings: its architecture and preprocessing fields and every
    weight (as float32). The threshold, calibration and library version are left out: calibrating a model again
    does not change its embeddings. An exported model (``weights_fingerprint``) is identified by its file's hash."""
    given = getattr(model, "weights_fingerprint", None)
    if isinstance(given, str):
        return given
    h = hashlib.sha256()
    config = getattr(model, "config", {}) or {}
    h.update(json.dumps({k: config.get(k) for k in _ARCH_FIELDS}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu()
        t = t.float() if t.is_floating_point() else t
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + h.hexdigest()


def default_flip(model: Any) -> str:
    """The flip test-time augmentation a gallery is enrolled with by default: the one the model's threshold was
    calibrated with (its calibration's, else ``threshold_flip``), so that the threshold applies."""
    cal = model_calibration(model)
    return cal.flip if cal is not None else getattr(model, "threshold_flip", "off")


def _model_dim(model: Any, flip: str) -> int:
    return int(model.embedding_dim) * (2 if flip == "concat" else 1)


@dataclass
class GalleryInfo:
    """What a gallery's vectors are: their size, the distance reported, the flip TTA they were embedded with and
    the model that made them (``None``: unknown, e.g. enrolled from an embeddings file without a model)."""

    dim: int
    distance: str = "squared_euclidean"
    flip: str | None = None
    model_id: str | None = None
    model_fingerprint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim < 1:
            raise ValueError(f"a gallery's dim must be an integer >= 1, got {self.dim!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {list(DISTANCES)}, got {self.distance!r}")
        if self.flip is not None and self.flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {list(FLIP_MODES)} or None, got {self.flip!r}")

    @classmethod
    def for_model(cls, model: Any, *, flip: str | None = None, model_id: str | None = None) -> GalleryInfo:
        flip = flip or default_flip(model)
        return cls(
            dim=_model_dim(model, flip),
            distance=model.distance,
            flip=flip,
            model_id=model_id,
            model_fingerprint=model_fingerprint(model),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "gallery") -> GalleryInfo:
        known = {"dim", "distance", "flip", "model_id", "model_fingerprint"}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: bad gallery metadata: {e}") from None


# -- the file ----------------------------------------------------------------------------------------------------
def _gallery_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.suffix.lower() != ".parquet":
        raise ValueError(f"a gallery file must end in .parquet, got {str(p)!r}")
    return p


def _read_metadata(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    if not path.is_file():
        raise FileNotFoundError(f"gallery file not found: {path}")
    meta = pq.read_schema(path).metadata or {}
    if METADATA_KEY not in meta:
        raise ValueError(
            f"{path} is not a facenet-hf gallery (no gallery metadata); if it is an embeddings table, enrol it into "
            f"a gallery: facenet-hf enrol GALLERY.parquet {path}"
        )
    data = json.loads(meta[METADATA_KEY])
    if data.get("format") != GALLERY_FORMAT:
        raise ValueError(f"{path}: gallery format {data.get('format')!r} is not {GALLERY_FORMAT!r}")
    return data


def read_gallery_info(path: str | os.PathLike) -> GalleryInfo:
    """The :class:`GalleryInfo` of a gallery file, from its metadata only (no vector is read)."""
    p = _gallery_path(path)
    return GalleryInfo.from_dict(_read_metadata(p).get("info", {}), where=str(p))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``.<name>.lock`` beside ``path`` (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def is_embeddings_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an embeddings file (``.npz``, or ``.parquet`` with an ``embedding`` column) rather than
    images or an image dataset."""
    p = Path(path)
    if not p.is_file():
        return False
    if p.suffix.lower() == ".npz":
        return True
    if p.suffix.lower() != ".parquet":
        return False
    import pyarrow.parquet as pq

    try:
        return "embedding" in pq.read_schema(p).names
    except Exception:  # not a readable parquet: let the image loader say what is wrong
        return False


# -- results -----------------------------------------------------------------------------------------------------
@dataclass
class SearchResult:
    """Per query, the k nearest identities in rank order: names, distances (float64, the gallery's distance;
    ``inf`` pads rows with fewer candidates), the gallery row of each identity's nearest image (-1 pads) and its
    path."""

    identities: list[list[str]]
    distances: np.ndarray
    rows: np.ndarray
    paths: list[list[str]]
    distance: str


@dataclass
class Candidate:
    """One identity of a query's top-k: its distance, P(same person) when calibrated, the nearest gallery image."""

    identity: str
    distance: float
    score: float | None
    path: str


@dataclass
class Identification:
    """One query's answer: ``identity`` is the nearest person when accepted (distance <= threshold), None when
    the query is unknown; ``candidates`` are the top-k either way."""

    query: str
    identity: str | None
    distance: float
    threshold: float | None
    candidates: list[Candidate]

    @property
    def known(self) -> bool:
        return self.identity is not None

    @property
    def decision(self) -> str:
        """The identity, or ``"unknown"``."""
        return self.identity if self.identity is not None else UNKNOWN

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "identity": self.identity,
            "decision": self.decision,
            "known": self.known,
            "distance": None if math.isinf(self.distance) else self.distance,
            "threshold": self.threshold,
            "candidates": [asdict(c) for c in self.candidates],
        }


@dataclass
class EnrolSummary:
    """What an enrolment did: rows added and skipped (already enrolled), images that failed, the people added
    and those who got more images, the gallery's size after, and warnings (e.g. a one-person gallery)."""

    gallery: Path
    added: int
    skipped: int
    new_people: list[str]
    more_images: list[str]
    rows: int
    people: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["gallery"] = str(self.gallery)
        out["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        return out


# -- the gallery -------------------------------------------------------------------------------------------------
def _check_unit(emb: np.ndarray, where: str) -> None:
    if not len(emb):
        return
    if not np.all(np.isfinite(emb)):
        raise ValueError(f"{where}: embeddings contain NaN or inf values")
    norms = np.linalg.norm(emb.astype(np.float64), axis=1)
    if np.any(np.abs(norms - 1.0) > UNIT_TOLERANCE):
        raise ValueError(
            f"{where}: embeddings must be unit vectors (L2 norm 1, as FaceNet's are), found norms from "
            f"{norms.min():.4g} to {norms.max():.4g}; normalise them first (x / ||x||)"
        )


def _complete(table: EmbeddingTable) -> EmbeddingTable:
    """The table with face_index (-1) and boxes (NaN) filled in, so that every gallery row has them."""
    n = len(table)
    return EmbeddingTable(
        table.paths,
        table.embeddings,
        table.identities,
        table.face_index if table.face_index is not None else np.full(n, -1, np.int32),
        table.boxes if table.boxes is not None else np.full((n, 4), np.nan, np.float32),
    )


def _to_distance(sims: np.ndarray, kind: str) -> np.ndarray:
    """Cosine similarities of unit vectors -> squared Euclidean (2 - 2 cos) or Euclidean distances, float64."""
    d = np.maximum(2.0 - 2.0 * np.asarray(sims, dtype=np.float64), 0.0)
    return d if kind == "squared_euclidean" else np.sqrt(d)


def _convert(d: Any, src: str, dst: str) -> Any:
    """A distance (or threshold) from one kind to the other."""
    if src == dst:
        return d
    return np.sqrt(d) if dst == "euclidean" else np.square(d)


def _first_identities(
    sims: np.ndarray, rows: np.ndarray, ident: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """From each query's rows in order of similarity (-1: no row), the first k distinct identities.

    Returns (identity index, similarity, row), each (queries, k) with -1 / -inf / -1 padding, and whether each
    query got k identities."""
    n, _ = rows.shape
    valid = rows >= 0
    ids = np.where(valid, ident[np.where(valid, rows, 0)], -1)
    order = np.argsort(ids, axis=1, kind="stable")
    sid = np.take_along_axis(ids, order, axis=1)
    first_sorted = np.ones_like(sid, dtype=bool)
    first_sorted[:, 1:] = sid[:, 1:] != sid[:, :-1]
    first_sorted &= sid >= 0
    first = np.zeros_like(first_sorted)
    np.put_along_axis(first, order, first_sorted, axis=1)
    rank = np.cumsum(first, axis=1)
    keep = first & (rank <= k)
    out_id = np.full((n, k), -1, np.int64)
    out_s = np.full((n, k), -np.inf, np.float64)
    out_r = np.full((n, k), -1, np.int64)
    r, c = np.nonzero(keep)
    slot = rank[r, c] - 1
    out_id[r, slot] = ids[r, c]
    out_s[r, slot] = sims[r, c]
    out_r[r, slot] = rows[r, c]
    return out_id, out_s, out_r, first.sum(axis=1) >= k


def _faiss():
    try:
        import faiss
    except ImportError:
        raise ImportError(
            "the faiss search backends need faiss-cpu: pip install 'facenet-hf[search]' (or pip install faiss-cpu); "
            "the default backend, exact, needs nothing more"
        ) from None
    return faiss


class Gallery:
    """Enrolled people: unit embeddings with the identity, image path, face index and box of each row.

    Build one with ``Gallery(GalleryInfo(...))`` or ``Gallery(GalleryInfo.for_model(model))`` and :meth:`add`,
    or use :func:`enrol` on a file; :meth:`load` / :meth:`save` read and write the file (see the module doc)."""

    def __init__(
        self,
        info: GalleryInfo,
        table: EmbeddingTable | None = None,
        *,
        enrolment: Any = None,
        log: Sequence[dict[str, Any]] = (),
    ) -> None:
        self.info = info
        table = table if table is not None else EmbeddingTable([], np.zeros((0, info.dim), np.float32), [])
        if len(table):
            self.check_table(table, "gallery rows")
            dups = len(table.keys) - len(set(table.keys))
            if dups:
                raise ValueError(
                    f"gallery rows: {dups} repeated (path, face) rows; each must be enrolled once"
                )
        names = [] if table.identities is None else [str(i) for i in table.identities]
        emb = (
            table.embeddings if table.embeddings.flags.writeable else table.embeddings.copy()
        )  # torch shares it
        self._table = _complete(EmbeddingTable(table.paths, emb, names, table.face_index, table.boxes))
        n = len(self._table)
        self._enrolment = np.zeros(n, np.int32) if enrolment is None else np.asarray(enrolment, np.int32)
        if self._enrolment.shape != (n,):
            raise ValueError(f"gallery: {self._enrolment.size} enrolment numbers for {n} rows")
        self.log: list[dict[str, Any]] = [dict(e) for e in log]
        self._reset()

    def _reset(self) -> None:
        self._people: list[str] | None = None
        self._ident: np.ndarray | None = None
        self._max_rows = 0
        self._faiss_indexes: dict[tuple, Any] = {}

    def _index(self) -> tuple[list[str], np.ndarray]:
        if self._people is None:
            names, inv, counts = np.unique(
                np.asarray(self._table.identities, dtype=object).astype(str),
                return_inverse=True,
                return_counts=True,
            )
            self._people = names.tolist()
            self._ident = inv.reshape(-1).astype(np.int64)
            self._max_rows = int(counts.max()) if counts.size else 0
        return self._people, self._ident

    # -- contents ------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._table)

    def __repr__(self) -> str:
        return f"Gallery({len(self)} vectors of {len(self.people)} people, dim {self.info.dim})"

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def vectors(self) -> np.ndarray:
        """The (N, D) float32 unit embeddings (a read-only view)."""
        v = self._table.embeddings.view()
        v.flags.writeable = False
        return v

    @property
    def identities(self) -> list[str]:
        """The person of each row."""
        return list(self._table.identities)

    @property
    def paths(self) -> list[str]:
        return list(self._table.paths)

    @property
    def keys(self) -> list[str]:
        """A unique name per row: the path, with ``#face_index`` for a detected face."""
        return self._table.keys

    @property
    def enrolment(self) -> np.ndarray:
        """Which enrolment (0, 1, ...) added each row."""
        return self._enrolment.copy()

    @property
    def people(self) -> list[str]:
        """The enrolled people, sorted."""
        return list(self._index()[0])

    def table(self) -> EmbeddingTable:
        """The rows as an :class:`~facenet_hf.evaluation.EmbeddingTable` (a copy)."""
        return self._table.select(np.arange(len(self)))

    # -- checks ----------------------------------------------------------------------------------------------
    def check_table(self, table: EmbeddingTable, where: str) -> None:
        """Refuse rows that cannot be enrolled: another dimension, missing or empty identities, non-unit vectors.
        Messages name ``where`` (e.g. the file the rows came from)."""
        if len(table) and table.dim != self.info.dim:
            raise ValueError(
                f"{where} holds {table.dim}-d embeddings but the gallery holds {self.info.dim}-d ones"
                f"{self._made_by()}: enrol embeddings of the gallery's model (and flip mode), or start a new "
                "gallery file"
            )
        if table.identities is None:
            raise ValueError(
                f"{where} has no identity column: enrolment needs the person of each row (a people folder "
                "Person/img.jpg, an embeddings parquet with an 'identity' column, or one name for all: --identity NAME)"
            )
        bad = [
            table.keys[i] for i, name in enumerate(table.identities) if name is None or not str(name).strip()
        ]
        if bad:
            raise ValueError(
                f"{where}: {len(bad)} row(s) have no identity, e.g. {bad[:3]}; every enrolled row needs its person"
            )
        _check_unit(table.embeddings, where)

    def check_queries(self, embeddings: Any, where: str = "queries") -> np.ndarray:
        """``embeddings`` as float32 (n, D) unit vectors of the gallery's dimension, or ``ValueError`` naming
        ``where``."""
        q = np.ascontiguousarray(
            embeddings.detach().cpu().numpy() if isinstance(embeddings, torch.Tensor) else embeddings,
            dtype=np.float32,
        )
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2:
            raise ValueError(f"{where}: queries must be (n, D) embeddings, got shape {q.shape}")
        if q.shape[1] != self.info.dim:
            raise ValueError(
                f"{where} holds {q.shape[1]}-d embeddings but the gallery holds {self.info.dim}-d ones"
                f"{self._made_by()}: embed the queries with the gallery's model (and flip mode)"
            )
        _check_unit(q, where)
        return q

    def _made_by(self) -> str:
        parts = [f"model {self.info.model_id}" if self.info.model_id else None]
        parts.append(f"flip {self.info.flip}" if self.info.flip else None)
        parts = [p for p in parts if p]
        return f" ({', '.join(parts)})" if parts else ""

    def check_model(self, model: Any, *, flip: str | None = None) -> None:
        """Refuse a model whose embeddings cannot be compared with the gallery's: another size, flip mode or
        (when the gallery knows its model) another model fingerprint."""
        flip = flip or self.info.flip or default_flip(model)
        if self.info.flip is not None and flip != self.info.flip:
            raise ValueError(
                f"the gallery was enrolled with flip {self.info.flip!r}; queries must use the same (got {flip!r})"
            )
        dim = _model_dim(model, flip)
        if dim != self.info.dim:
            raise ValueError(
                f"this model makes {dim}-d embeddings (flip {flip!r}) but the gallery holds {self.info.dim}-d ones"
                f"{self._made_by()}: use the gallery's model, or enrol into a new gallery file"
            )
        if self.info.model_fingerprint is not None:
            mine = model_fingerprint(model)
            if mine != self.info.model_fingerprint:
                who = f" {self.info.model_id}" if self.info.model_id else ""
                raise ValueError(
                    f"the gallery was enrolled with another model{who} (fingerprint "
                    f"{self.info.model_fingerprint[:19]}..., this one's is {mine[:19]}...): its embeddings are not "
                    "comparable; use that model, or enrol into a new gallery file"
                )

    # -- enrolment ---------------------------------------------------------------------------------------------
    def add(self, table: EmbeddingTable, *, source: str = "<table>") -> EnrolSummary:
        """Append ``table``'s rows (in memory; :meth:`save` writes them). Rows already enrolled (same path and
        face, same person) are skipped; one enrolled as another person is refused, as are repeated rows."""
        self.check_table(table, source)
        keys = table.keys
        if len(set(keys)) != len(keys):
            seen: set[str] = set()
            dup = next(k for k in keys if k in seen or seen.add(k))
            raise ValueError(
                f"{source}: row {dup!r} appears more than once; each image (face) is enrolled once"
            )
        existing = dict(zip(self.keys, self._table.identities, strict=True))
        names = [str(i) for i in table.identities]
        clash = [
            (k, existing[k], n)
            for k, n in zip(keys, names, strict=True)
            if k in existing and existing[k] != n
        ]
        if clash:
            k, old, new = clash[0]
            raise ValueError(
                f"{source}: {len(clash)} row(s) are already enrolled as another person, e.g. {k!r} as {old!r} "
                f"(now {new!r}); the gallery is append-only: enrol into a new gallery file to relabel"
            )
        fresh = np.asarray([k not in existing for k in keys], dtype=bool)
        people_before = set(self.people)
        table = EmbeddingTable(table.paths, table.embeddings, names, table.face_index, table.boxes)
        added = table.select(fresh)
        if len(added):
            number = len(self.log)
            self._table = _complete(EmbeddingTable.concat([self._table, _complete(added)]))
            self._enrolment = np.concatenate([self._enrolment, np.full(len(added), number, np.int32)])
            self.log.append(
                {
                    "enrolment": number,
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "source": source,
                    "rows": len(added),
                }
            )
            self._reset()
        new_names = sorted(set(added.identities or []))
        summary = EnrolSummary(
            gallery=Path("<memory>"),
            added=len(added),
            skipped=int((~fresh).sum()),
            new_people=[n for n in new_names if n not in people_before],
            more_images=[n for n in new_names if n in people_before],
            rows=len(self),
            people=len(self.people),
        )
        if summary.people == 1:
            summary.warnings.append(
                f"the gallery holds one person ({self.people[0]}): identify then answers whether a face is that "
                "person (1:1 verification); open-set identification and its metrics need at least 2 people"
            )
        return summary

    def fill_info(self, model: Any, *, flip: str, model_id: str | None) -> None:
        """Fill in what the gallery did not know about its model (fields already known never change)."""
        info = self.info
        if info.flip is None:
            info.flip = flip
        if info.model_fingerprint is None:
            info.model_fingerprint = model_fingerprint(model)
            info.distance = model.distance
        if info.model_id is None and model_id is not None:
            info.model_id = model_id

    # -- the file ----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> Gallery:
        """Read a gallery file (``ValueError`` naming it for anything that is not one)."""
        import pyarrow.parquet as pq

        p = _gallery_path(path)
        meta = _read_metadata(p)
        info = GalleryInfo.from_dict(meta.get("info", {}), where=str(p))
        table = read_table(p)
        names = pq.read_schema(p).names
        enrolment = (
            pq.read_table(p, columns=["enrolment"]).column("enrolment").to_numpy()
            if "enrolment" in names
            else None
        )
        try:
            return cls(info, table, enrolment=enrolment, log=meta.get("log", []))
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the gallery to ``path`` (``.parquet``) atomically; returns the path."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        p = _gallery_path(path)
        t = self._table
        cols = {
            "path": pa.array(t.paths, type=pa.string()),
            "identity": pa.array([str(i) for i in t.identities], type=pa.string()),
            "face_index": pa.array(t.face_index, type=pa.int32()),
            "box": pa.FixedSizeListArray.from_arrays(pa.array(t.boxes.reshape(-1), type=pa.float32()), 4),
            "embedding": pa.FixedSizeListArray.from_arrays(
                pa.array(t.embeddings.reshape(-1), type=pa.float32()), self.info.dim
            ),
            "enrolment": pa.array(self._enrolment, type=pa.int32()),
        }
        meta = {"format": GALLERY_FORMAT, "info": self.info.to_dict(), "log": self.log}
        table = pa.table(cols).replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
        p.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(p) as tmp:
            pq.write_table(table, tmp)
        return p

    # -- search ------------------------------------------------------------------------------------------------
    def _exact_rows(self, q: np.ndarray, m: int, chunk_bytes: int) -> tuple[np.ndarray, np.ndarray]:
        g = torch.from_numpy(np.ascontiguousarray(self._table.embeddings))
        per = max(1, chunk_bytes // (4 * len(self)))
        sims, rows = [], []
        with torch.inference_mode():
            qt = torch.from_numpy(q)
            for start in range(0, len(q), per):
                s = qt[start : start + per] @ g.T
                v, i = torch.topk(s, m, dim=1, largest=True, sorted=True)
                sims.append(v.numpy())
                rows.append(i.numpy())
        return np.concatenate(sims), np.concatenate(rows)

    def faiss_index(self, kind: str = "flat", *, hnsw_m: int = 32, ef_construction: int = 80) -> Any:
        """The faiss index of the gallery's vectors (``flat``: ``IndexFlatIP``; ``hnsw``: ``IndexHNSWFlat`` with
        inner product), built on first use and kept until the gallery changes."""
        faiss = _faiss()
        key = (kind,) if kind == "flat" else (kind, hnsw_m, ef_construction)
        index = self._faiss_indexes.get(key)
        if index is None:
            if kind == "flat":
                index = faiss.IndexFlatIP(self.info.dim)
            elif kind == "hnsw":
                index = faiss.IndexHNSWFlat(self.info.dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = ef_construction
            else:
                raise ValueError(f"faiss index kind must be 'flat' or 'hnsw', got {kind!r}")
            index.add(np.ascontiguousarray(self._table.embeddings))
            self._faiss_indexes[key] = index
        return index

    def search(
        self,
        queries: Any,
        k: int = 5,
        *,
        backend: str = "exact",
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 128,
    ) -> SearchResult:
        """The ``k`` nearest people of each query (unit embeddings, (n, D) or (D,)); see the module doc.

        ``backend``: ``exact`` (torch), ``faiss`` (IndexFlatIP, exact) or ``faiss-hnsw`` (approximate;
        ``hnsw_m``, ``ef_construction`` build it, ``ef_search`` >= the rows asked for searches it)."""
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        q = self.check_queries(queries)
        if len(self) == 0:
            raise ValueError("the gallery is empty: enrol people first (facenet-hf enrol)")
        people, ident = self._index()
        n_rows = len(self)
        k_eff = min(k, len(people))
        if backend == "exact":

            def rows_of(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
                return self._exact_rows(x, m, chunk_bytes)

        else:
            index = self.faiss_index(
                "flat" if backend == "faiss" else "hnsw", hnsw_m=hnsw_m, ef_construction=ef_construction
            )

            def rows_of(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
                if backend == "faiss-hnsw":
                    index.hnsw.efSearch = max(ef_search, m)
                sims, rows = index.search(x, m)
                return sims, rows.astype(np.int64)

        limit = n_rows if backend != "faiss-hnsw" else min(n_rows, max(HNSW_MAX_ROWS, k_eff))
        guaranteed = k_eff * self._max_rows  # k identities always lie within this many rows
        m = min(limit, guaranteed if guaranteed <= max(256, 8 * k_eff) else 8 * k_eff)
        if len(q) == 0:
            return SearchResult(
                [], np.zeros((0, k_eff)), np.zeros((0, k_eff), np.int64), [], self.info.distance
            )
        out_id = np.full((len(q), k_eff), -1, np.int64)
        out_s = np.full((len(q), k_eff), -np.inf)
        out_r = np.full((len(q), k_eff), -1, np.int64)
        todo = np.arange(len(q))
        while todo.size:
            sims, rows = rows_of(q[todo], m)
            ids, s, r, ok = _first_identities(sims, rows, ident, k_eff)
            last = m >= limit
            take = np.ones_like(ok) if last else ok
            out_id[todo[take]], out_s[todo[take]], out_r[todo[take]] = ids[take], s[take], r[take]
            if last:
                break
            todo = todo[~ok]
            m = min(limit, m * 4)
        dist = _to_distance(out_s, self.info.distance)
        dist[out_id < 0] = np.inf
        paths = self._table.paths
        return SearchResult(
            identities=[[people[i] for i in row if i >= 0] for row in out_id],
            distances=dist,
            rows=out_r,
            paths=[[paths[j] for j in row if j >= 0] for row in out_r],
            distance=self.info.distance,
        )

    def identify(
        self,
        queries: Any,
        k: int = 5,
        *,
        threshold: float | None,
        calibration: Calibration | None = None,
        names: Sequence[str] | None = None,
        backend: str = "exact",
        **search_options: Any,
    ) -> list[Identification]:
        """Open-set identification: each query's top-k people, and its identity when the nearest is within
        ``threshold`` (the gallery's distance; None: closed set, the nearest is always the answer), else unknown.

        ``calibration``: gives each candidate P(same person | distance). ``names``: one per query (default
        ``query 0``, ...). ``search_options`` go to :meth:`search`."""
        res = self.search(queries, k, backend=backend, **search_options)
        n = len(res.identities)
        names = [f"query {i}" for i in range(n)] if names is None else [str(x) for x in names]
        if len(names) != n:
            raise ValueError(f"{len(names)} names for {n} queries; they must match")
        scores = None
        if calibration is not None:
            d = _convert(
                np.where(np.isinf(res.distances), 4.0, res.distances),
                self.info.distance,
                calibration.distance,
            )
            scores = np.asarray(calibration.probability(d), dtype=np.float64)
        out = []
        for i in range(n):
            cands = [
                Candidate(
                    identity=res.identities[i][j],
                    distance=float(res.distances[i, j]),
                    score=None if scores is None else float(scores[i, j]),
                    path=res.paths[i][j],
                )
                for j in range(len(res.identities[i]))
            ]
            best = cands[0].distance if cands else math.inf
            accepted = bool(cands) and (threshold is None or best <= threshold)
            out.append(
                Identification(
                    query=names[i],
                    identity=cands[0].identity if accepted else None,
                    distance=best,
                    threshold=None if threshold is None else float(threshold),
                    candidates=cands,
                )
            )
        return out


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

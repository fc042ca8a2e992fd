"""The :class:`Gallery`: rows in memory, exact and faiss search with per-identity aggregation, the open-set rule,
loading and append-only saving (see the package doc)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from facenet_hf.apps.gallery.results import Candidate, EnrolSummary, Identification, SearchResult
from facenet_hf.apps.gallery.store import (
    BACKENDS,
    DEFAULT_CHUNK_BYTES,
    GALLERY_FORMAT,
    HNSW_MAX_ROWS,
    METADATA_KEY,
    UNIT_TOLERANCE,
    GalleryInfo,
    _gallery_path,
    _model_dim,
    _read_metadata,
    default_flip,
    model_fingerprint,
)
from facenet_hf.evaluation.embeddings_io import EmbeddingTable, read_table
from facenet_hf.fileio import atomic_path
from facenet_hf.model.calibration import Calibration

logger = logging.getLogger(__name__)


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

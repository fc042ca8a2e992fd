"""Open-set identification metrics (1:N search): rank-k (CMC) and DIR@FPIR, as IJB-C and NIST FRVT report them.

A probe is *mated* when its identity is enrolled in the gallery, *non-mated* otherwise. A gallery identity may
have several images: its distance to a probe is the smallest over its images, and each probe's identities are
ranked by that distance (smaller = more alike; a candidate is accepted iff its distance <= the threshold t).

* **rank-k** (the CMC curve, closed-set, no threshold): the fraction of mated probes whose own identity is among
  their k nearest identities; **rank-1** is CMC(1).
* **FPIR(t)**, the false-positive identification rate: the fraction of non-mated probes whose nearest identity is
  accepted (distance <= t). NIST FRVT: "the fraction of non-mated searches where one or more enrolled identities
  are returned at or above the threshold"; with similarity scores "at or above", with distances "at or below".
* **DIR(t)**, the detection-and-identification rate (IJB-C's TPIR at rank 1, NIST's 1 - FNIR(N, R=1, t)): the
  fraction of mated probes whose nearest identity is their own *and* is accepted (distance <= t).
* **DIR@FPIR=f**: DIR at the largest threshold whose FPIR is at most f. With the non-mated probes' nearest
  distances sorted, n_1 <= ... <= n_M, and j = floor(f * M) of them allowed to be accepted, t is the largest
  float below n_(j+1): every probe nearer than n_(j+1) is accepted (t = +inf when j = M).

Ties. Non-mated probes tied at n_(j+1) are rejected together, so the achieved FPIR (reported as
``fpir_achieved``) can be below f; a threshold is never chosen that would exceed f. Identities at the same
distance from a probe are ranked in the sorted order of their labels (a stable sort), so a probe tied between its
mate and another identity is correct at rank 1 only if its mate's label sorts first.

``similarity=True`` takes scores where larger is more alike (cosine): they are ranked as distances ``-score``
and thresholds are reported back as similarities (accept iff score >= threshold).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_FPIR",
    "DEFAULT_RANKS",
    "identification_metrics",
    "rank_identities",
    "ranked_identification_metrics",
    "threshold_at_fpir",
]

DEFAULT_FPIR = (0.01, 0.1)  # IJB-C 1:N reports TPIR at FPIR 1e-2 and 1e-1
DEFAULT_RANKS = (1, 5, 10)


def _matrix(distances: Any, similarity: bool) -> np.ndarray:
    d = np.asarray(distances, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"distances must be a 2-D (probes x gallery) matrix, got shape {d.shape}")
    if np.isnan(d).any():
        raise ValueError("distances contain NaN")
    return -d if similarity else d


def rank_identities(
    distances: Any, gallery_labels: Sequence[Any], *, k: int | None = None, similarity: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Each probe's ``k`` nearest gallery identities (all of them by default) from a (probes x gallery) matrix.

    Returns ``(labels, distances)``, both (probes, k): the identities in rank order and their distance (the
    smallest over the identity's gallery columns; a similarity again with ``similarity=True``). Identities at
    equal distance are ranked in sorted label order."""
    d = _matrix(distances, similarity)
    labels = np.asarray(gallery_labels)
    if labels.ndim != 1 or labels.shape[0] != d.shape[1]:
        raise ValueError(
            f"gallery_labels must be 1-D with one label per gallery column ({d.shape[1]}), got shape {labels.shape}"
        )
    if d.shape[1] == 0:
        raise ValueError("the gallery is empty: nothing to rank")
    names, inv = np.unique(labels, return_inverse=True)
    inv = inv.reshape(-1)
    order = np.argsort(inv, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(inv[order]) != 0])
    per_id = np.minimum.reduceat(d[:, order], starts, axis=1) if d.shape[0] else np.zeros((0, names.size))
    k = names.size if k is None else int(k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, names.size)
    rank = np.argsort(per_id, axis=1, kind="stable")[:, :k]
    ranked = np.take_along_axis(per_id, rank, axis=1)
    return names[rank], (-ranked if similarity else ranked)


def threshold_at_fpir(nonmated_top1: Any, fpir: float, *, similarity: bool = False) -> float:
    """The largest threshold at which at most ``floor(fpir * M)`` of the ``M`` non-mated probes are accepted.

    ``nonmated_top1``: each non-mated probe's distance to its nearest identity (similarity with
    ``similarity=True``; the threshold is then a similarity, accept iff score >= it). See the module doc for
    ties; ``inf`` (``-inf`` for similarities) when every non-mated probe may be accepted."""
    if not (isinstance(fpir, (int, float)) and 0.0 < fpir <= 1.0):
        raise ValueError(f"fpir must be a rate in (0, 1], got {fpir!r}")
    n = np.sort(
        -np.asarray(nonmated_top1, dtype=np.float64) if similarity else np.asarray(nonmated_top1, float)
    )
    n = n.reshape(-1)
    if n.size == 0:
        raise ValueError("a threshold at an FPIR needs at least one non-mated probe")
    allowed = math.floor(fpir * n.size * (1.0 + 1e-12))  # probes that may be accepted (1e-12: 0.1 * 30 = 3)
    t = math.inf if allowed >= n.size else float(np.nextafter(n[allowed], -np.inf))
    return -t if similarity else t


def _check_rates(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    bad = [v for v in out if not 0.0 < v <= 1.0]
    if bad:
        raise ValueError(f"{name} values must be rates in (0, 1], got {bad}")
    return out


def ranked_identification_metrics(
    ranked_labels: Any,
    ranked_distances: Any,
    probe_labels: Sequence[Any],
    gallery_identities: Sequence[Any],
    *,
    fpir: Sequence[float] = DEFAULT_FPIR,
    ranks: Sequence[int] = DEFAULT_RANKS,
    similarity: bool = False,
) -> dict[str, Any]:
    """Rank-k and DIR@FPIR from each probe's ranked candidate list (e.g. a gallery search's top-k).

    ``ranked_labels`` / ``ranked_distances``: (probes, k) identities in rank order and their distances;
    ``gallery_identities``: every enrolled identity (a probe is mated iff its label is one). A rank r > k can be
    scored only when k covers every identity. Raises ``ValueError`` for a gallery of fewer than 2 identities,
    no mated probe, or (with ``fpir``) no non-mated probe.

    Returns ``rank_1``, ``cmc`` ({rank: rate}), ``dir_at_fpir`` (a list of ``{fpir, threshold, dir,
    fpir_achieved}``), ``n_probes``, ``n_mated``, ``n_nonmated``, ``n_gallery_identities``."""
    labels = np.asarray(ranked_labels)
    dist = np.asarray(ranked_distances, dtype=np.float64)
    if labels.ndim != 2 or labels.shape != dist.shape or labels.shape[1] < 1:
        raise ValueError(
            f"ranked_labels and ranked_distances must be (probes, k) with k >= 1, got {labels.shape} and {dist.shape}"
        )
    probes = np.asarray(probe_labels)
    if probes.shape != (labels.shape[0],):
        raise ValueError(f"{labels.shape[0]} ranked lists but {probes.size} probe labels; they must match")
    enrolled = set(np.asarray(gallery_identities).reshape(-1).tolist())
    if len(enrolled) < 2:
        raise ValueError(
            f"open-set identification needs a gallery of at least 2 identities, got {len(enrolled)} "
            f"({sorted(map(str, enrolled))}): with one person a search is a 1:1 verification; enrol more people, "
            "or measure verification (facenet-hf evaluate / calibrate)"
        )
    fpirs = _check_rates(fpir, "fpir")
    ranks = [int(r) for r in ranks]
    if any(r < 1 for r in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    k = labels.shape[1]
    too_deep = [r for r in ranks if r > k and k < len(enrolled)]
    if too_deep:
        raise ValueError(
            f"rank(s) {too_deep} need candidate lists of that length; got {k} candidates of {len(enrolled)} identities"
        )
    mated = np.fromiter((p in enrolled for p in probes.tolist()), dtype=bool, count=probes.size)
    n_mated, n_non = int(mated.sum()), int((~mated).sum())
    if n_mated == 0:
        raise ValueError(
            f"none of the {probes.size} probes is of an enrolled identity: rank-1 and DIR need mated probes"
        )
    if fpirs and n_non == 0:
        raise ValueError(
            f"all {probes.size} probes are of enrolled identities: DIR@FPIR needs non-mated probes (people not in "
            "the gallery); pass fpir=() for the closed-set ranks only"
        )
    d = -dist if similarity else dist
    hit = labels[mated] == probes[mated][:, None]  # (mated, k): where the mate is
    mate_rank = np.where(hit.any(axis=1), hit.argmax(axis=1) + 1, np.iinfo(np.int64).max)
    cmc = {r: float(np.mean(mate_rank <= r)) for r in sorted(set(ranks) | {1})}
    top1_correct = mate_rank == 1
    mated_top1 = d[mated, 0]
    nonmated_top1 = d[~mated, 0]
    rows = []
    for f in fpirs:
        t = threshold_at_fpir(nonmated_top1, f)
        rows.append(
            {
                "fpir": f,
                "threshold": -t if similarity else t,
                "dir": float(np.mean(top1_correct & (mated_top1 <= t))),
                "fpir_achieved": float(np.mean(nonmated_top1 <= t)),
            }
        )
    return {
        "rank_1": cmc[1],
        "cmc": {r: cmc[r] for r in sorted(set(ranks))},
        "dir_at_fpir": rows,
        "n_probes": int(probes.size),
        "n_mated": n_mated,
        "n_nonmated": n_non,
        "n_gallery_identities": len(enrolled),
    }


def identification_metrics(
    distances: Any,
    probe_labels: Sequence[Any],
    gallery_labels: Sequence[Any],
    *,
    fpir: Sequence[float] = DEFAULT_FPIR,
    ranks: Sequence[int] = DEFAULT_RANKS,
    similarity: bool = False,
) -> dict[str, Any]:
    """Open-set identification metrics from a full (probes x gallery) distance (or ``similarity``) matrix.

    ``gallery_labels``: the identity of each gallery column (several columns may share one); ``probe_labels``:
    each probe's identity (one not in the gallery makes it non-mated). See the module doc for the definitions
    and :func:`ranked_identification_metrics` for what is returned."""
    ranked_labels, ranked_d = rank_identities(distances, gallery_labels, similarity=similarity)
    return ranked_identification_metrics(
        ranked_labels,
        ranked_d,
        probe_labels,
        np.unique(np.asarray(gallery_labels)),
        fpir=fpir,
        ranks=ranks,
        similarity=similarity,
    )

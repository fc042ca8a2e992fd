"""What searches, identifications and enrolments return."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from facenet_hf.apps.gallery.store import UNKNOWN


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

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

Modules: ``store`` (the file and what made it), ``results``, ``index`` (:class:`Gallery`, search), ``enrolment``
(thresholds, :func:`enrol`, :func:`identify_images`).
"""

from __future__ import annotations

from facenet_hf.apps.gallery.enrolment import (
    enrol,
    expected_fpir,
    identify_images,
    load_queries,
    resolve_threshold,
)
from facenet_hf.apps.gallery.index import Gallery
from facenet_hf.apps.gallery.results import Candidate, EnrolSummary, Identification, SearchResult
from facenet_hf.apps.gallery.store import (
    BACKENDS,
    GALLERY_FORMAT,
    UNKNOWN,
    GalleryInfo,
    default_flip,
    is_embeddings_file,
    model_fingerprint,
    read_gallery_info,
)

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

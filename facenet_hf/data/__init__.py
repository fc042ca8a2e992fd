"""Data layer: sources -> ``datasets.Dataset``, LFW pairs and identity-disjoint splits, the P x K batch sampler.

Images and transforms live in :mod:`facenet_hf.data.images` and :mod:`facenet_hf.data.transforms` (import them
from there; they pull in torch).
"""

from facenet_hf.data.lfw import (
    LFWPairs,
    PairsFormatError,
    SplitOverlapError,
    check_disjoint,
    find_image_root,
    identity_disjoint_split,
    missing_pair_images,
    pair_identities,
    read_pairs,
)
from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import (
    SOURCE_FEATURES,
    SourceError,
    arrow_column,
    combine_sources,
    labels_file_dataset,
    labels_of,
    load_source,
)

__all__ = [
    "SOURCE_FEATURES",
    "LFWPairs",
    "PKBatchSampler",
    "PairsFormatError",
    "SourceError",
    "SplitOverlapError",
    "arrow_column",
    "check_disjoint",
    "combine_sources",
    "find_image_root",
    "identity_disjoint_split",
    "labels_file_dataset",
    "labels_of",
    "load_source",
    "missing_pair_images",
    "pair_identities",
    "read_pairs",
]

"""Evaluation: verification protocol, retrieval metrics, plots, the ``evaluate`` metric and embedding files.

Names are imported lazily, so ``import facenet_hf.evaluation`` pulls in neither matplotlib nor ``evaluate``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "verification_protocol": "verification",
    "report_to_json": "verification",
    "best_threshold": "verification",
    "threshold_at_far": "verification",
    "roc_curve": "verification",
    "roc_auc": "verification",
    "equal_error_rate": "verification",
    "stratified_subfolds": "verification",
    "plot_roc": "plots",
    "plot_distance_histogram": "plots",
    "retrieval_metrics": "retrieval",
    "FaceVerification": "metric",
    "save_embeddings": "embeddings_io",
    "load_embeddings": "embeddings_io",
    "pair_distances": "embeddings_io",
    "EmbeddingTable": "embeddings_io",
    "read_table": "embeddings_io",
    "write_table": "embeddings_io",
    "identification_metrics": "identification",
    "ranked_identification_metrics": "identification",
    "rank_identities": "identification",
    "threshold_at_fpir": "identification",
    "ClusteringMetrics": "clustering",
    "clustering_metrics": "clustering",
    "plot_embedding_map": "plots_apps",
    "plot_worst_pairs": "plots_apps",
    "worst_pairs": "plots_apps",
}

__all__ = [
    "ClusteringMetrics",
    "EmbeddingTable",
    "FaceVerification",
    "best_threshold",
    "clustering_metrics",
    "equal_error_rate",
    "identification_metrics",
    "load_embeddings",
    "pair_distances",
    "plot_distance_histogram",
    "plot_embedding_map",
    "plot_roc",
    "plot_worst_pairs",
    "rank_identities",
    "ranked_identification_metrics",
    "read_table",
    "report_to_json",
    "retrieval_metrics",
    "roc_auc",
    "roc_curve",
    "save_embeddings",
    "stratified_subfolds",
    "threshold_at_far",
    "threshold_at_fpir",
    "verification_protocol",
    "worst_pairs",
    "write_table",
]

if TYPE_CHECKING:
    from .embeddings_io import (
        EmbeddingTable,
        load_embeddings,
        pair_distances,
        read_table,
        save_embeddings,
        write_table,
    )
    from .identification import (
        identification_metrics,
        rank_identities,
        ranked_identification_metrics,
        threshold_at_fpir,
    )
    from .metric import FaceVerification
    from .plots import plot_distance_histogram, plot_roc
    from .retrieval import retrieval_metrics
    from .verification import (
        best_threshold,
        equal_error_rate,
        report_to_json,
        roc_auc,
        roc_curve,
        stratified_subfolds,
        threshold_at_far,
        verification_protocol,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}; available: {__all__}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""``FaceVerification``: the verification protocol as a local ``evaluate.Metric`` (no Hub access needed).

Usage::

    metric = FaceVerification()
    metric.compute(predictions=distances, references=is_same, folds=folds)

or ``metric.add_batch(predictions=..., references=...)`` repeatedly, then ``metric.compute(folds=all_folds)`` with
the fold ids of all pairs in the order they were added. ``folds`` is a compute keyword, not a feature, so in a
multi-process run pass the pairs (and folds) gathered on the main process rather than per-process batches.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import datasets
import evaluate

from .verification import report_to_json, verification_protocol

__all__ = ["FaceVerification"]

_DESCRIPTION = """Face verification on pairs (LFW View 2 protocol): each fold's distance threshold is chosen on the
other folds only; reports mean accuracy (+- std and standard error), TAR@FAR, ROC AUC, EER and a calibrated
threshold. With one fold (or no folds) the threshold is chosen by 10-fold cross-validation inside it."""

_INPUTS = """
Args:
    predictions: pair distances (float, smaller = more similar).
    references: 1 for matched ("same person") pairs, 0 for mismatched ones.
    folds: (compute keyword) fold id of each pair, e.g. LFW's 1..10; None = all pairs form one fold.
    far_target: (compute keyword) FAR for TAR@FAR, default 1e-3.
    eval_folds: (compute keyword) fold ids to score; pairs of other folds are ignored.
Returns:
    The JSON-safe verification report: accuracy_mean, accuracy_std, accuracy_stderr, threshold, tar_at_far,
    far_at_far, auc, eer, n_pairs, protocol, per-fold lists, ... (no ROC arrays).
"""

_CITATION = """@techreport{LFWTech, author = {Gary B. Huang and Manu Ramesh and Tamara Berg and Erik Learned-Miller},
title = {Labeled Faces in the Wild: A Database for Studying Face Recognition in Unconstrained Environments},
institution = {University of Massachusetts, Amherst}, number = {07-49}, year = {2007}}
@inproceedings{schroff2015facenet, title = {FaceNet: A Unified Embedding for Face Recognition and Clustering},
author = {Schroff, Florian and Kalenichenko, Dmitry and Philbin, James}, booktitle = {CVPR}, year = {2015}}"""


class FaceVerification(evaluate.Metric):
    """Cross-validated face verification metric; its ``name`` is ``face_verification`` (from the class name)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
            ),
            # no format="numpy": the datasets numpy formatter would cast the float64 distances to float32
            reference_urls=["https://vis-www.cs.umass.edu/lfw/", "https://arxiv.org/abs/1503.03832"],
        )

    def _compute(
        self,
        predictions: Any,
        references: Any,
        folds: Any = None,
        far_target: float = 1e-3,
        eval_folds: Iterable[int] | None = None,
    ) -> dict[str, Any]:
        report = verification_protocol(
            predictions, references, folds, far_target=far_target, eval_folds=eval_folds
        )
        return report_to_json(report)

"""Clustering metrics against scikit-learn and brute-force loops over every pair and every item."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import normalized_mutual_info_score
from sklearn.metrics.cluster import pair_confusion_matrix

from facenet_hf.evaluation import clustering_metrics
from facenet_hf.evaluation.clustering import (
    bcubed_scores,
    contingency_cells,
    normalized_mutual_info,
    pair_counts,
    pairwise_scores,
)


def brute_pairs(true, pred) -> dict[str, int]:
    """Every unordered pair of distinct items, looked at one by one."""
    out = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    for i, j in itertools.combinations(range(len(true)), 2):
        same_t, same_p = true[i] == true[j], pred[i] == pred[j]
        out["tp" if same_t and same_p else "fp" if same_p else "fn" if same_t else "tn"] += 1
    return out


def brute_bcubed(true, pred) -> tuple[float, float]:
    """Amigó et al.'s definition item by item: correctness over the item's cluster and over its class."""
    n = len(true)
    precision = recall = 0.0
    for i in range(n):
        cluster = [j for j in range(n) if pred[j] == pred[i]]
        klass = [j for j in range(n) if true[j] == true[i]]
        correct = [j for j in cluster if true[j] == true[i]]
        precision += len(correct) / len(cluster)
        recall += len(correct) / len(klass)
    return precision / n, recall / n


def random_case(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    true = rng.integers(0, rng.integers(1, 12), n)
    pred = true.copy()
    flip = rng.random(n) < rng.uniform(0, 1)
    pred[flip] = rng.integers(0, rng.integers(1, 15), int(flip.sum()))
    return true, pred


CASES = [
    random_case(s, n) for s, n in zip(range(12), [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 120, 150], strict=True)
]
EDGE = {
    "all singletons": (np.array([0, 0, 1, 1, 2]), np.arange(5)),
    "one cluster": (np.array([0, 0, 1, 1, 2]), np.zeros(5, int)),
    "both one group": (np.zeros(6, int), np.full(6, 7)),
    "both singletons": (np.arange(6), np.arange(6)[::-1]),
    "perfect, relabelled": (np.array([3, 3, 1, 1, 1, 9]), np.array([0, 0, 5, 5, 5, 2])),
    "true singletons, pred one": (np.arange(5), np.zeros(5, int)),
}


@pytest.mark.parametrize("true,pred", CASES + list(EDGE.values()))
def test_pair_counts_match_brute_force_and_sklearn(true, pred):
    counts = pair_counts(true, pred, noise_label=None)
    assert counts == brute_pairs(true, pred)
    c = pair_confusion_matrix(true, pred)  # ordered pairs: twice ours
    assert [2 * counts["tn"], 2 * counts["fp"], 2 * counts["fn"], 2 * counts["tp"]] == c.ravel().tolist()


@pytest.mark.parametrize("true,pred", CASES + list(EDGE.values()))
def test_bcubed_and_nmi_match_brute_force_and_sklearn(true, pred):
    p, r, f = bcubed_scores(true, pred, noise_label=None)
    bp, br = brute_bcubed(true, pred)
    assert p == pytest.approx(bp, abs=1e-12) and r == pytest.approx(br, abs=1e-12)
    assert f == pytest.approx(2 * bp * br / (bp + br), abs=1e-12)
    assert normalized_mutual_info(true, pred, noise_label=None) == pytest.approx(
        normalized_mutual_info_score(true, pred), abs=1e-10
    )


@pytest.mark.parametrize("true,pred", CASES)
def test_pairwise_scores_from_brute_force_counts(true, pred):
    b = brute_pairs(true, pred)
    p, r, f = pairwise_scores(true, pred, noise_label=None)
    exp_p = b["tp"] / (b["tp"] + b["fp"]) if b["tp"] + b["fp"] else 1.0
    exp_r = b["tp"] / (b["tp"] + b["fn"]) if b["tp"] + b["fn"] else 1.0
    assert p == pytest.approx(exp_p) and r == pytest.approx(exp_r)
    assert f == pytest.approx(0.0 if exp_p + exp_r == 0 else 2 * exp_p * exp_r / (exp_p + exp_r))


def test_edge_cases_by_hand():
    true, pred = EDGE["all singletons"]
    m = clustering_metrics(true, pred)
    assert (m.pairwise_precision, m.pairwise_recall, m.pairwise_f1) == (1.0, 0.0, 0.0)
    assert m.bcubed_precision == 1.0 and m.bcubed_recall == pytest.approx((0.5 * 4 + 1) / 5)
    assert m.n_clusters == 5 and m.n_singletons == 5 and m.n_classes == 3 and m.n_noise == 0
    true, pred = EDGE["one cluster"]
    m = clustering_metrics(true, pred)
    assert m.pairwise_recall == 1.0 and m.pairwise_precision == pytest.approx(2 / 10)
    assert m.bcubed_recall == 1.0 and m.nmi == 0.0 and m.n_clusters == 1 and m.n_singletons == 0
    m = clustering_metrics(*EDGE["perfect, relabelled"])
    assert m.pairwise_f1 == m.bcubed_f1 == 1.0 and m.nmi == pytest.approx(1.0, abs=1e-12)
    assert clustering_metrics(*EDGE["both one group"]).nmi == 1.0


def test_noise_counts_as_singletons_not_as_one_cluster():
    true = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([5, 5, -1, -1, -1, 7])
    singletons = np.array([5, 5, 100, 101, 102, 7])
    m = clustering_metrics(true, pred)
    for ours, theirs in [
        (pair_counts(true, pred), brute_pairs(true, singletons)),
        (m.bcubed_precision, brute_bcubed(true, singletons)[0]),
        (m.nmi, pytest.approx(normalized_mutual_info_score(true, singletons))),
    ]:
        assert ours == theirs
    assert m.n_noise == 3 and m.n_clusters == 2 and m.n_singletons == 1
    # noise_label=None: -1 is an ordinary cluster
    assert pair_counts(true, pred, noise_label=None) == brute_pairs(true, pred)


def test_string_labels_and_large_counts_without_overflow():
    true = np.array(["ann", "ann", "bob", "bob", "cy"], dtype=object)
    pred = np.array(["x", "x", "x", "y", "y"])
    assert pair_counts(true, pred) == brute_pairs(list(true), list(pred))
    n = 3_000_000  # 4.5e12 pairs: beyond int32, fine in int64
    big = pair_counts(np.zeros(n, np.int64), np.zeros(n, np.int64))
    assert big["tp"] == n * (n - 1) // 2 and big["fp"] == big["fn"] == big["tn"] == 0


def test_contingency_cells_and_bad_input():
    rows, cols, cells, class_sizes, cluster_sizes = contingency_cells([1, 1, 2], ["a", "b", "b"])
    assert cells.tolist() == [1, 1, 1] and class_sizes.tolist() == [2, 1] and cluster_sizes.tolist() == [1, 2]
    assert rows.tolist() == [0, 0, 1] and cols.tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="one length"):
        clustering_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="1-D"):
        pair_counts(np.zeros((2, 2)), np.zeros((2, 2)))
    m = clustering_metrics([], [])
    assert m.n_items == 0 and m.bcubed_f1 == 1.0 and m.nmi == 1.0
    assert set(m.to_dict()) >= {"pairwise_f1", "bcubed_f1", "nmi", "n_clusters", "n_singletons"}

"""Open-set identification metrics (rank-1, CMC, DIR@FPIR) against a case worked out by hand and a brute-force
loop over every threshold on random data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from facenet_hf.evaluation import (
    identification_metrics,
    rank_identities,
    ranked_identification_metrics,
    threshold_at_fpir,
)

# Gallery columns: A, A, B, C (A has two images). Probes: three mated (A, B, C), three non-mated (X, Y, Z).
GALLERY = ["A", "A", "B", "C"]
PROBES = ["A", "B", "C", "X", "Y", "Z"]
D = np.array(
    [
        [0.90, 0.20, 0.50, 0.70],  # A: per identity A=min(.9,.2)=.2, B=.5, C=.7 -> A first: correct, d .2
        [0.30, 0.80, 0.40, 0.90],  # B: A=.3, B=.4, C=.9 -> A first (wrong), B second: mate rank 2
        [1.00, 1.10, 0.90, 0.60],  # C: A=1.0, B=.9, C=.6 -> C first: correct, d .6
        [0.50, 0.45, 1.20, 1.30],  # X: nearest A at .45
        [1.40, 1.50, 0.65, 1.60],  # Y: nearest B at .65
        [0.80, 0.90, 0.95, 0.85],  # Z: nearest A at .8
    ]
)


def test_hand_computed_case():
    labels, dist = rank_identities(D, GALLERY)
    assert labels.tolist()[1] == ["A", "B", "C"] and dist[1].tolist() == [0.3, 0.4, 0.9]
    m = identification_metrics(D, PROBES, GALLERY, fpir=(0.1, 0.34, 1.0), ranks=(1, 2, 3))
    assert (m["n_mated"], m["n_nonmated"], m["n_gallery_identities"]) == (3, 3, 3)
    # mate ranks 1, 2, 1: rank-1 = 2/3, CMC(2) = CMC(3) = 1
    assert m["rank_1"] == pytest.approx(2 / 3)
    assert m["cmc"] == pytest.approx({1: 2 / 3, 2: 1.0, 3: 1.0})
    # non-mated nearest distances, sorted: .45, .65, .8 (M = 3)
    by_fpir = {row["fpir"]: row for row in m["dir_at_fpir"]}
    # FPIR .1: floor(.3) = 0 may be accepted -> t just below .45; of the correct top-1s (.2, .6) only .2: DIR 1/3
    row = by_fpir[0.1]
    assert row["threshold"] == np.nextafter(0.45, 0) and row["dir"] == pytest.approx(1 / 3)
    assert row["fpir_achieved"] == 0.0
    # FPIR .34: floor(1.02) = 1 -> t just below .65: .2 and .6 accepted: DIR 2/3, achieved FPIR 1/3
    row = by_fpir[0.34]
    assert row["threshold"] == np.nextafter(0.65, 0) and row["dir"] == pytest.approx(2 / 3)
    assert row["fpir_achieved"] == pytest.approx(1 / 3)
    # FPIR 1: everything accepted (t = inf): DIR = rank-1 = 2/3 (probe B's top-1 is wrong whatever t)
    assert by_fpir[1.0] == {
        "fpir": 1.0,
        "threshold": math.inf,
        "dir": pytest.approx(2 / 3),
        "fpir_achieved": 1.0,
    }


def test_similarity_scores_give_the_same_rates():
    dist = identification_metrics(D, PROBES, GALLERY, fpir=(0.1, 0.34))
    sim = identification_metrics(1.0 - D, PROBES, GALLERY, fpir=(0.1, 0.34), similarity=True)
    assert sim["cmc"] == dist["cmc"]
    assert [r["dir"] for r in sim["dir_at_fpir"]] == [r["dir"] for r in dist["dir_at_fpir"]]
    # similarity thresholds: accept iff score >= t; t just above the non-mated score 1 - .45
    assert sim["dir_at_fpir"][0]["threshold"] == np.nextafter(1 - 0.45, 2)


def test_ties():
    # a probe at the same distance from its mate (B) and from A: A sorts first, so the probe is wrong at rank 1
    labels, _ = rank_identities([[0.5, 0.5]], ["B", "A"])
    assert labels.tolist() == [["A", "B"]]
    m = identification_metrics([[0.5, 0.5]], ["B"], ["B", "A"], fpir=())
    assert m["rank_1"] == 0.0 and m["cmc"][5] == 1.0
    # non-mated nearest distances .4, .4, .9: FPIR 2/3 allows 2 of 3, so t is just below the 3rd (.9)
    assert threshold_at_fpir([0.4, 0.4, 0.9], 2 / 3) == np.nextafter(0.9, 0)
    # FPIR 1/3 allows 1 of 3, but the two smallest tie: neither is accepted (t below .4), achieved 0
    assert threshold_at_fpir([0.4, 0.4, 0.9], 0.34) == np.nextafter(0.4, 0)
    assert threshold_at_fpir([0.4, 0.4, 0.9], 1.0) == math.inf


def _brute_force(d: np.ndarray, probes: list[str], gallery: list[str], fpir: float, ranks: list[int]) -> dict:
    """Loops: per-identity minima, sorted candidate lists, and the best DIR over every candidate threshold."""
    people = sorted(set(gallery))
    lists = []
    for i in range(d.shape[0]):
        best = {p: min(d[i, j] for j in range(d.shape[1]) if gallery[j] == p) for p in people}
        lists.append(sorted(best.items(), key=lambda kv: (kv[1], kv[0])))
    mated = [i for i, p in enumerate(probes) if p in people]
    non = [i for i, p in enumerate(probes) if p not in people]
    cmc = {}
    for r in ranks:
        cmc[r] = sum(probes[i] in [name for name, _ in lists[i][:r]] for i in mated) / len(mated)
    candidates = [*sorted({lists[i][0][1] for i in range(len(probes))}), math.inf]
    best_dir, best_fpir = 0.0, 0.0
    for t in candidates + [np.nextafter(c, -np.inf) for c in candidates]:
        rate = sum(lists[i][0][1] <= t for i in non) / len(non)
        if rate <= fpir + 1e-12:
            dir_ = sum(lists[i][0][0] == probes[i] and lists[i][0][1] <= t for i in mated) / len(mated)
            if dir_ > best_dir or (dir_ == best_dir and rate > best_fpir):
                best_dir, best_fpir = dir_, rate
    return {"cmc": cmc, "dir": best_dir}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_data(seed):
    rng = np.random.default_rng(seed)
    gallery = [f"p{rng.integers(0, 12)}" for _ in range(40)]
    people = sorted(set(gallery))
    probes = [
        people[rng.integers(0, len(people))] if rng.random() < 0.6 else f"stranger{i}" for i in range(70)
    ]
    d = rng.random((len(probes), len(gallery)))
    # mated probes somewhat nearer their own identity, so that DIR varies with the threshold
    for i, p in enumerate(probes):
        for j, g in enumerate(gallery):
            if g == p:
                d[i, j] *= 0.5
    d = np.round(d, 2)  # ties on purpose
    ranks = [1, 3, 5]
    for fpir in (0.05, 0.2, 0.5):
        got = identification_metrics(d, probes, gallery, fpir=(fpir,), ranks=ranks)
        ref = _brute_force(d, probes, gallery, fpir, ranks)
        assert got["cmc"] == pytest.approx(ref["cmc"])
        assert got["dir_at_fpir"][0]["dir"] == pytest.approx(ref["dir"])
        assert got["dir_at_fpir"][0]["fpir_achieved"] <= fpir + 1e-12


def test_ranked_lists_from_a_top_k_search_agree_with_the_full_matrix():
    rng = np.random.default_rng(3)
    gallery = [f"p{i % 9}" for i in range(30)]
    probes = [f"p{i % 13}" for i in range(50)]  # p9..p12 are strangers
    d = rng.random((50, 30))
    full = identification_metrics(d, probes, gallery, ranks=(1, 3))
    labels, dist = rank_identities(d, gallery, k=3)
    top3 = ranked_identification_metrics(labels, dist, probes, sorted(set(gallery)), ranks=(1, 3))
    assert top3 == full
    with pytest.raises(ValueError, match=r"rank\(s\) \[5\] need candidate lists"):
        ranked_identification_metrics(labels, dist, probes, sorted(set(gallery)), ranks=(1, 5))


def test_bad_input_is_refused_with_reasons():
    with pytest.raises(ValueError, match="at least 2 identities, got 1"):
        identification_metrics([[0.1], [0.5]], ["A", "B"], ["A"])
    with pytest.raises(ValueError, match="DIR@FPIR needs non-mated probes"):
        identification_metrics(D[:3], PROBES[:3], GALLERY)
    assert identification_metrics(D[:3], PROBES[:3], GALLERY, fpir=())["rank_1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="none of the 3 probes is of an enrolled identity"):
        identification_metrics(D[3:], PROBES[3:], GALLERY)
    with pytest.raises(ValueError, match="fpir values must be rates"):
        identification_metrics(D, PROBES, GALLERY, fpir=(0.0,))
    with pytest.raises(ValueError, match="one label per gallery column"):
        identification_metrics(D, PROBES, GALLERY[:3])
    with pytest.raises(ValueError, match="at least one non-mated probe"):
        threshold_at_fpir([], 0.1)

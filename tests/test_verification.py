"""Verification protocol: exact hand-computed cases, no test-fold leakage, scikit-learn agreement, speed, plots."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from facenet_hf.evaluation.verification import (
    best_threshold,
    equal_error_rate,
    report_to_json,
    roc_auc,
    roc_curve,
    stratified_subfolds,
    threshold_at_far,
    verification_protocol,
)

# three folds, two matched (s) and two mismatched (d) pairs each; every number below is worked out by hand
HAND_D = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.4, 1.0, 1.1, 0.5, 0.95, 0.55, 1.2])
HAND_Y = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
HAND_F = np.repeat([1, 2, 3], 4)


def lfw_like(seed: int = 0, n_folds: int = 10, per_fold: int = 600, sep: float = 0.8) -> tuple:
    rng = np.random.default_rng(seed)
    half = per_fold // 2
    y = np.tile(np.r_[np.ones(half), np.zeros(half)], n_folds).astype(bool)
    folds = np.repeat(np.arange(1, n_folds + 1), per_fold)
    d = np.where(y, rng.normal(0.8, 0.3, y.size), rng.normal(0.8 + sep, 0.3, y.size)).clip(0, 4)
    return d, y, folds


# ---------------------------------------------------------------------------------------------------------------
# thresholds


def test_best_threshold_separable():
    # candidates: 0.05, 0.15, 0.25, 0.35, 0.45 (ends: half the mean gap 0.1 beyond min/max)
    assert best_threshold([0.1, 0.2, 0.3, 0.4], [1, 1, 0, 0]) == pytest.approx((0.25, 1.0))


def test_best_threshold_two_maxima_takes_the_first():
    # correct counts per candidate [3, 4, 3, 4, 3, 2]: maxima at 0.15 and 0.35, the lower one wins
    assert best_threshold([0.1, 0.2, 0.3, 0.4, 0.5], [1, 0, 1, 0, 0]) == pytest.approx((0.15, 0.8))


def test_best_threshold_plateau_midpoint():
    # distance 2 holds one matched and one mismatched pair: candidates 1.5 and 2.5 both score 3/4 -> midpoint 2.0
    assert best_threshold([1, 2, 2, 3], [1, 1, 0, 0]) == pytest.approx((2.0, 0.75))


def test_best_threshold_all_equal_distances():
    thr, acc = best_threshold([1.0, 1.0, 1.0], [1, 1, 0])
    assert acc == pytest.approx(2 / 3)
    assert thr == pytest.approx(1.5)  # accept all: the top end 1 + 0.5


def test_threshold_at_far():
    d = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    y = [1, 0, 1, 0, 1, 0]
    assert threshold_at_far(d, y, 1e-3) == pytest.approx(0.15)  # no false accept allowed
    assert threshold_at_far(d, y, 1 / 3) == pytest.approx(0.35)  # one of three
    assert threshold_at_far(d, y, 0.5) == pytest.approx(0.35)
    assert threshold_at_far(d, y, 2 / 3) == pytest.approx(0.55)


# ---------------------------------------------------------------------------------------------------------------
# protocol, by hand


def test_protocol_hand_computed():
    r = verification_protocol(HAND_D, HAND_Y, HAND_F, far_target=0.25)
    assert r["folds"] == [1, 2, 3]
    assert r["cv_folds"] == [1, 2, 3]
    assert r["n_pairs"] == 12 and r["n_same"] == 6 and r["n_diff"] == 6
    # fold 1 thr from folds 2+3, fold 2 from 1+3: 0.525 (between 0.5 and 0.55); fold 3 from 1+2: 0.6
    assert r["fold_threshold"] == pytest.approx([0.525, 0.525, 0.6])
    assert r["fold_accuracy"] == pytest.approx([1.0, 1.0, 0.5])
    acc = np.array([1.0, 1.0, 0.5])
    assert r["accuracy_mean"] == pytest.approx(2.5 / 3)
    assert r["accuracy_std"] == pytest.approx(acc.std(ddof=0))
    assert r["accuracy_stderr"] == pytest.approx(acc.std(ddof=1) / np.sqrt(3))
    assert r["accuracy_stderr"] == pytest.approx(1 / 6)
    # deployment threshold on all 12 pairs: 11/12 correct between 0.5 and 0.55
    assert r["threshold"] == pytest.approx(0.525)
    assert r["threshold_accuracy"] == pytest.approx(11 / 12)
    assert r["threshold_tar"] == pytest.approx(5 / 6) and r["threshold_far"] == 0.0
    # TAR@FAR=0.25 (one false accept of four allowed on the training folds): thresholds 0.975, 0.675, 0.85
    assert r["fold_far_threshold"] == pytest.approx([0.975, 0.675, 0.85])
    assert r["fold_tar"] == pytest.approx([1.0, 1.0, 0.5])
    assert r["fold_far"] == pytest.approx([1.0, 0.0, 0.5])
    assert r["tar_at_far"] == pytest.approx(2.5 / 3)
    assert r["far_at_far"] == pytest.approx(0.5)
    # AUC: 5 matched pairs beat all 6 mismatched, 0.95 beats 3 -> 33/36; EER: FPR = FNR = 1/6 at d = 0.55
    assert r["auc"] == pytest.approx(33 / 36)
    assert r["eer"] == pytest.approx(1 / 6)
    assert "3-fold cross-validation" in r["protocol"]


def test_protocol_hand_far_target_zero_false_accepts():
    r = verification_protocol(HAND_D, HAND_Y, HAND_F)  # far_target=1e-3: no false accept on 4 training pairs
    assert r["fold_far_threshold"] == pytest.approx([0.525, 0.525, 0.6])
    assert r["fold_tar"] == pytest.approx([1.0, 1.0, 0.5])
    assert r["fold_far"] == pytest.approx([0.0, 0.0, 0.5])


def test_eer_interpolates():
    # ROC points (0,0) (0,.5) (.5,.5) (.5,1) (1,1): FNR-FPR goes .5 -> 0 at the third point -> EER .5
    fpr, tpr, _ = roc_curve([1, 2, 3, 4], [1, 0, 1, 0])
    assert equal_error_rate(fpr, tpr) == pytest.approx(0.5)
    # crossing inside the segment (0, .5) -> (.5, .75): FPR = .5a = FNR = .5 - .25a at a = 2/3 -> EER 1/3
    assert equal_error_rate([0, 0, 0.5, 1], [0, 0.5, 0.75, 1]) == pytest.approx(1 / 3)


def test_auc_ties_count_half():
    assert roc_auc([1.0, 1.0], [1, 0]) == pytest.approx(0.5)
    assert roc_auc([0.0, 1.0, 1.0, 2.0], [1, 1, 0, 0]) == pytest.approx((2 + 1.5) / 4)


# ---------------------------------------------------------------------------------------------------------------
# no leakage


def test_fold_threshold_never_sees_its_test_pairs():
    d, y, f = lfw_like(seed=1, per_fold=100)
    # fold 1 is adversarial: many pairs, matched ones far, mismatched ones near; a leak would drag thresholds
    rng = np.random.default_rng(7)
    adv_y = np.r_[np.ones(500), np.zeros(500)].astype(bool)
    adv_d = np.where(adv_y, rng.uniform(1.2, 2.0, 1000), rng.uniform(0.0, 0.8, 1000))
    d = np.r_[adv_d, d[f != 1]]
    y = np.r_[adv_y, y[f != 1]]
    f = np.r_[np.ones(1000, dtype=int), f[f != 1]]
    r = verification_protocol(d, y, f)
    for i, fold in enumerate(r["cv_folds"]):
        other = f != fold
        assert r["fold_threshold"][i] == best_threshold(d[other], y[other])[0]
        assert r["fold_far_threshold"][i] == threshold_at_far(d[other], y[other], 1e-3)
    # the construction really is adversarial: with its own pairs, fold 1's threshold would differ
    assert best_threshold(d, y)[0] != r["fold_threshold"][0]
    # and whatever fold 1's test pairs are, its thresholds do not move
    d2 = d.copy()
    d2[f == 1] = rng.uniform(0, 4, 1000)
    r2 = verification_protocol(d2, y, f)
    assert r2["fold_threshold"][0] == r["fold_threshold"][0]
    assert r2["fold_far_threshold"][0] == r["fold_far_threshold"][0]


def test_eval_folds_ignore_other_folds_entirely():
    d, y, f = lfw_like(seed=2, per_fold=60)
    keep = [1, 2, 4, 5, 6, 7, 8, 9, 10]
    r = verification_protocol(d, y, f, eval_folds=keep)
    d2 = d.copy()
    d2[f == 3] = 0.0  # garbage in the ignored fold
    r2 = verification_protocol(d2, y, f, eval_folds=keep)
    assert r["folds"] == keep and r["n_pairs"] == 540
    assert report_to_json(r) == report_to_json(r2)
    ref = verification_protocol(d[f != 3], y[f != 3], f[f != 3])
    assert report_to_json(r) == report_to_json(ref)


def test_eval_folds_unknown_raises():
    d, y, f = lfw_like(seed=0, n_folds=3, per_fold=20)
    with pytest.raises(ValueError, match=r"missing \[7\].*valid fold ids are \[1, 2, 3\]"):
        verification_protocol(d, y, f, eval_folds=[1, 7])


# ---------------------------------------------------------------------------------------------------------------
# held-out fold


def test_stratified_subfolds_round_robin():
    assert stratified_subfolds([1, 1, 0, 1, 0, 0, 0], 2).tolist() == [1, 2, 1, 1, 2, 1, 2]


def test_held_out_fold_cross_validates_inside_it():
    d, y, f = lfw_like(seed=3)
    r = verification_protocol(d, y, f, eval_folds=[10])
    assert r["protocol"] == "held-out fold 10, threshold by 10-fold cross-validation within the fold"
    assert r["folds"] == [10] and r["cv_folds"] == list(range(1, 11)) and r["n_pairs"] == 600
    sel = f == 10
    sub = stratified_subfolds(y[sel])
    assert np.bincount(sub[y[sel]]).tolist() == [0] + [30] * 10
    ref = verification_protocol(d[sel], y[sel], sub)
    for key in ("fold_threshold", "fold_accuracy", "accuracy_mean", "tar_at_far", "threshold", "auc", "eer"):
        assert r[key] == ref[key], key
    assert verification_protocol(d, y, f, eval_folds=10)["fold_threshold"] == r["fold_threshold"]
    for i, s in enumerate(range(1, 11)):  # each sub-fold threshold comes from the other nine sub-folds
        assert r["fold_threshold"][i] == best_threshold(d[sel][sub != s], y[sel][sub != s])[0]


def test_no_folds_is_one_fold():
    d, y, _ = lfw_like(seed=4, n_folds=1, per_fold=200)
    r = verification_protocol(d, y, None)
    assert r["protocol"].startswith("all pairs as one fold, threshold by 10-fold cross-validation")
    assert len(r["fold_accuracy"]) == 10


# ---------------------------------------------------------------------------------------------------------------
# agreement with scikit-learn, speed, JSON, errors


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn(seed):
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    y = rng.random(2000) < 0.4
    d = np.where(y, rng.normal(1.0, 0.4, 2000), rng.normal(1.5, 0.4, 2000))
    if seed == 2:
        d = np.round(d, 1)  # many ties
    fpr, tpr, thr = roc_curve(d, y)
    sk_fpr, sk_tpr, sk_thr = metrics.roc_curve(y, -d, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-4)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-4)
    np.testing.assert_allclose(thr[1:], -sk_thr[1:], atol=1e-4)
    assert roc_auc(d, y) == pytest.approx(metrics.roc_auc_score(y, -d), abs=1e-4)
    r = verification_protocol(d, y, np.arange(2000) % 10 + 1)
    assert r["auc"] == pytest.approx(metrics.roc_auc_score(y, -d), abs=1e-4)
    # the EER lies on the sklearn ROC segment where FNR crosses FPR
    i = int(np.argmax(1 - sk_tpr <= sk_fpr))
    assert sk_fpr[i - 1] - 1e-12 <= r["eer"] <= sk_fpr[i] + 1e-12
    assert 1 - sk_tpr[i] - 1e-12 <= r["eer"] <= 1 - sk_tpr[i - 1] + 1e-12


def test_6000_pairs_fast():
    d, y, f = lfw_like(seed=5)
    verification_protocol(d, y, f)  # warm-up
    t0 = time.perf_counter()
    r = verification_protocol(d, y, f)
    elapsed = time.perf_counter() - t0
    assert r["n_pairs"] == 6000
    assert elapsed < 0.5, f"verification_protocol on 6,000 pairs took {elapsed:.3f} s"


def test_report_to_json():
    r = verification_protocol(*lfw_like(seed=6, per_fold=60))
    out = report_to_json(r)
    assert "roc" not in out
    json.dumps(out, allow_nan=False)
    with_roc = report_to_json(r, include_roc=True)
    assert with_roc["roc"]["thresholds"][0] is None  # -inf
    json.dumps(with_roc, allow_nan=False)
    assert set(out) >= {
        "accuracy_mean", "accuracy_std", "accuracy_stderr", "fold_accuracy", "fold_threshold", "threshold",
        "tar_at_far", "far_at_far", "auc", "eer", "n_pairs", "folds", "protocol",
    }  # fmt: skip


def test_bad_inputs():
    with pytest.raises(ValueError, match="finite"):
        verification_protocol([0.1, np.nan], [1, 0], [1, 2])
    with pytest.raises(ValueError, match="boolean or 0/1"):
        verification_protocol([0.1, 0.2], [1, 2], [1, 2])
    with pytest.raises(ValueError, match="far_target"):
        verification_protocol(HAND_D, HAND_Y, HAND_F, far_target=0)
    with pytest.raises(ValueError, match="both same and different"):
        verification_protocol([0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], [1, 1, 2, 2])
    with pytest.raises(ValueError, match="integer fold ids"):
        verification_protocol([0.1, 0.2], [1, 0], ["a", "b"])
    with pytest.raises(ValueError, match="one fold id per distance"):
        verification_protocol([0.1, 0.2], [1, 0], [1])


# ---------------------------------------------------------------------------------------------------------------
# plots


def _is_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_plots_write_pngs(tmp_path):
    plots = pytest.importorskip("facenet_hf.evaluation.plots")
    d, y, f = lfw_like(seed=8, per_fold=100)
    r = verification_protocol(d, y, f)
    assert _is_png(plots.plot_roc(r, tmp_path / "roc.png", title="test"))
    assert _is_png(plots.plot_roc(report_to_json(r, include_roc=True), tmp_path / "roc_json.png"))
    assert _is_png(plots.plot_roc(roc_curve(d, y), tmp_path / "sub" / "roc_arrays.png"))
    assert _is_png(plots.plot_distance_histogram(d, y, r["threshold"], tmp_path / "hist.png"))
    with pytest.raises(ValueError, match="fpr"):
        plots.plot_roc({"accuracy_mean": 0.9}, tmp_path / "bad.png")


def test_learning_curve_plot(tmp_path):
    from facenet_hf.evaluation.plots import plot_learning_curve, read_eval_curve

    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 10, "elapsed": 60.0, "loss": 0.1}]
    rows += [
        {"step": 10 * i, "elapsed": 60.0 * i, "eval": {"accuracy_mean": 0.5 + 0.1 * i}} for i in (1, 2, 3)
    ]
    metrics.write_text("\n".join(json.dumps(r) for r in rows))
    minutes, acc = read_eval_curve(metrics)
    np.testing.assert_allclose(minutes, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(acc, [0.6, 0.7, 0.8])
    out = plot_learning_curve({"run": metrics}, tmp_path / "curve.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps(rows[0]))
    with pytest.raises(ValueError, match="no evaluation"):
        plot_learning_curve({"run": empty}, tmp_path / "x.png")


def test_fold_accuracy_bars(tmp_path):
    from facenet_hf.evaluation.plots import plot_fold_accuracies

    out = plot_fold_accuracies(range(1, 11), np.linspace(0.8, 0.9, 10), tmp_path / "f.png", stds=[0.03] * 10)
    assert out.read_bytes()[:4] == b"\x89PNG" and out.stat().st_size > 10_000
    with pytest.raises(ValueError, match="one accuracy per fold"):
        plot_fold_accuracies([1, 2], [0.9], tmp_path / "g.png")

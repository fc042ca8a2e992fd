"""The verification score's calibration against independent references: scikit-learn's logistic and isotonic
regressions, a brute-force threshold search, scikit-learn's Brier score and reliability bins; and its trip through
config.json."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import brier_score_loss

from facenet_hf import FaceNet
from facenet_hf.model import Calibration, InvalidConfigError, fit_calibration, model_calibration
from facenet_hf.model.calibration import brier_score, reliability_curve


def _pairs(seed: int = 0, n_same: int = 400, n_diff: int = 600) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    d = np.concatenate([rng.normal(0.8, 0.25, n_same), rng.normal(1.5, 0.25, n_diff)]).clip(0, 4)
    y = np.r_[np.ones(n_same, bool), np.zeros(n_diff, bool)]
    return d, y


def test_logistic_matches_scikit_learn():
    d, y = _pairs()
    cal = fit_calibration(d, y, method="logistic")
    ref = LogisticRegression(C=1e12, tol=1e-12, max_iter=10_000).fit(d[:, None], y)
    assert cal.params["a"] == pytest.approx(ref.intercept_[0], rel=1e-4)
    assert cal.params["b"] == pytest.approx(ref.coef_[0, 0], rel=1e-4)
    grid = np.linspace(0, 4, 50)
    np.testing.assert_allclose(cal.probability(grid), ref.predict_proba(grid[:, None])[:, 1], atol=1e-5)


def test_isotonic_matches_scikit_learn_with_ties():
    d, y = _pairs(seed=1)
    d = np.round(d, 2)  # many equal distances: each must get one value
    cal = fit_calibration(d, y, method="isotonic")
    ref = IsotonicRegression(increasing=False, out_of_bounds="clip").fit(d, y.astype(float))
    grid = np.r_[d, np.linspace(-1, 5, 301)]
    np.testing.assert_allclose(cal.probability(grid), ref.predict(grid), atol=1e-9)
    assert np.all(np.diff(cal.probability(np.sort(grid))) <= 1e-12)  # never rises with distance


def _brute_threshold(d: np.ndarray, y: np.ndarray, far: float) -> float:
    """The largest midpoint candidate (or the top end) accepting at most floor(far * n_diff) mismatched pairs."""
    u = np.unique(d)
    candidates = [u[0] - 1e-9] + [(a + b) / 2 for a, b in itertools.pairwise(u)] + [u[-1]]
    allowed = int(np.floor(far * (~y).sum() * (1 + 1e-12)))
    ok = [t for t in candidates if int(np.sum(d[~y] <= t)) <= allowed]
    return max(ok)


@pytest.mark.parametrize("seed", [0, 2])
def test_far_table_is_the_brute_force_threshold_and_its_tar(seed):
    d, y = _pairs(seed=seed)
    d = np.round(d, 3)
    cal = fit_calibration(d, y)
    assert cal.min_far == pytest.approx(1 / 600)
    fars = [row[0] for row in cal.far_table]
    assert {1e-2, 1e-1, 1.0} <= set(fars) and len(fars) > 40
    for far in fars:
        t = cal.threshold_at_far(far)
        ref = _brute_threshold(d, y, far)
        assert np.sum(d[~y] <= t) == np.sum(d[~y] <= ref), far  # the same decisions on every fitting pair
        assert np.sum(d[y] <= t) == np.sum(d[y] <= ref), far
        assert cal.tar_at_far(far) == pytest.approx(np.mean(d[y] <= t))
    # between tabulated FARs the lookup is conservative: never more false accepts than asked for
    for far in np.logspace(np.log10(1 / 600), 0, 37):
        assert np.mean(d[~y] <= cal.threshold_at_far(far)) <= far + 1e-12


def test_far_below_what_the_pairs_certify_is_refused():
    d, y = _pairs(n_diff=300)
    cal = fit_calibration(d, y)
    with pytest.raises(ValueError, match=r"1e-05 is below .* 300 mismatched pairs"):
        cal.threshold_at_far(1e-5)
    with pytest.raises(ValueError, match="false-accept rate in"):
        cal.threshold_at_far(0)


def test_quality_measures_match_scikit_learn():
    rng = np.random.default_rng(3)
    p = rng.random(2000)
    y = rng.random(2000) < p**1.5
    assert brier_score(p, y) == pytest.approx(brier_score_loss(y, p))
    curve = reliability_curve(p, y, n_bins=10)
    obs, pred = calibration_curve(y, p, n_bins=10, strategy="uniform")
    np.testing.assert_allclose(curve["observed"], obs)
    np.testing.assert_allclose(curve["mean_predicted"], pred)
    gaps = np.abs(np.asarray(curve["mean_predicted"]) - curve["observed"])
    assert curve["ece"] == pytest.approx(np.sum(gaps * curve["count"]) / 2000)


def test_fit_needs_both_kinds_of_pairs():
    with pytest.raises(ValueError, match="0 mismatched"):
        fit_calibration([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="3 distances but 2 labels"):
        fit_calibration([0.1, 0.2, 0.3], [True, False])


def test_calibration_travels_in_config_json(tmp_path):
    d, y = _pairs()
    cal = fit_calibration(d, y, method="isotonic", fitted_on={"dataset": "LFW", "folds": [1, 2]})
    model = FaceNet(backbone="resnet18", embedding_dim=8, image_size=32, calibration=cal.to_dict())
    model.save_pretrained(tmp_path / "m")
    loaded = FaceNet.from_pretrained(tmp_path / "m")
    back = model_calibration(loaded)
    assert isinstance(back, Calibration) and back.fitted_on["folds"] == [1, 2]
    assert back.fitted_on["n_mismatched"] == 600
    np.testing.assert_allclose(back.probability(d), cal.probability(d))
    assert model_calibration(FaceNet(backbone="resnet18", embedding_dim=8, image_size=32)) is None

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["calibration"]["params"]["y"][0] = 7.0  # not a probability
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidConfigError, match="'calibration' is not a valid calibration: isotonic knots"):
        FaceNet.from_pretrained(tmp_path / "m")
    cfg["calibration"] = cal.to_dict()
    cfg["distance"] = "euclidean"
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidConfigError, match="fitted on squared_euclidean distances"):
        FaceNet.from_pretrained(tmp_path / "m")


def test_the_model_card_states_the_calibration_and_its_data(tmp_path):
    from facenet_hf.hub import write_model_card

    d, y = _pairs(n_diff=1000)
    cal = fit_calibration(d, y, fitted_on={"dataset": "lfw-deepfunneled", "folds": [10]})
    model = FaceNet(
        backbone="resnet18", embedding_dim=8, image_size=32, threshold=1.1, calibration=cal.to_dict()
    )
    model.save_pretrained(tmp_path / "m")
    card = write_model_card(tmp_path / "m").read_text()
    row = next(line for line in card.splitlines() if line.startswith("| Calibrated score"))
    assert "logistic regression" in row and "1400 pairs (400 matched, 1000 mismatched" in row
    assert "dataset lfw-deepfunneled" in row and "folds [10]" in row
    t = cal.threshold_at_far(1e-3)
    assert f"| Threshold at FAR=0.001 | {t:.4f} (TAR {100 * cal.tar_at_far(1e-3):.2f}%" in card
    FaceNet(backbone="resnet18", embedding_dim=8, image_size=32).save_pretrained(tmp_path / "plain")
    assert "| Calibrated score | none" in write_model_card(tmp_path / "plain").read_text()


def test_an_unknown_flip_mode_is_refused():
    d, y = _pairs()
    data = fit_calibration(d, y).to_dict()
    data["flip"] = "bogus"
    with pytest.raises(ValueError, match="flip must be one of"):
        Calibration.from_dict(data)

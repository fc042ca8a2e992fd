"""`facenet-hf calibrate` and `facenet-hf verify` end to end on a model trained by the spine: what is stored,
on which pairs, and the decisions and scores verify gives from it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import load_recipe, tiny_train_args

from facenet_hf import FaceNet
from facenet_hf.apps.verify import verify_pair
from facenet_hf.cli import main as cli_main
from facenet_hf.data.lfw import read_pairs
from facenet_hf.evaluation.lfw_eval import evaluate_lfw
from facenet_hf.evaluation.verification import best_threshold
from facenet_hf.model import model_calibration


@pytest.fixture(scope="module")
def trained(lfw_sample, tmp_path_factory):
    run = tmp_path_factory.mktemp("calib") / "run"
    assert load_recipe("train_r18_lfw").main(tiny_train_args(lfw_sample, run, "--train.max_steps=3")) == 0
    return run / "model"


def _calibrate_argv(model_dir, lfw_sample, *extra):
    return [
        "calibrate",
        str(model_dir),
        "--lfw-dir",
        str(lfw_sample / "lfw-deepfunneled"),
        "--pairs",
        str(lfw_sample / "pairs.txt"),
        "--num-workers",
        "0",
        *extra,
    ]


@pytest.mark.slow
def test_calibrate_stores_threshold_and_score_fitted_on_the_named_folds(
    trained, lfw_sample, tmp_path, capsys
):
    model_dir = tmp_path / "model"
    shutil.copytree(trained, model_dir)
    out = tmp_path / "cal"
    folds = [str(f) for f in range(1, 10)]
    argv = _calibrate_argv(model_dir, lfw_sample, "--folds", *folds, "--check-folds", "10", "--out", str(out))
    assert cli_main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)

    model = FaceNet.from_pretrained(model_dir)
    cal = model_calibration(model)
    assert cal.method == "logistic" and cal.fitted_on["folds"] == list(range(1, 10))
    assert cal.fitted_on["n_pairs"] == 108 and cal.fitted_on["n_mismatched"] == 54
    assert cal.fitted_on["pairs_file"] == "pairs.txt" and cal.fitted_on["dataset"] == "lfw-deepfunneled"

    # independent recomputation: the distances of folds 1-9 give the stored threshold
    pairs = read_pairs(lfw_sample / "pairs.txt")
    fit = pairs.select_folds(list(range(1, 10)))
    _, d = evaluate_lfw(model, lfw_sample / "lfw-deepfunneled", fit, flip="sum", progress=False)
    assert model.threshold == pytest.approx(best_threshold(d, fit.is_same)[0])
    assert cal.probability(d) == pytest.approx(
        1 / (1 + np.exp(-(cal.params["a"] + cal.params["b"] * d))), rel=1e-9
    )
    # the check is on fold 10 only, which the fit never saw
    check = summary["check"]
    assert check["folds"] == [10] and check["n_pairs"] == 12
    assert sum(check["reliability"]["count"]) == 12 and 0 <= check["brier"] <= 1
    assert (out / "reliability.png").stat().st_size > 10_000
    assert json.loads((out / "calibration.json").read_text())["threshold"] == pytest.approx(model.threshold)


@pytest.mark.slow
def test_calibrate_refuses_overlapping_check_folds_and_remote_models(trained, lfw_sample, capsys):
    with pytest.raises(SystemExit):
        cli_main(_calibrate_argv(trained, lfw_sample, "--folds", "1", "2", "--check-folds", "2"))
    assert "also --folds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(_calibrate_argv("someone/model", lfw_sample))
    assert "--save-to" in capsys.readouterr().err


@pytest.mark.slow
def test_verify_decides_with_stored_threshold_or_far_and_scores(trained, lfw_sample, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(trained, model_dir)
    assert cli_main(_calibrate_argv(model_dir, lfw_sample, "--method", "isotonic")) == 0
    capsys.readouterr()
    people = sorted((lfw_sample / "lfw-deepfunneled").iterdir())
    a = sorted(people[0].glob("*.jpg"))[0]
    b = sorted(people[1].glob("*.jpg"))[0]
    model = FaceNet.from_pretrained(model_dir)
    cal = model_calibration(model)

    assert cli_main(["verify", str(model_dir), str(a), str(a), "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["distance"] == pytest.approx(0.0, abs=1e-5) and same["same"] is True
    assert same["threshold"] == pytest.approx(model.threshold) and same["threshold_source"] == "stored"
    assert same["probability"] == pytest.approx(float(cal.probability(0.0)))

    assert cli_main(["verify", str(model_dir), str(a), str(b), "--far", "0.1", "--json"]) == 0
    other = json.loads(capsys.readouterr().out)
    assert (
        other["threshold"] == pytest.approx(cal.threshold_at_far(0.1))
        and other["threshold_source"] == "far=0.1"
    )
    direct = verify_pair(model, a, b, far=0.1)
    assert direct.distance == pytest.approx(other["distance"], abs=1e-6)
    assert other["same"] == (other["distance"] <= other["threshold"])
    assert other["probability"] == pytest.approx(float(cal.probability(other["distance"])))

    stored = verify_pair(model, a, b)
    assert cli_main(["verify", str(model_dir), str(a), str(b)]) == 0
    line = capsys.readouterr().out
    assert line.startswith("SAME person" if stored.same else "DIFFERENT people")
    assert f"distance {stored.distance:.4f}" in line and f"P(same) {stored.probability:.3f}" in line


@pytest.mark.slow
def test_verify_errors_name_what_is_wrong(trained, lfw_sample, tmp_path, capsys):
    a = next((lfw_sample / "lfw-deepfunneled").rglob("*.jpg"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    assert cli_main(["verify", str(trained), str(a), str(broken)]) == 1
    assert "broken.jpg" in capsys.readouterr().err
    # the trained model has a threshold (from its held-out fold) but no calibration: --far needs one
    assert cli_main(["verify", str(trained), str(a), str(a), "--far", "1e-3"]) == 1
    assert "facenet-hf calibrate" in capsys.readouterr().err
    assert cli_main(["verify", str(tmp_path), str(a), str(a)]) == 1
    assert "cannot load model" in capsys.readouterr().err


@pytest.mark.slow
def test_check_folds_alone_fit_on_every_other_fold(trained, lfw_sample, tmp_path, capsys):
    model_dir = tmp_path / "model"
    shutil.copytree(trained, model_dir)
    assert cli_main([*_calibrate_argv(model_dir, lfw_sample, "--check-folds", "10"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["fitted_on"]["folds"] == list(range(1, 10)) and summary["check"]["folds"] == [10]

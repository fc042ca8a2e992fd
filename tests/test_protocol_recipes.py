"""The 10-fold protocol recipe and the outside-data mode, on the bundled sample (tiny, CPU)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import load_recipe, tiny_train_args

from facenet_hf.data.lfw import read_pairs

pytestmark = pytest.mark.slow


def test_summary_uses_standard_error():
    recipe = load_recipe("lfw_10fold")
    s = recipe.summarize({1: {"accuracy_mean": 0.8, "auc": 0.9}, 2: {"accuracy_mean": 0.9, "auc": 0.95}})
    assert s["accuracy_mean"] == pytest.approx(0.85)
    assert s["accuracy_std"] == pytest.approx(0.0707106781, rel=1e-6)  # ddof=1
    assert s["accuracy_stderr"] == pytest.approx(0.05)  # std / sqrt(2)


def test_two_folds_each_trained_without_its_people(lfw_sample, tmp_path):
    recipe = load_recipe("lfw_10fold")
    args = [a for a in tiny_train_args(lfw_sample, tmp_path) if not a.startswith("--train.max_steps")]
    assert recipe.main([*args, "--train.max_steps=2", "--folds", "3", "7"]) == 0
    summary = json.loads((tmp_path / "protocol.json").read_text())
    assert summary["folds"] == [3, 7] and len(summary["fold_accuracy"]) == 2
    png = (tmp_path / "protocol.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    pairs = read_pairs(lfw_sample / "pairs.txt")
    for k in (3, 7):
        report = json.loads((tmp_path / f"fold_{k}" / "eval" / "lfw_report.json").read_text())
        assert report["folds"] == [k]
        cfg = (tmp_path / f"fold_{k}" / "config.yaml").read_text()
        assert f"holdout_folds:\n  - {k}\n" in cfg
        assert report["n_pairs"] == len(pairs.select_folds([k]))
    # a second call reuses the finished folds instead of retraining
    mtime = (tmp_path / "fold_3" / "model" / "model.safetensors").stat().st_mtime
    assert recipe.main([*args, "--folds", "3"]) == 0
    assert (tmp_path / "fold_3" / "model" / "model.safetensors").stat().st_mtime == mtime


def test_outside_data_mode_scores_all_ten_folds(lfw_sample, tmp_path):
    # Stand-in for VGGFace2 / CASIA: an image folder of people who appear in no LFW pair of the sample.
    pairs = read_pairs(lfw_sample / "pairs.txt")
    outside = tmp_path / "outside"
    for person in sorted((lfw_sample / "lfw-deepfunneled").iterdir()):
        if person.name not in pairs.people() and len(list(person.glob("*.jpg"))) >= 2:
            shutil.copytree(person, outside / person.name)
    assert len(list(outside.iterdir())) >= 8
    recipe = load_recipe("train_r18_lfw")
    args = tiny_train_args(
        lfw_sample, tmp_path / "run", f"--data.train_source={outside}", "--data.holdout_folds=[]"
    )
    assert recipe.main(args) == 0
    report = json.loads((tmp_path / "run" / "eval" / "lfw_report.json").read_text())
    assert report["folds"] == list(range(1, 11)) and report["n_pairs"] == len(pairs)

"""End to end through the recipe's ``main(argv)`` on the bundled LFW sample (seconds, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import load_recipe, tiny_train_args

from facenet_hf import FaceNet
from facenet_hf.config import load_config
from facenet_hf.data.lfw import SplitOverlapError
from facenet_hf.training.build import build_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(lfw_sample, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    recipe = load_recipe("train_r18_lfw")
    assert recipe.main(tiny_train_args(lfw_sample, out)) == 0
    return out


def test_run_writes_everything(trained, capsys):
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    assert cfg["train"]["max_steps"] == 4 and cfg["data"]["holdout_folds"] == [10]
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert all(0.0 <= x["frac_active"] <= 1.0 and x["loss"] >= 0 for x in steps)
    report = json.loads((trained / "eval" / "lfw_report.json").read_text())
    assert report["folds"] == [10] and "held-out fold 10" in report["protocol"]
    assert report["n_pairs"] == 12  # fold 10 of the sample: 6 matched + 6 mismatched pairs
    for png in ("lfw_roc.png", "lfw_distances.png"):
        assert (trained / "eval" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(list((trained / "checkpoints").glob("step_*"))) >= 1


def test_saved_model_loads_with_threshold_and_preprocessing(trained):
    model = FaceNet.from_pretrained(trained / "model")
    report = json.loads((trained / "eval" / "lfw_report.json").read_text())
    assert model.threshold == pytest.approx(report["threshold"])
    assert model.image_size == 32 and model.embedding_dim == 32 and model.eval_transforms
    emb = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_existing_run_is_not_overwritten(trained, lfw_sample):
    recipe = load_recipe("train_r18_lfw")
    args = [a for a in tiny_train_args(lfw_sample, trained) if not a.startswith("--overwrite")]
    with pytest.raises(FileExistsError, match="already holds a run; pass resume=latest"):
        recipe.main([*args, "--overwrite=false"])


def test_training_people_never_in_evaluation_pairs(lfw_sample):
    cfg = load_config(
        None,
        [f"data.lfw_dir={lfw_sample / 'lfw-deepfunneled'}", f"data.pairs={lfw_sample / 'pairs.txt'}"],
    )
    train_ds, pairs = build_data(cfg)
    assert set(train_ds.unique("identity")).isdisjoint(pairs.people())
    assert set(pairs.fold.tolist()) == {10}


def test_outside_data_mode_refuses_overlap(lfw_sample):
    # holdout_folds=[] means "score all folds": training on LFW's own people must then be refused
    cfg = load_config(
        None,
        [
            f"data.lfw_dir={lfw_sample / 'lfw-deepfunneled'}",
            f"data.pairs={lfw_sample / 'pairs.txt'}",
            "data.holdout_folds=[]",
        ],
    )
    with pytest.raises(SplitOverlapError):
        build_data(cfg)


def test_bf16_end_to_end(lfw_sample, tmp_path):
    recipe = load_recipe("train_r18_lfw")
    args = tiny_train_args(lfw_sample, tmp_path, "--train.mixed_precision=bf16", "--train.max_steps=2")
    assert recipe.main(args) == 0
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(x["loss"] == x["loss"] for x in lines if "loss" in x)  # finite, not NaN
    assert (tmp_path / "model" / "model.safetensors").is_file()


def test_help_lists_every_key(capsys):
    recipe = load_recipe("train_r18_lfw")
    with pytest.raises(SystemExit):
        recipe.main(["--help"])
    text = capsys.readouterr().out
    for key in ("train.lr", "data.p", "loss.mining", "model.backbone", "train.mixed_precision"):
        assert key in text


def test_typo_in_argv_fails_before_training(capsys, lfw_sample, tmp_path):
    recipe = load_recipe("train_r18_lfw")
    with pytest.raises(SystemExit):
        recipe.main([*tiny_train_args(lfw_sample, tmp_path), "--train.lrr=0.1"])
    assert "did you mean 'train.lr'" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()

"""`facenet-hf evaluate`: on a model trained by the spine, and on precomputed embeddings of the real LFW pairs
checked against an independent implementation (plain loops + scikit-learn)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import load_recipe, tiny_train_args

from facenet_hf.cli import main as cli_main
from facenet_hf.data.lfw import read_pairs
from facenet_hf.evaluation.embeddings_io import save_embeddings


@pytest.mark.slow
def test_evaluate_trained_model_writes_report_and_plots_and_leaves_the_model_alone(
    lfw_sample, tmp_path, capsys
):
    run = tmp_path / "run"
    assert load_recipe("train_r18_lfw").main(tiny_train_args(lfw_sample, run, "--train.max_steps=2")) == 0
    model_dir = run / "model"
    before = (model_dir / "config.json").read_bytes()
    out = tmp_path / "eval"
    argv = ["evaluate", str(model_dir), "--lfw-dir", str(lfw_sample / "lfw-deepfunneled")]
    argv += [
        "--pairs",
        str(lfw_sample / "pairs.txt"),
        "--flip",
        "concat",
        "--out",
        str(out),
        "--num-workers",
        "0",
    ]
    assert cli_main(argv) == 0
    report = json.loads((out / "lfw_report.json").read_text())
    assert report["folds"] == list(range(1, 11)) and report["n_pairs"] == 120 and report["flip"] == "concat"
    for png in ("lfw_roc.png", "lfw_distances.png"):
        assert (out / png).stat().st_size > 10_000
    # scoring is read-only: scoring on other data never changes how the model verifies
    assert (model_dir / "config.json").read_bytes() == before
    assert cli_main([*argv, "--no-write-threshold"]) == 0  # the old opt-out still parses
    assert (model_dir / "config.json").read_bytes() == before
    assert "accuracy" in capsys.readouterr().out


def _reference_protocol(d: np.ndarray, same: np.ndarray, fold: np.ndarray, far: float) -> tuple[float, float]:
    """Accuracy and TAR@FAR by brute force: every midpoint threshold tried in a loop, per fold."""

    def candidates(x):
        u = np.unique(x)
        return np.r_[u[0] - 1.0, (u[:-1] + u[1:]) / 2, u[-1] + 1.0]

    accs, tars = [], []
    for k in np.unique(fold):
        tr, te = fold != k, fold == k
        best_t, best_acc = None, -1.0
        for t in candidates(d[tr]):
            acc = np.mean((d[tr] <= t) == same[tr])
            if acc > best_acc:  # first maximum; ties do not change accuracy on real-valued distances here
                best_t, best_acc = t, acc
        accs.append(np.mean((d[te] <= best_t) == same[te]))
        diff_tr = d[tr][~same[tr]]
        ok = [t for t in candidates(d[tr]) if np.mean(diff_tr <= t) <= far]
        t_far = max(ok)
        tars.append(np.mean(d[te][same[te]] <= t_far))
    return float(np.mean(accs)), float(np.mean(tars))


@pytest.mark.lfw
def test_real_lfw_embeddings_file_matches_independent_implementation(full_lfw, tmp_path, capsys):
    from sklearn.metrics import roc_auc_score

    pairs = read_pairs(full_lfw / "pairs.txt")
    p1, p2 = pairs.paths()
    images = sorted(set(p1) | set(p2))
    assert len(images) == 7701
    # A synthetic but realistic embedder: one centre per person plus per-image noise, unit-normalised.
    rng = np.random.default_rng(0)
    people = sorted({p.split("/")[0] for p in images})
    centre = {name: rng.normal(size=64) for name in people}
    emb = np.stack([centre[p.split("/")[0]] + 1.3 * rng.normal(size=64) for p in images]).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    path = save_embeddings(tmp_path / "emb.npz", images, emb)

    out = tmp_path / "report"
    assert (
        cli_main(
            ["evaluate", "--embeddings", str(path), "--pairs", str(full_lfw / "pairs.txt"), "--out", str(out)]
        )
        == 0
    )
    report = json.loads((out / "lfw_report.json").read_text())

    index = {p: i for i, p in enumerate(images)}
    e64 = emb.astype(np.float64)
    d = np.array([np.sum((e64[index[a]] - e64[index[b]]) ** 2) for a, b in zip(p1, p2, strict=True)])
    acc, tar = _reference_protocol(d, pairs.is_same, pairs.fold, 1e-3)
    assert report["accuracy_mean"] == pytest.approx(acc, abs=1e-4)
    assert report["tar_at_far"] == pytest.approx(tar, abs=1e-4)
    assert report["auc"] == pytest.approx(roc_auc_score(pairs.is_same, -d), abs=1e-4)
    assert 0.6 < report["accuracy_mean"] < 0.999  # a non-trivial case

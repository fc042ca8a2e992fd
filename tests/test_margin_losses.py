"""ArcFace / CosFace (``loss.objective``): values and gradients equal pytorch-metric-learning's on the same inputs and
weights, a hand-computed case, the engine trains the classifier (optimizer, checkpoints, exact resume, several
processes) and leaves it out of the saved embedder."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import margin_dist_worker as mw
import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE, free_port, launch_env, load_recipe, tiny_train_args
from safetensors.torch import load_file

from facenet_hf import FaceNet
from facenet_hf.config import ConfigError, load_config
from facenet_hf.losses import CombinedLoss, MarginSoftmaxLoss, TripletLoss
from facenet_hf.training import build_loss, train_step
from facenet_hf.training.optim import build_optimizer
from facenet_hf.training.state import TrainState

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")

WORKER = Path(mw.__file__)
BASE = ["data.lfw_dir=/x", "data.pairs=/x/pairs.txt"]


def _pml(kind: str, num_classes: int, dim: int, margin: float, scale: float, weight: torch.Tensor):
    """pytorch-metric-learning's loss with our classifier's weights: its W is (embedding_dim, num_classes) and
    its ArcFace margin is in degrees; its default reducer (MeanReducer) is the mean over the batch, as ours."""
    if kind == "arcface":
        loss = pml_losses.ArcFaceLoss(num_classes, dim, margin=math.degrees(margin), scale=scale)
    else:
        loss = pml_losses.CosFaceLoss(num_classes, dim, margin=margin, scale=scale)
    loss = loss.double()
    with torch.no_grad():
        loss.W.copy_(weight.detach().t())
    return loss


def _inputs(num_classes: int, dim: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch,), generator=g)
    emb = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    # a third of the rows point away from their class (theta near pi: ArcFace's fallback branch) and a third
    # towards it (theta small), so both branches of cos(theta + m) are exercised
    wn = torch.nn.functional.normalize(weight, dim=1)
    third = batch // 3
    emb[:third] = -wn[labels[:third]] * 3 + 0.1 * emb[:third]
    emb[third : 2 * third] = wn[labels[third : 2 * third]] * 2 + 0.3 * emb[third : 2 * third]
    return weight, labels, emb


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
@pytest.mark.parametrize(("margin", "scale"), [(None, 64.0), (0.3, 16.0)])
def test_value_and_gradients_equal_pytorch_metric_learning(kind, margin, scale):
    num_classes, dim, batch = 11, 6, 30
    weight, labels, emb = _inputs(num_classes, dim, batch, seed=3)
    ours = MarginSoftmaxLoss(num_classes, dim, kind=kind, margin=margin, scale=scale).double()
    with torch.no_grad():
        ours.weight.copy_(weight)
    theirs = _pml(kind, num_classes, dim, ours.margin, scale, weight)
    e1 = emb.clone().requires_grad_()
    e2 = emb.clone().requires_grad_()
    loss, stats = ours(e1, labels)
    loss.backward()
    ref = theirs(e2, labels)
    ref.backward()
    if kind == "arcface":  # the inputs reach the fallback branch theta > pi - m
        cos = ours.cosines(emb)[torch.arange(batch), labels]
        assert (torch.acos(cos) > math.pi - ours.margin).any() and (torch.acos(cos) < 0.5).any()
    torch.testing.assert_close(loss, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(e1.grad, e2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(ours.weight.grad, theirs.W.grad.t(), rtol=1e-8, atol=1e-10)
    assert stats["margin_softmax_loss"] == pytest.approx(float(ref.detach()))


def test_float32_matches_too():
    num_classes, dim, batch = 7, 5, 16
    weight, labels, emb = _inputs(num_classes, dim, batch, seed=5)
    ours = MarginSoftmaxLoss(num_classes, dim, kind="arcface")
    with torch.no_grad():
        ours.weight.copy_(weight.float())
    e1 = emb.float().requires_grad_()
    loss, _ = ours(e1, labels)
    loss.backward()
    theirs = _pml("arcface", num_classes, dim, 0.5, 64.0, weight)
    e2 = emb.clone().requires_grad_()
    ref = theirs(e2, labels)
    ref.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1.grad.double(), e2.grad, rtol=1e-4, atol=1e-5)


def test_hand_computed_two_classes_two_dims():
    # Classes w0 = (2, 0), w1 = (0, 3): unit rows (1, 0) and (0, 1). Scale s = 4, both samples of class 0.
    # Sample a = 5 * (0.6, 0.8): cos0 = 0.6, cos1 = 0.8. theta0 = acos(0.6) = 0.9273 < pi - 0.5 = 2.6416, so
    #   ArcFace's target = 0.6 cos 0.5 - 0.8 sin 0.5 = 0.6 * 0.877583 - 0.8 * 0.479426 = 0.143009 (= cos(theta0 + m))
    #   loss_a = -log(e^(4 * 0.143009) / (e^(4 * 0.143009) + e^(4 * 0.8))) = log(1 + e^(4 * 0.656991)) = 2.697700
    # Sample b = (-0.96, 0.28): cos0 = -0.96, cos1 = 0.28, theta0 = acos(-0.96) = 2.8578 > 2.6416: the fallback
    #   target = cos0 - m sin m = -0.96 - 0.5 * 0.479426 = -1.199713
    #   loss_b = log(1 + e^(4 * (0.28 + 1.199713))) = log(1 + e^5.918851) = 5.921536
    # ArcFace: mean = (2.697700 + 5.921536) / 2 = 4.309618.
    # CosFace, m = 0.35: targets 0.6 - 0.35 = 0.25 and -0.96 - 0.35 = -1.31;
    #   loss_a = log(1 + e^(4 * 0.55)) = log(1 + e^2.2) = 2.305083, loss_b = log(1 + e^(4 * 1.59)) = 6.361728;
    #   mean = 4.333406.
    w = torch.tensor([[2.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
    emb = torch.tensor([[3.0, 4.0], [-0.96, 0.28]], dtype=torch.float64)
    labels = torch.tensor([0, 0])
    expected = {"arcface": (4.309618, [0.143009, -1.199713]), "cosface": (4.333406, [0.25, -1.31])}
    for kind, (loss_value, targets) in expected.items():
        loss_fn = MarginSoftmaxLoss(2, 2, kind=kind, scale=4.0).double()
        with torch.no_grad():
            loss_fn.weight.copy_(w)
        logits = loss_fn.logits(emb, labels)
        torch.testing.assert_close(
            logits[:, 0] / 4, torch.tensor(targets, dtype=torch.float64), atol=1e-6, rtol=0
        )
        torch.testing.assert_close(logits[:, 1] / 4, torch.tensor([0.8, 0.28], dtype=torch.float64))
        loss, stats = loss_fn(emb, labels)
        assert float(loss.detach()) == pytest.approx(loss_value, abs=1e-6)
        assert float(stats["classifier_accuracy"]) == 0.0  # both are nearer class 1 (0.8 > 0.6, 0.28 > -0.96)


def test_exact_cosine_one_gives_finite_gradients():
    loss_fn = MarginSoftmaxLoss(3, 4, kind="arcface")
    emb = loss_fn.weight.detach()[[0, 1]].clone().requires_grad_()  # cos = 1 with its own class
    loss, _ = loss_fn(emb, torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(loss_fn.weight.grad).all()


def test_empty_batch_is_attached_zero():
    loss_fn = MarginSoftmaxLoss(3, 4)
    emb = torch.zeros(0, 4, requires_grad=True)
    loss, stats = loss_fn(emb, torch.zeros(0, dtype=torch.int64))
    loss.backward()
    assert (
        float(loss.detach()) == 0.0
        and loss_fn.weight.grad is not None
        and float(stats["classifier_accuracy"]) == 0.0
    )


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="labels must be in 0..2"):
        MarginSoftmaxLoss(3, 4)(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"arcface margin must be a number in \[0, 1.571\] \(radians\)"):
        MarginSoftmaxLoss(3, 4, margin=28.6)
    with pytest.raises(ValueError, match="kind must be one of"):
        MarginSoftmaxLoss(3, 4, kind="sphereface")
    with pytest.raises(ValueError, match=r"embeddings must be \[B, 4\]"):
        MarginSoftmaxLoss(3, 4)(torch.randn(2, 5), torch.tensor([0, 1]))


def test_combined_is_triplet_plus_weighted_margin_softmax():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(8, 4), dim=1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    triplet = TripletLoss(mining="batch_hard")
    ms = MarginSoftmaxLoss(4, 4, kind="cosface")
    loss, stats = CombinedLoss(triplet, ms, weight=0.25)(emb, labels)
    t, _ = triplet(emb, labels)
    m, _ = ms(emb, labels)
    torch.testing.assert_close(loss, t + 0.25 * m)
    assert {"triplet_loss", "margin_softmax_loss", "classifier_accuracy", "frac_active"} <= stats.keys()
    alone, alone_stats = CombinedLoss(None, ms, weight=2.0)(emb, labels)
    torch.testing.assert_close(alone, 2 * m)
    assert "triplet_loss" not in alone_stats


def test_local_rows_give_the_classifier_only_their_gradient():
    # Under global mining the other processes' rows carry no gradient to the embeddings; with local= they give
    # none to the classifier either: its gradient is that of the local rows' terms (of the whole batch's mean).
    torch.manual_seed(1)
    emb = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    local = torch.tensor([True, True, True, False, False, False])
    ms = MarginSoftmaxLoss(3, 4)
    loss, _ = ms(emb, labels, local=local)
    loss.backward()
    got = ms.weight.grad.clone()
    ms.weight.grad = None
    per_row = torch.nn.functional.cross_entropy(ms.logits(emb, labels), labels, reduction="none")
    (per_row[local].sum() / 6).backward()
    torch.testing.assert_close(got, ms.weight.grad)
    full, _ = ms(emb, labels)
    torch.testing.assert_close(loss, full)  # the value is the whole batch's


# ------------------------------------------------------------------------------------------- config, build


def test_config_keys_and_errors():
    cfg = load_config(None, [*BASE, "loss.objective=triplet+cosface", "loss.margin_softmax_weight=0.1"])
    assert (cfg.loss.objective, cfg.loss.margin_softmax_weight, cfg.loss.cosface_margin) == (
        "triplet+cosface",
        0.1,
        0.35,
    )
    assert (cfg.loss.arcface_margin, cfg.loss.margin_softmax_scale) == (0.5, 64.0)
    with pytest.raises(ConfigError, match=r"loss.objective: 'arcfce' is not one of .*did you mean 'arcface'"):
        load_config(None, [*BASE, "loss.objective=arcfce"])
    with pytest.raises(ConfigError, match=r"loss.arcface_margin: 28.6 is out of range.*radians.*degrees"):
        load_config(None, [*BASE, "loss.arcface_margin=28.6"])
    with pytest.raises(
        ConfigError, match=r"loss.cosface_margin: 1.5 is out of range; it must be in \[0, 1\]"
    ):
        load_config(None, [*BASE, "loss.cosface_margin=1.5"])
    with pytest.raises(ConfigError, match=r"loss.margin_softmax_scale: 0.0 is out of range; it must be > 0"):
        load_config(None, [*BASE, "loss.margin_softmax_scale=0"])
    with pytest.raises(ConfigError, match=r"loss.margin_softmax_weight: -1.0 is out of range"):
        load_config(None, [*BASE, "loss.margin_softmax_weight=-1"])


def test_build_loss_and_optimizer_include_the_classifier():
    cfg = load_config(
        None, [*BASE, "loss.objective=arcface", "model.embedding_dim=8", "train.weight_decay=0.01"]
    )
    assert isinstance(build_loss(load_config(None, BASE)), TripletLoss)
    with pytest.raises(ValueError, match="needs num_classes"):
        build_loss(cfg)
    loss_fn = build_loss(cfg, num_classes=5)
    assert isinstance(loss_fn, CombinedLoss) and loss_fn.triplet is None
    assert loss_fn.margin_softmax.weight.shape == (5, 8)
    again = build_loss(cfg, num_classes=5)  # seeded from train.seed, not from the global RNG
    torch.testing.assert_close(loss_fn.margin_softmax.weight, again.margin_softmax.weight)
    model = torch.nn.Linear(3, 8)
    opt = build_optimizer(model, cfg.train, extra=loss_fn)
    groups = [(g["weight_decay"], g["lr"], [tuple(p.shape) for p in g["params"]]) for g in opt.param_groups]
    assert groups == [
        (0.01, cfg.train.lr, [(8, 3)]),
        (0.0, cfg.train.lr, [(8,)]),
        (0.01, cfg.train.lr, [(5, 8)]),
    ]


def test_train_step_updates_the_classifier_and_clips_it_too():
    from accelerate import Accelerator

    from facenet_hf.training import reset_accelerate_state

    cfg = load_config(
        None,
        [
            *BASE,
            "loss.objective=triplet+arcface",
            "model.embedding_dim=4",
            "train.grad_clip=1e-3",
            "train.lr=1.0",
            "train.warmup_steps=0",
            "train.scheduler=constant",
        ],
    )
    accelerator = Accelerator(cpu=True)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        loss_fn = build_loss(cfg, num_classes=3)
        opt = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=1.0)
        model, opt, loss_fn = accelerator.prepare(model, opt, loss_fn)
        before = [p.detach().clone() for p in [*model.parameters(), *loss_fn.parameters()]]
        batch = {
            "pixel_values": torch.randn(6, 6),
            "labels": torch.tensor([0, 0, 1, 1, 2, 2]),
            "valid": torch.ones(6, dtype=torch.bool),
        }
        stats = train_step(batch, model, opt, loss_fn, accelerator, cfg, TrainState(), 10)
        after = [p.detach() for p in [*model.parameters(), *loss_fn.parameters()]]
        step = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(after, before, strict=True)))
        assert float(step) == pytest.approx(1e-3, rel=1e-4)  # the joint norm was clipped
        assert not torch.equal(after[-1], before[-1])  # the classifier moved
        assert {"margin_softmax_loss", "triplet_loss", "loss"} <= stats.keys()
    finally:
        reset_accelerate_state(accelerator)


# ------------------------------------------------------------------------------------- short training runs


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["arcface", "triplet+cosface"])
def test_training_saves_an_embedder_without_the_classifier(objective, tmp_path):
    out = tmp_path / "run"
    recipe = load_recipe("train_r18_lfw")
    args = tiny_train_args(SAMPLE, out, "--model.backbone=test_resnet", f"--loss.objective={objective}")
    assert recipe.main(args) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["step"] for x in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(x["loss"]) and "margin_softmax_loss" in x for x in steps)
    assert ("triplet_loss" in steps[0]) == objective.startswith("triplet")
    # the classifier is in the checkpoint (accelerate's second model), with one row per training identity
    ckpt = sorted((out / "checkpoints").glob("step_*"))[-1]
    classifier = _weights(ckpt / "model_1.safetensors")
    assert list(classifier) == ["margin_softmax.weight"]
    cfg = load_config(out / "config.yaml")
    from facenet_hf.training.build import build_data

    train_ds, _ = build_data(cfg)
    assert classifier["margin_softmax.weight"].shape == (len(train_ds.unique("identity")), 32)
    # ... and not in the embedder: model/ holds exactly FaceNet's weights and loads strictly
    saved = _weights(out / "model" / "model.safetensors")
    model = FaceNet.from_pretrained(out / "model")
    assert set(saved) == set(model.state_dict()) and not any("margin" in k for k in saved)
    emb = model(torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


@pytest.mark.slow
def test_resumed_arcface_run_equals_the_uninterrupted_one(tmp_path):
    recipe = load_recipe("train_r18_lfw")
    common = [
        "--model.backbone=test_resnet",
        "--loss.objective=triplet+arcface",
        "--train.scheduler=constant",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert recipe.main(tiny_train_args(SAMPLE, full, *common, "--train.max_steps=6")) == 0
    assert recipe.main(tiny_train_args(SAMPLE, cut, *common, "--train.max_steps=3")) == 0
    assert recipe.main(tiny_train_args(SAMPLE, cut, *common, "--train.max_steps=6", "--resume=latest")) == 0

    def losses(out: Path) -> list[tuple[int, float, float]]:
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [(x["step"], x["loss"], x["margin_softmax_loss"]) for x in lines if "loss" in x]

    assert [s for s, _, _ in losses(cut)] == [1, 2, 3, 4, 5, 6]
    for (s, a, b), (_, c, d) in zip(losses(cut), losses(full), strict=True):
        assert (a, b) == pytest.approx((c, d), rel=1e-6, abs=1e-6), s
    for name in ("model.safetensors", "model_1.safetensors"):
        got = _weights(cut / "checkpoints" / "step_00000006" / name)
        want = _weights(full / "checkpoints" / "step_00000006" / name)
        assert got.keys() == want.keys()
        for key in got:
            torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)


# -------------------------------------------------------------------------------------- several processes


def _launch(out: Path, *args: str) -> list[dict]:
    env = launch_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    proc = subprocess.run(
        [*cmd, str(WORKER), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_processes_average_the_classifier_gradient(tmp_path):
    """One SGD step (lr 1) in 2 processes: local mining = the update of the mean of the two blocks' losses;
    global mining = the update of one process on the concatenated batch; the classifier is identical on both."""
    records = _launch(tmp_path, "step", str(tmp_path))
    for mode in ("local", "global"):
        got = [r[mode] for r in records]
        assert got[0]["params"] == got[1]["params"], mode  # identical on both processes
        model, loss_fn = mw.step_parts()
        x, labels = mw.step_data(2)
        params = [*model.parameters(), *loss_fn.parameters()]
        if mode == "local":
            loss = sum(loss_fn(model(x[r]), labels[r])[0] for r in range(2)) / 2
        else:
            loss = loss_fn(model(x.reshape(-1, x.shape[-1])), labels.reshape(-1))[0]
        grads = torch.autograd.grad(loss, params)
        want = [(p - g).detach() for p, g in zip(params, grads, strict=True)]
        for w, g in zip(want, got[0]["params"], strict=True):
            # float32 sums in another order (gloo's all-reduce, other thread counts): 1e-5-relative noise was
            # seen; an averaging error (x2, x0.5) or a missing classifier gradient is 1e-1 or more
            torch.testing.assert_close(torch.tensor(g), w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_process_training_keeps_the_classifier_in_step(tmp_path):
    args = tiny_train_args(
        SAMPLE, tmp_path / "run", "--model.backbone=test_resnet", "--loss.objective=triplet+arcface"
    )
    records = _launch(tmp_path / "records", "train", str(tmp_path / "records"), *args)
    assert [r["rc"] for r in records] == [0, 0] and records[0]["num_processes"] == 2
    hashes = [[c["hashes"] for c in r["calls"]] for r in records]
    assert hashes[0] == hashes[1] and len(hashes[0]) == 4
    assert len({h[1] for h in hashes[0]}) == 4  # the classifier changed at every step
    assert np.isfinite([c["loss"] for c in records[0]["calls"]]).all()
    saved = _weights(tmp_path / "run" / "model" / "model.safetensors")
    assert set(saved) == set(FaceNet.from_pretrained(tmp_path / "run" / "model").state_dict())

"""Precision: fp32 distances and loss under bf16 autocast, gradient clipping on unscaled (fp16) gradients, and the
non-finite loss policy (skip: counted, logged, weights unchanged; error: a clear stop) through ``main(argv)``.

fp16 itself needs CUDA (accelerate runs fp16 on a CPU as plain fp32, and the config refuses it); here the
GradScaler path is exercised with a CPU ``torch.amp.GradScaler`` put where accelerate keeps its own.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE, tiny_train_args
from safetensors.torch import load_file

from facenet_hf.cli.train import parse_train_config, run_training, train_parser
from facenet_hf.config import Config
from facenet_hf.losses import TripletLoss, pairwise_distances
from facenet_hf.training import reset_accelerate_state
from facenet_hf.training.state import TrainState
from facenet_hf.training.step import NonFiniteLossError, train_step

B, D = 8, 16


def _pk_labels() -> torch.Tensor:
    return torch.arange(4).repeat_interleave(2)


def _cfg(**train) -> Config:
    cfg = Config()
    cfg.train.scheduler = "constant"
    cfg.train.warmup_steps = 0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def _batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.randn(B, D, generator=g),
        "labels": _pk_labels(),
        "valid": torch.ones(B, dtype=torch.bool),
    }


@pytest.mark.parametrize("mining", ["semihard", "batch_hard", "batch_all"])
def test_distances_and_loss_are_fp32_inside_bf16_autocast(mining):
    layer = torch.nn.Linear(D, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = layer(torch.randn(B, D))
        assert emb.dtype == torch.bfloat16  # autocast is really on
        d = pairwise_distances(emb)
        loss, stats = TripletLoss(mining=mining)(emb, _pk_labels())
    assert d.dtype == torch.float32 and loss.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in stats.values())
    loss.backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_engine_step_under_bf16_runs_the_model_in_bf16_and_the_loss_in_fp32():
    from accelerate import Accelerator

    seen: dict = {}

    class Recording(TripletLoss):
        def forward(self, embeddings, labels):
            loss, stats = super().forward(embeddings, labels)
            seen["loss_input"], seen["loss"] = embeddings.dtype, loss.dtype
            return loss, stats

    class Probe(torch.nn.Linear):
        def forward(self, x):
            y = super().forward(x)
            seen["layer"] = y.dtype  # inside the forward accelerate wraps in autocast
            return y

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    try:
        model = Probe(D, 8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model, optimizer = accelerator.prepare(model, optimizer)
        stats = train_step(
            _batch(), model, optimizer, Recording(), accelerator, _cfg(lr=0.1), TrainState(), 10
        )
    finally:
        reset_accelerate_state(accelerator)
    # autocast inside the model; accelerate hands the outputs back in fp32; the loss is fp32
    assert seen == {"layer": torch.bfloat16, "loss_input": torch.float32, "loss": torch.float32}
    assert stats["loss"].dtype == torch.float32 and torch.isfinite(stats["loss"])


def test_clipping_sees_unscaled_gradients_with_a_grad_scaler():
    """The engine clips through ``accelerator.clip_grad_norm_``, which unscales first: the update has the clip norm.

    Clipping the scaled gradients (then unscaling in ``scaler.step``) would give an update ``scale`` times smaller.
    """
    from accelerate import Accelerator

    clip, scale = 1e-3, 2.0**12
    accelerator = Accelerator(cpu=True, mixed_precision="fp16")
    assert accelerator.scaler is None  # fp16 on a CPU: accelerate has no scaler (and no fp16 autocast)
    accelerator.native_amp = True  # what it sets up on a GPU: a GradScaler, unscale_ in clip_grad_norm_
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=scale)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(D, 8)
        before = [p.detach().clone() for p in model.parameters()]
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model, optimizer = accelerator.prepare(model, optimizer)
        cfg = _cfg(lr=1.0, grad_clip=clip, optimizer="sgd")
        train_step(_batch(), model, optimizer, TripletLoss(), accelerator, cfg, TrainState(), 10)
        after = [p.detach() for p in model.parameters()]
        assert accelerator.scaler.get_scale() == scale and not optimizer.step_was_skipped
    finally:
        reset_accelerate_state(accelerator)
    update = torch.cat([(b - a).reshape(-1) for a, b in zip(before, after, strict=True)])
    assert update.norm().item() == pytest.approx(clip, rel=1e-3)
    # the direction is minus the true (unscaled, fp32) gradient
    torch.manual_seed(0)
    ref = torch.nn.Linear(D, 8)
    batch = _batch()
    loss, _ = TripletLoss()(ref(batch["pixel_values"]), batch["labels"])
    loss.backward()
    grad = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    assert torch.nn.functional.cosine_similarity(update, -grad, dim=0).item() == pytest.approx(1.0, abs=1e-5)


class NaNOnCall(TripletLoss):
    """TripletLoss whose ``nan_call``-th call (1-based) returns a NaN loss; passed to ``train`` as ``loss_fn``."""

    def __init__(self, nan_call: int = 2, **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_call, self.calls = nan_call, 0

    def forward(self, embeddings, labels):
        self.calls += 1
        loss, stats = super().forward(embeddings, labels)
        return (loss * float("nan") if self.calls == self.nan_call else loss), stats


def _train_with_nan(args: list[str]) -> int:
    cfg, parsed = parse_train_config(args, train_parser())
    return run_training(cfg, parsed, loss_fn=NaNOnCall(margin=cfg.loss.margin, mining=cfg.loss.mining))


def _nan_run_args(out):
    return tiny_train_args(
        SAMPLE,
        out,
        "--model.backbone=test_resnet",
        "--train.max_steps=3",
        "--train.checkpoint_every_steps=1",
        "--train.keep_checkpoints=5",
    )


@pytest.mark.slow
def test_nonfinite_loss_skip_counts_logs_and_keeps_the_weights(tmp_path):
    out = tmp_path / "run"
    assert _train_with_nan(_nan_run_args(out)) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert [x["skipped_nonfinite"] for x in lines] == [0, 1, 1]
    assert lines[1]["loss"] != lines[1]["loss"]  # NaN logged for the skipped step
    assert all(x["loss"] == x["loss"] for x in (lines[0], lines[2]))
    root = out / "checkpoints"
    w1, w2, w3 = (load_file(root / f"step_{s:08d}" / "model.safetensors") for s in (1, 2, 3))
    for name in w1:  # everything, BatchNorm running statistics included, is as it was after step 1
        if not name.endswith("num_batches_tracked"):
            assert torch.equal(w1[name], w2[name]), name
    assert any(not torch.equal(w2[n], w3[n]) for n in w2)  # step 3 trains again
    state = torch.load(root / "step_00000003" / "custom_checkpoint_0.pkl", weights_only=False)
    assert state["skipped_nonfinite"] == 1


@pytest.mark.slow
def test_nonfinite_loss_error_stops_the_run_with_a_clear_message(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 1; lower train.lr"):
        _train_with_nan([*_nan_run_args(out), "--train.nonfinite_loss=error"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1]  # step 1 trained and logged, then the stop

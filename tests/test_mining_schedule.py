"""``loss.mining_switch_at``: semi-hard mining, then a harder mode for the rest of the training."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE, load_recipe, tiny_train_args

from facenet_hf.config import ConfigError, load_config
from facenet_hf.losses import TripletLoss
from facenet_hf.training import build_loss, reset_accelerate_state, train_step
from facenet_hf.training.state import TrainState

BASE = ["data.lfw_dir=/x", "data.pairs=/x/pairs.txt"]


def test_config_keys_and_errors():
    cfg = load_config(None, BASE)
    assert (cfg.loss.mining_switch_at, cfg.loss.mining_after) == (None, "batch_hard")
    cfg = load_config(None, [*BASE, "loss.mining_switch_at=0.6", "loss.mining_after=batch_all"])
    assert (cfg.loss.mining_switch_at, cfg.loss.mining_after) == (0.6, "batch_all")
    with pytest.raises(
        ConfigError, match=r"loss.mining_switch_at: 1.0 is out of range; it must be in \[0, 1\)"
    ):
        load_config(None, [*BASE, "loss.mining_switch_at=1.0"])
    with pytest.raises(ConfigError, match=r"loss.mining_after: 'hardest' is not one of"):
        load_config(None, [*BASE, "loss.mining_switch_at=0.5", "loss.mining_after=hardest"])
    with pytest.raises(ConfigError, match=r"objective='arcface' has no triplet term"):
        load_config(None, [*BASE, "loss.mining_switch_at=0.5", "loss.objective=arcface"])


@pytest.mark.parametrize("objective", ["triplet", "triplet+cosface"])
def test_each_step_mines_with_the_scheduled_mode(objective):
    """Before the switch the step's loss is semi-hard's on the step's embeddings, from it batch-hard's (each
    recomputed here by a TripletLoss of that mode on the same embeddings)."""
    from accelerate import Accelerator

    cfg = load_config(
        None,
        [
            *BASE,
            f"loss.objective={objective}",
            "model.embedding_dim=4",
            "loss.mining_switch_at=0.5",
            "train.warmup_steps=0",
            "train.scheduler=constant",
        ],
    )
    accelerator = Accelerator(cpu=True)
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4)
        loss_fn = build_loss(cfg, num_classes=3)
        opt = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=0.1)
        model, opt, loss_fn = accelerator.prepare(model, opt, loss_fn)
        batch = {
            "pixel_values": torch.randn(6, 6),
            "labels": torch.tensor([0, 0, 1, 1, 2, 2]),
            "valid": torch.ones(6, dtype=torch.bool),
        }
        state = TrainState()
        seen = []
        for step in range(10):
            state.step = step
            with torch.no_grad():
                emb = torch.nn.functional.normalize(model(batch["pixel_values"]), dim=1)
            mode = "batch_hard" if step >= 5 else "semihard"  # progress = step / 10
            expected, _ = TripletLoss(margin=0.2, mining=mode)(emb, batch["labels"])
            # model is a Linear: normalise as FaceNet's head would, through a wrapper the step calls
            stats = train_step(batch, _Normalized(model), opt, loss_fn, accelerator, cfg, state, 10)
            got = stats["triplet_loss"] if "triplet_loss" in stats else stats["loss"]
            torch.testing.assert_close(got, expected)
            seen.append(float(stats["mining_after"]))
        assert seen == [0.0] * 5 + [1.0] * 5
    finally:
        reset_accelerate_state(accelerator)


class _Normalized(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return torch.nn.functional.normalize(self.inner(x), dim=1)


def test_no_schedule_logs_nothing_and_keeps_the_mode():
    from accelerate import Accelerator

    cfg = load_config(None, [*BASE, "model.embedding_dim=4", "loss.mining=batch_all"])
    accelerator = Accelerator(cpu=True)
    try:
        model = torch.nn.Linear(6, 4)
        loss_fn = build_loss(cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model, opt = accelerator.prepare(model, opt)
        batch = {
            "pixel_values": torch.randn(6, 6),
            "labels": torch.tensor([0, 0, 1, 1, 2, 2]),
            "valid": torch.ones(6, dtype=torch.bool),
        }
        stats = train_step(batch, model, opt, loss_fn, accelerator, cfg, TrainState(step=9), 10)
        assert "mining_after" not in stats and loss_fn.mining == "batch_all"
    finally:
        reset_accelerate_state(accelerator)


@pytest.mark.slow
def test_a_training_run_logs_the_switch(tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(SAMPLE, out, "--model.backbone=test_resnet", "--loss.mining_switch_at=0.5")
    assert load_recipe("train_r18_lfw").main(args) == 0
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in steps if "loss" in x]
    # 4 steps, no warm-up: the step that starts at progress 2/4 is the first batch-hard one (logged as step 3)
    assert [(x["step"], x["mining_after"]) for x in steps] == [(1, 0.0), (2, 0.0), (3, 1.0), (4, 1.0)]
    assert load_config(out / "config.yaml").loss.mining_switch_at == 0.5

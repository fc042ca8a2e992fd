"""Weight EMA: the update rule against a hand loop, checkpoint round trip, and the engine saving and resuming it."""

from __future__ import annotations

import shutil

import pytest
import torch
from conftest import SAMPLE, load_recipe, tiny_train_args
from safetensors.torch import load_file
from torch import nn

from facenet_hf.config import ConfigError, load_config
from facenet_hf.training.ema import ModelEMA


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))


def test_update_matches_a_hand_written_average() -> None:
    net = _net()
    ema = ModelEMA(net, decay=0.9)
    expected = {k: v.detach().clone().double() for k, v in net.state_dict().items()}
    for n in range(1, 21):
        with torch.no_grad():  # new live weights and BatchNorm statistics
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        net.train()(torch.randn(8, 4))
        ema.update(net)
        d = min(0.9, (1 + n) / (10 + n))  # the warm-up: 0.18, 0.25, ... then 0.9
        for k, v in net.state_dict().items():
            if v.is_floating_point():
                expected[k] = d * expected[k] + (1 - d) * v.double()
            else:
                expected[k] = v.clone().double()
    got = ema.module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(got[k].double(), v, rtol=1e-5, atol=1e-6)
    assert got["1.num_batches_tracked"].item() == 20  # integer buffers are copied
    assert ema.updates == 20 and not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    # the live model is not touched and differs from the average
    assert not torch.allclose(net[0].weight, ema.module[0].weight)


def test_state_dict_round_trip_continues_the_same_average() -> None:
    net = _net()
    a = ModelEMA(net, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        a.update(net)
    b = ModelEMA(_net(), decay=0.5)
    b.load_state_dict(a.state_dict())
    assert (b.decay, b.updates) == (0.99, 3)
    with torch.no_grad():
        net[0].weight.add_(1.0)
    a.update(net)
    b.update(net)
    for (ka, va), (kb, vb) in zip(a.module.state_dict().items(), b.module.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_bad_decay_and_other_models_are_refused() -> None:
    for decay in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="decay must be in"):
            ModelEMA(_net(), decay)
    ema = ModelEMA(_net(), 0.9)
    with pytest.raises(ValueError, match="keys differ"):
        ema.update(nn.Linear(4, 3))


def test_config_range() -> None:
    assert (
        load_config(
            None, ["data.lfw_dir=x", "data.holdout_folds=[]", "train.ema_decay=0.998"]
        ).train.ema_decay
        == 0.998
    )
    with pytest.raises(ConfigError, match=r"train.ema_decay: 1.0 is out of range; it must be in \[0, 1\)"):
        load_config(None, ["data.lfw_dir=x", "data.holdout_folds=[]", "train.ema_decay=1.0"])


def _weights_of(run_dir):
    return load_file(run_dir / "model" / "model.safetensors")


@pytest.mark.slow
def test_training_saves_the_average_and_resume_continues_it(tmp_path) -> None:
    recipe = load_recipe("train_r18_lfw")
    ref = tmp_path / "reference"
    extra = (
        "--model.backbone=test_resnet",
        "--train.max_steps=6",
        "--train.checkpoint_every_steps=3",
        "--train.keep_checkpoints=5",
        "--train.ema_decay=0.9",
        "--train.mixed_precision=bf16",  # accelerate's patched forward, as in the presets
    )
    assert recipe.main(tiny_train_args(SAMPLE, ref, *extra)) == 0
    saved = _weights_of(ref)
    ckpt = ref / "checkpoints" / "step_00000006"
    live = load_file(ckpt / "model.safetensors")
    averaged = torch.load(ckpt / "custom_checkpoint_1.pkl", weights_only=True)
    assert averaged["updates"] == 6
    assert saved.keys() == averaged["module"].keys() == live.keys()
    for name, value in saved.items():
        assert torch.equal(value, averaged["module"][name].to(value.dtype)), name
    assert any(not torch.equal(saved[n], live[n]) for n in saved if saved[n].is_floating_point())

    # a run resumed from the step-3 checkpoint ends with the same average as the uninterrupted one
    run = tmp_path / "resumed"
    shutil.copytree(ref, run)
    for stale in ("model", "eval", "checkpoints/step_00000006"):
        shutil.rmtree(run / stale)
    args = [a.replace(str(ref), str(run)) for a in tiny_train_args(SAMPLE, ref, *extra)]
    assert recipe.main([*args, "--resume=latest"]) == 0
    resumed = _weights_of(run)
    for name, value in saved.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-6)


def test_average_of_an_accelerate_prepared_bf16_model_runs_its_own_weights() -> None:
    """accelerate patches ``forward`` (autocast) on the prepared model: the copy must call its own weights."""
    from accelerate import Accelerator

    from facenet_hf.training import reset_accelerate_state

    accelerator = Accelerator(cpu=True, mixed_precision="bf16")
    try:
        net = accelerator.prepare(_net())
        ema = ModelEMA(accelerator.unwrap_model(net), decay=0.9)
        with torch.no_grad():
            net[0].weight.mul_(-3.0)  # the live model moves away; the average has not been updated
        x = torch.randn(5, 4)
        net.eval()
        live, averaged = net(x), ema.module(x)
        assert averaged.dtype == torch.float32  # accelerate's fp32 output wrapper came along
        reference = _net().eval()  # the initial weights = the average before any update
        with torch.autocast("cpu", dtype=torch.bfloat16):
            expected = reference(x).float()
        torch.testing.assert_close(averaged, expected)
        assert not torch.allclose(live, averaged, atol=1e-2)
    finally:
        reset_accelerate_state(accelerator)

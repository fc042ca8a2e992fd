"""Optimizer groups and the learning-rate schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from facenet_hf.config import TrainConfig
from facenet_hf.training.optim import build_optimizer, lr_factor, param_groups


def test_no_weight_decay_on_norms_and_biases():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    opt = build_optimizer(model, TrainConfig(optimizer="adamw", weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # linear bias, bn weight, bn bias


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_each_optimizer_builds(name):
    opt = build_optimizer(nn.Linear(2, 2), TrainConfig(optimizer=name, lr=0.1))
    assert opt.param_groups[0]["lr"] == 0.1


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_fused_step_matches_the_default_implementation(name):
    # The fused kernel (used on CPU) takes the same steps as torch's reference loop over the tensors.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.BatchNorm1d(5), nn.Linear(5, 3))
    twin = copy.deepcopy(model)
    start = model[0].weight.detach().clone()
    cfg = TrainConfig(optimizer=name, lr=0.05, weight_decay=0.1, momentum=0.9)
    fused = build_optimizer(model, cfg)
    assert fused.defaults["fused"] is True
    extra = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
    plain = type(fused)(param_groups(twin, cfg.weight_decay), lr=0.05, foreach=False, **extra)
    for step in range(3):
        x = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
        for m, opt in ((model, fused), (twin, plain)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.equal(model[0].weight, start)  # the optimizer moved the weights


def test_warmup_then_cosine_to_zero():
    cfg = TrainConfig(warmup_steps=10, scheduler="cosine")
    assert lr_factor(0, cfg, 0.0) == pytest.approx(0.1)
    assert lr_factor(9, cfg, 0.0) == pytest.approx(1.0)
    assert lr_factor(50, cfg, 0.5) == pytest.approx(0.5)
    assert lr_factor(99, cfg, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(99, cfg, 2.0) == pytest.approx(0.0, abs=1e-12)


def test_step_schedule():
    cfg = TrainConfig(warmup_steps=0, scheduler="step", step_every=100, step_gamma=0.5)
    assert [lr_factor(s, cfg, 0.0) for s in (0, 99, 100, 250)] == [1.0, 1.0, 0.5, 0.25]
    assert math.isclose(lr_factor(5, TrainConfig(warmup_steps=0, scheduler="constant"), 0.9), 1.0)

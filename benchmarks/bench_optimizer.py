"""Benchmark one optimizer step: facenet_hf's ``build_optimizer`` (fused kernels) vs torch's other implementations.

For each optimizer of the config (``adamw``, ``adam``, ``sgd``) on the parameters of the training model (a timm
backbone + the embedding head, gradients filled with noise): the median wall time of ``optimizer.step()`` with
``fused=True`` (what ``build_optimizer`` builds where torch has the kernels), ``foreach=True`` (one kernel per
operation over all tensors) and the plain loop over the tensors (``foreach=False``, torch's default on CPU).
Same parameter groups (no weight decay on norms and biases) and hyper-parameters for all three.

Usage: ``python benchmarks/bench_optimizer.py --out optimizer.json`` (seconds); ``--quick`` for a smoke run.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.config import TrainConfig
from facenet_hf.model import FaceNet
from facenet_hf.training.optim import build_optimizer, param_groups

FULL = {"backbone": "resnet18", "repeats": 15}
QUICK = {"backbone": "test_resnet", "repeats": 3}
KINDS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def _time_steps(opt: torch.optim.Optimizer, repeats: int, device: torch.device) -> list[float]:
    for _ in range(3):  # warm-up: state allocation
        opt.step()
    C.sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        opt.step()
        C.sync(device)
        times.append((time.perf_counter() - start) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=None, help="timm backbone (resnet18; quick test_resnet)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed steps per implementation (15; quick 3)"
    )
    parser.add_argument("--device", default="cpu")
    C.add_common_args(parser, lfw=False)
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    C.apply_threads(args)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = FaceNet(args.backbone, 128, image_size=112).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    n_params = sum(p.numel() for p in model.parameters())
    env = C.environment()
    print(
        f"{args.backbone}: {n_params:,} parameters, device {device}, {env['threads']} threads, {args.repeats} steps"
    )
    rows, results = [], []
    for name, kind in KINDS.items():
        cfg = TrainConfig(optimizer=name, lr=1e-3, weight_decay=0.05, momentum=0.9)
        extra = {"momentum": 0.9, "nesterov": True} if name == "sgd" else {}
        ours = build_optimizer(model, cfg)
        impls = {
            f"build_optimizer (fused={ours.defaults.get('fused')})": ours,
            "foreach=True": kind(param_groups(model, cfg.weight_decay), lr=1e-3, foreach=True, **extra),
            "for-loop (foreach=False)": kind(
                param_groups(model, cfg.weight_decay), lr=1e-3, foreach=False, **extra
            ),
        }
        medians = {k: statistics.median(_time_steps(o, args.repeats, device)) for k, o in impls.items()}
        base = medians["for-loop (foreach=False)"]
        for impl, ms in medians.items():
            rows.append([name, impl, ms, base / ms])
            results.append(
                {"optimizer": name, "implementation": impl, "median_ms": ms, "speedup_vs_loop": base / ms}
            )
    print()
    print(C.markdown_table(["optimizer", "implementation", "step ms (median)", "x the for-loop"], rows))
    C.write_json(
        args.out, {"meta": {**env, "backbone": args.backbone, "params": n_params}, "results": results}
    )
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

"""Prepared GPU benchmark: bf16 training images/s of the ResNet-18 112 px and 224 px recipes, channels_last,
with and without ``torch.compile``.

For each ``--sizes`` resolution (the recipes' P x K: 112 px -> 16 x 4 as ``configs/lfw/r18_lfw_112_cpu30m.yaml``,
224 px -> 8 x 8 as ``configs/lfw/r18_lfw_224_e2_adam_g1.yaml``; 64 images a batch either way) and each
``--compile`` mode, one training step of FaceNet (timm backbone + head) on a batch already on the GPU:
bf16 autocast forward, semihard ``TripletLoss``, backward, the engine's optimizer (``build_optimizer``: AdamW, no
decay on norms/biases). Model and input are channels_last. ``torch.compile`` compiles the model (default mode);
the first step (compilation included) is timed on its own, then ``--warmup`` untimed steps, then ``--steps``
timed steps as one block (one synchronisation at the end). Peak memory: ``torch.cuda.max_memory_allocated``.

With ``--lfw-dir`` and ``--pairs`` (LFW is not on the GPU machine unless copied there) each size also runs
facenet_hf's full training loop (``bench_train_step``'s ``full`` method: ``train(cfg)`` on the files, eager) to
show how far the data pipeline is from the step.

Usage on the GPU machine: ``python benchmarks/bench_gpu.py --out gpu.json`` (about 3-5 minutes, most of it
compiling). ``--dry-run`` prints the plan and exits; ``--quick --device cpu`` runs the whole script on a tiny model
on the CPU (compile off), to check it without a GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.config import TrainConfig
from facenet_hf.losses import TripletLoss
from facenet_hf.model import FaceNet
from facenet_hf.training.optim import build_optimizer

RECIPE_PK = {112: (16, 4), 224: (8, 8)}  # the recipes' P x K; other sizes get 16 x 4
FULL = {
    "sizes": "112,224",
    "compile": "off,on",
    "steps": 100,
    "warmup": 20,
    "backbone": "resnet18",
    "embedding_dim": 128,
}
QUICK = {
    **FULL,
    "sizes": "32",
    "compile": "off",
    "steps": 2,
    "warmup": 1,
    "backbone": "test_resnet",
    "embedding_dim": 32,
}


def plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    out = []
    for size in C.int_list(args.sizes):
        p, k = RECIPE_PK.get(size, (16, 4)) if args.p is None else (args.p, args.k)
        for mode in C.str_list(args.compile):
            out.append({"image_size": size, "p": p, "k": k, "compile": mode})
    return out


def bench_step(item: dict[str, Any], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    size, p, k = item["image_size"], item["p"], item["k"]
    torch.manual_seed(args.seed)
    model = FaceNet(args.backbone, args.embedding_dim, image_size=size).to(device)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-3, weight_decay=5e-4))
    loss_fn = TripletLoss(margin=0.2, mining="semihard")
    forward = torch.compile(model) if item["compile"] == "on" else model
    x = torch.randn(p * k, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.arange(p, device=device).repeat_interleave(k)

    def step() -> None:
        with C.autocast(device, args.precision):
            emb = forward(x)
        loss, _ = loss_fn(emb, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    step()
    C.sync(device)
    first_s = time.perf_counter() - t
    for _ in range(args.warmup):
        step()
    C.sync(device)
    t = time.perf_counter()
    for _ in range(args.steps):
        step()
    C.sync(device)
    timed = time.perf_counter() - t
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return {
        **item,
        "images_per_second": args.steps * p * k / timed,
        "step_ms": 1000 * timed / args.steps,
        "first_step_s": first_s,
        "peak_gib": peak,
    }


def bench_full_loop(item: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """facenet_hf's train(cfg) on the LFW files at this size (eager), via bench_train_step."""
    import bench_train_step as T

    ns = argparse.Namespace(
        lfw_dir=args.lfw_dir,
        pairs=args.pairs,
        holdout_fold=10,
        backbone=args.backbone,
        embedding_dim=args.embedding_dim,
        image_size=item["image_size"],
        p=item["p"],
        k=item["k"],
        num_workers=args.num_workers,
        warmup=args.warmup,
        steps=args.steps,
        precision=args.precision,
        channels_last=True,
        seed=args.seed,
    )
    res = T.run_full(ns)
    return {**{k: item[k] for k in ("image_size", "p", "k")}, "compile": "off (train())", **res}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, lfw=False)
    parser.add_argument(
        "--device", default="cuda", help="torch device (cuda; cpu only for checking the script)"
    )
    parser.add_argument("--sizes", default=None, help="comma-separated resolutions (112,224)")
    parser.add_argument("--compile", default=None, help="comma-separated: off, on (off,on)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (100)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps after the first (20)")
    parser.add_argument("--backbone", default=None, help="timm backbone (resnet18)")
    parser.add_argument("--embedding-dim", type=int, default=None)
    parser.add_argument("--p", type=int, default=None, help="override the recipes' P (with --k)")
    parser.add_argument("--k", type=int, default=None)
    parser.add_argument("--precision", choices=("bf16", "fp16", "no"), default="bf16")
    parser.add_argument("--lfw-dir", type=Path, default=None, help="also time train() on these LFW files")
    parser.add_argument("--pairs", type=Path, default=None, help="LFW pairs.txt (with --lfw-dir)")
    parser.add_argument(
        "--num-workers", type=int, default=8, help="DataLoader workers of the train() run (8)"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and exit (no model, no device)"
    )
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    if (args.p is None) != (args.k is None):
        parser.error("--p and --k go together")
    if bad := set(C.str_list(args.compile)) - {"off", "on"}:
        parser.error(f"--compile takes off and/or on, got {sorted(bad)}")
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be >= 1, --warmup >= 0")
    if (args.lfw_dir is None) != (args.pairs is None):
        parser.error("--lfw-dir and --pairs go together")
    items = plan(args)
    if not items:
        parser.error("nothing to run: give --sizes and --compile")
    print(
        f"{args.backbone}, {args.precision} autocast, channels_last, {args.warmup} warm-up + {args.steps} timed "
        f"steps; plan: "
        + ", ".join(f"{i['image_size']}px {i['p']}x{i['k']} compile {i['compile']}" for i in items)
    )
    if args.dry_run:
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available here: run this on the GPU machine (or --device cpu --quick to check it)")
        return 2
    C.apply_threads(args)
    env = C.environment()
    print(f"torch {env['torch']}, device {device} ({env['cuda'] or env['processor']})")

    results = []
    for item in items:
        res = bench_step(item, args, device)
        gc.collect()  # the step's model, optimizer and compiled graph go before the next one
        if device.type == "cuda":
            torch.cuda.empty_cache()
        results.append(res)
        print(
            f"  {item['image_size']}px compile {item['compile']:3s} {res['images_per_second']:9.1f} img/s "
            f"(first step {res['first_step_s']:.1f} s)",
            flush=True,
        )
    eager = {r["image_size"]: r["images_per_second"] for r in results if r["compile"] == "off"}
    full_loop = []
    if args.lfw_dir is not None:
        for item in {i["image_size"]: i for i in items}.values():
            res = bench_full_loop(item, args)
            full_loop.append(res)
            print(f"  {item['image_size']}px train() {res['images_per_second']:9.1f} img/s", flush=True)

    rows = [
        [
            r["image_size"],
            f"{r['p']} x {r['k']}",
            r["compile"],
            r["images_per_second"],
            r["step_ms"],
            r["first_step_s"],
            r["peak_gib"],
            r["images_per_second"] / eager[r["image_size"]] if r["image_size"] in eager else float("nan"),
        ]
        for r in results
    ]
    rows += [
        [
            r["image_size"],
            f"{r['p']} x {r['k']}",
            r["compile"],
            r["images_per_second"],
            r["step_ms_median"],
            float("nan"),
            float("nan"),
            r["images_per_second"] / eager[r["image_size"]] if r["image_size"] in eager else float("nan"),
        ]
        for r in full_loop
    ]
    print()
    print(
        C.markdown_table(
            ["px", "P x K", "compile", "img/s", "ms/step", "first step s", "peak GiB", "x eager step"], rows
        )
    )
    meta = {
        **env,
        **{k: getattr(args, k) for k in ("sizes", "compile", "steps", "warmup", "backbone", "embedding_dim")},
        "precision": args.precision,
        "device": str(device),
        "quick": args.quick,
    }
    C.write_json(args.out, {"meta": meta, "results": results, "full_loop": full_loop})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

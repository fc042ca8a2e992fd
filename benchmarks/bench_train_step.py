"""Benchmark training throughput: facenet_hf's full training loop vs the bare step (floor) vs a plain reference loop.

Three ways to train the same model (same timm backbone + embedding head, resolution, P x K, optimizer family,
precision and channels_last), measured in one invocation:

* ``full``: ``facenet_hf.training.train(cfg)`` with ``train.max_steps = warmup + steps`` on the real LFW files:
  ``load_source`` + ``identity_disjoint_split`` (people outside the held-out fold) + ``PKBatchSampler`` +
  ``BatchTransform`` (decode + the default train augmentations) in DataLoader workers, accelerate, semihard
  ``TripletLoss``, AdamW, lr schedule, logging. Images/s come from ``metrics.jsonl``: the ``elapsed`` training
  seconds (evaluation and checkpoints excluded by the engine) between the end of the warm-up steps and the last
  step; ``train.log_every`` is gcd(warmup, steps), so that both are logged (per-step times are per-interval).
  The run's own figure over all steps (warm-up included) is kept as ``engine_images_per_second``. The final
  evaluation on the held-out fold's pairs runs (flip off) but is not timed. The DataLoader workers run at
  ``data.worker_nice`` (19 by default: the lowest CPU priority);
* ``full_nice0`` (on request): ``full`` with ``data.worker_nice=0``, the workers at the model's priority;
* ``floor``: forward + semihard ``TripletLoss`` + backward + AdamW step of the same model on one batch already
  in memory: no data loading, no accelerate; the ceiling for ``full``.
* ``reference``: a plain loop in the style of torchvision's ``references/similarity``: ``ImageFolder`` on the
  same LFW folder restricted to the same training people, the classic ``torchvision.transforms`` equivalent of
  the default augmentations, a simple P x K batch sampler and the reference's batch_all triplet loss (B x B x B
  mask), ``torch.optim.AdamW``, ``loss.item()`` every step.

Every file under ``--lfw-dir`` is read once first, so that all methods find the images in the page cache.
Every method runs ``--warmup`` untimed steps (DataLoader workers starting, first allocations) then ``--steps``
timed ones; the time of a step runs from the end of the previous step to its end (waiting for data included).
With ``--rounds R`` the methods run R times in turn and the median is reported.

Usage: ``python benchmarks/bench_train_step.py --out train_step.json`` (a few minutes on 2 CPU cores);
``--quick`` for a smoke run of seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.config import Config, load_config
from facenet_hf.losses import TripletLoss
from facenet_hf.training import train
from facenet_hf.training.build import build_data, build_model
from facenet_hf.training.optim import build_optimizer

METHODS = ("full", "full_nice0", "floor", "reference")
DEFAULT_METHODS = ("full", "floor", "reference")
FULL = {
    "image_size": 112,
    "p": 16,
    "k": 4,
    "num_workers": 2,
    "warmup": 5,
    "steps": 30,
    "backbone": "resnet18",
    "embedding_dim": 128,
}
QUICK = {
    **FULL,
    "backbone": "test_resnet",
    "embedding_dim": 32,
    "image_size": 32,
    "p": 4,
    "k": 2,
    "num_workers": 1,
    "warmup": 1,
    "steps": 2,
}


def make_config(args: argparse.Namespace, output_dir: Path, worker_nice: int | None = None) -> Config:
    """The training config of the ``full`` method (the CPU 30-minute recipe's settings, as few steps as asked);
    ``worker_nice``: override ``data.worker_nice`` (default: the config's)."""
    nice = [] if worker_nice is None else [f"data.worker_nice={worker_nice}"]
    return load_config(
        None,
        [
            f"model.backbone={args.backbone}",
            f"model.embedding_dim={args.embedding_dim}",
            f"model.image_size={args.image_size}",
            f"data.lfw_dir={args.lfw_dir}",
            f"data.pairs={args.pairs}",
            f"data.holdout_folds=[{args.holdout_fold}]",
            f"data.p={args.p}",
            f"data.k={args.k}",
            "data.min_images=2",
            "data.replacement=true",
            f"data.num_workers={args.num_workers}",
            "train.optimizer=adamw",
            "train.lr=1e-3",
            f"train.max_steps={args.warmup + args.steps}",
            f"train.log_every={log_every(args)}",
            f"train.mixed_precision={args.precision}",
            f"train.channels_last={str(args.channels_last).lower()}",
            "train.eval_every_epochs=0",
            "train.eval_flip=off",
            "train.checkpoint_every_steps=0",
            "train.keep_checkpoints=1",
            f"train.seed={args.seed}",
            f"output_dir={output_dir}",
            "overwrite=true",
            *nice,
        ],
    )


def log_every(args: argparse.Namespace) -> int:
    """Log (and so record ``elapsed``) at the end of the warm-up and at the last step, as rarely as that allows."""
    return math.gcd(args.warmup, args.steps) if args.warmup else args.steps


def _device() -> torch.device:
    # accelerate's choice on one process: the GPU when there is one
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _summary(step_s: list[float], warmup: int, batch: int) -> dict[str, Any]:
    timed = step_s[warmup:]
    total = sum(timed)
    return {
        "images_per_second": len(timed) * batch / total if total > 0 else float("nan"),
        "step_ms_median": 1000 * C.median(timed),
        "step_s": step_s,
        "warmup_steps": warmup,
        "timed_steps": len(timed),
    }


def run_full(args: argparse.Namespace, worker_nice: int | None = None) -> dict[str, Any]:
    """``train(cfg)`` for warmup + steps optimizer steps; per-step times from metrics.jsonl's ``elapsed``."""
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        cfg = make_config(args, Path(tmp) / "run", worker_nice)
        t0 = time.perf_counter()
        result = train(cfg, progress=False)
        wall = time.perf_counter() - t0
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    every = log_every(args)
    elapsed = [x["elapsed"] for x in lines if "loss" in x]
    # one entry per step: each logged interval's seconds spread evenly over its steps
    step_s = [
        (b - a) / every for a, b in zip([0.0, *elapsed[:-1]], elapsed, strict=True) for _ in range(every)
    ]
    out = _summary(step_s, args.warmup, args.p * args.k)
    out["engine_images_per_second"] = result.images_per_second
    out["run_wall_s"] = wall  # setup + training + checkpoint + final evaluation + model save
    return out


def _floor_steps(cfg: Config, args: argparse.Namespace, device: torch.device) -> Iterator[None]:
    model = build_model(cfg).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.train)
    loss_fn = TripletLoss(margin=cfg.loss.margin, mining=cfg.loss.mining, squared=cfg.loss.squared)
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.p * args.k, 3, args.image_size, args.image_size, generator=gen).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(args.p, device=device).repeat_interleave(args.k)
    model.train()
    while True:
        with C.autocast(device, args.precision):
            emb = model(x)
        loss, _ = loss_fn(emb, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield


def run_floor(args: argparse.Namespace) -> dict[str, Any]:
    device = _device()
    cfg = make_config(args, Path(tempfile.gettempdir()) / "unused")
    torch.manual_seed(args.seed)
    steps = _floor_steps(cfg, args, device)
    out = _summary(C.timed_loop(steps, args.warmup + args.steps, device), args.warmup, args.p * args.k)
    steps.close()
    return out


def _reference_steps(
    model, loader, optimizer, device: torch.device, args: argparse.Namespace
) -> Iterator[None]:
    model.train()
    for x, y in loader:  # the torchvision reference's loop, bf16 autocast / channels_last as the others
        optimizer.zero_grad()
        x, y = x.to(device), y.to(device)
        if args.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with C.autocast(device, args.precision):
            emb = model(x)
        loss, _ = C.batch_all_triplet_loss(y, emb, margin=0.2)
        loss.backward()
        optimizer.step()
        loss.item()
        yield


def run_reference(args: argparse.Namespace, people: list[str]) -> dict[str, Any]:
    device = _device()
    cfg = make_config(args, Path(tempfile.gettempdir()) / "unused")
    torch.manual_seed(args.seed)
    model = build_model(cfg).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    tf = C.torchvision_train_transform(args.image_size, model.mean, model.std)
    ds = C.PeopleFolder(args.lfw_dir, people, tf)
    n = args.warmup + args.steps
    sampler = C.SimplePKBatchSampler(ds.targets, args.p, args.k, num_batches=n, seed=args.seed)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=args.num_workers)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=5e-4)
    steps = _reference_steps(model, loader, optimizer, device, args)
    out = _summary(C.timed_loop(steps, n, device), args.warmup, args.p * args.k)
    steps.close()
    out["images_in_folder"] = len(ds)
    return out


def training_people(args: argparse.Namespace) -> list[str]:
    """The people ``full`` trains on (identity_disjoint_split of the folder against the held-out fold)."""
    import pyarrow.compute as pc

    from facenet_hf.data.sources import arrow_column

    train_ds, _ = build_data(make_config(args, Path(tempfile.gettempdir()) / "unused"))
    return sorted(pc.unique(arrow_column(train_ds, "identity")).to_pylist())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    parser.add_argument(
        "--methods",
        default=",".join(DEFAULT_METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (full_nice0: full with data.worker_nice=0, the "
        "workers at the model's CPU priority) (default: %(default)s)",
    )
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (112; quick 32)")
    parser.add_argument("--p", type=int, default=None, help="identities per batch (16; quick 4)")
    parser.add_argument("--k", type=int, default=None, help="images per identity (4; quick 2)")
    parser.add_argument("--num-workers", type=int, default=None, help="DataLoader workers (2; quick 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per method (5; quick 1)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per method (30; quick 2)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run all methods this many times, report medians"
    )
    parser.add_argument(
        "--backbone", default=None, help="timm backbone (resnet18; quick test_resnet, a tiny timm test model)"
    )
    parser.add_argument("--embedding-dim", type=int, default=None)
    parser.add_argument(
        "--holdout-fold", type=int, default=10, help="LFW fold whose people are not trained on"
    )
    parser.add_argument("--precision", choices=("bf16", "fp16", "no"), default="bf16", help="autocast (all)")
    parser.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=True, help="channels_last (all)"
    )
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    C.apply_threads(args)
    methods = C.str_list(args.methods)
    if not methods or set(methods) - set(METHODS):
        parser.error(f"--methods must be a subset of {','.join(METHODS)}, got {args.methods!r}")
    if args.steps < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--steps and --rounds must be >= 1, --warmup >= 0")
    if not args.lfw_dir.is_dir() or not args.pairs.is_file():
        parser.error(f"no LFW at --lfw-dir {args.lfw_dir} / --pairs {args.pairs}")

    env = C.environment()
    batch = args.p * args.k
    print(
        f"{args.backbone} @ {args.image_size}px, P x K = {args.p} x {args.k} = {batch}, precision {args.precision}, "
        f"channels_last {args.channels_last}, workers {args.num_workers}, {args.warmup} warm-up + {args.steps} "
        f"timed steps x {args.rounds} round(s); torch {env['torch']}, {env['threads']} threads, "
        f"device {_device()}; data {args.lfw_dir}"
    )
    files, secs = C.warm_page_cache(args.lfw_dir)
    print(f"page cache warmed: read {files} files in {secs:.1f} s")
    people = training_people(args)
    print(f"training people (outside fold {args.holdout_fold}): {len(people)}")

    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for r in range(args.rounds):
        for m in methods:
            res = (
                run_full(args)
                if m == "full"
                else run_full(args, worker_nice=0)
                if m == "full_nice0"
                else run_floor(args)
                if m == "floor"
                else run_reference(args, people)
            )
            runs[m].append(res)
            print(
                f"  round {r + 1} {m:9s} {res['images_per_second']:8.1f} img/s  "
                f"({res['step_ms_median']:.0f} ms/step median)",
                flush=True,
            )
            gc.collect()

    results = {
        m: {
            "images_per_second": C.median([x["images_per_second"] for x in rs]),
            "step_ms_median": C.median([x["step_ms_median"] for x in rs]),
            "rounds": rs,
        }
        for m, rs in runs.items()
    }
    ratios: dict[str, float] = {}
    if "full" in results:
        for other in ("full_nice0", "floor", "reference"):
            if other in results:
                ratios[f"full/{other}"] = (
                    results["full"]["images_per_second"] / results[other]["images_per_second"]
                )
    floor = results.get("floor", {}).get("images_per_second")
    full = results.get("full", {}).get("images_per_second")
    labels = {
        "full": "full: facenet_hf train() (LFW files, HF datasets, PKBatchSampler, semihard)",
        "full_nice0": "full, data workers at the model's priority (data.worker_nice=0)",
        "floor": "floor: in-memory batch, fwd + semihard + bwd + AdamW",
        "reference": "reference: ImageFolder + simple PK + batch_all (B^3 mask)",
    }
    rows = [
        [
            labels[m],
            res["images_per_second"],
            res["step_ms_median"],
            res["images_per_second"] / floor if floor else float("nan"),
            full / res["images_per_second"] if full else float("nan"),
        ]
        for m, res in results.items()
    ]
    print()
    print(C.markdown_table(["method", "img/s", "ms/step (median)", "x floor", "full / this"], rows))
    if ratios:
        print()
        print(", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()))
    meta = {
        **env,
        **{
            k: getattr(args, k)
            for k in (*FULL, "precision", "channels_last", "rounds", "holdout_fold", "seed", "threads")
        },
        "lfw_dir": str(args.lfw_dir),
        "pairs": str(args.pairs),
        "device": str(_device()),
        "train_people": len(people),
        "quick": args.quick,
    }
    C.write_json(args.out, {"meta": meta, "results": results, "ratios": ratios})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

"""Worker for the multi-process tests: run by ``torch.distributed.run`` / ``accelerate launch`` (2 CPU processes).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py MODE OUT [ARGS...]

Each process writes ``OUT/rank{R}.json`` with what it saw; the tests compare the ranks and recompute the
expected values in one process. Modes:

``train OUT ARGV...``
    The recipes' entry point (their parser and ``run_training``) with a recording callback (the public
    ``facenet_hf.training.Callback``): every micro-batch's image paths and labels, the epoch / batch counters,
    ``sync_gradients``, and a hash of the parameters after each optimizer step; and, through an audit hook, every
    file each rank writes under the run's folder.
``step OUT``
    ``facenet_hf.training.train_step`` on a ``Linear`` model with fixed random inputs, twice: ``global`` = one
    step with ``loss.global_mining=true``; ``accum`` = ``train.grad_accum=2`` (two micro-batches per rank) with
    the DDP all-reduce calls counted per micro-step, then one step where a single rank's loss is NaN.
``eval OUT``
    ``evaluate_lfw`` of a seeded tiny FaceNet on the bundled sample's pairs of folds 1-5, with the accelerator.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "lfw_sample"


def param_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _write(out: Path, rank: int, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


# ------------------------------------------------------------------------------------------------------ train


def run_train(out: Path, argv: list[str]) -> None:
    """The recipes' parser and ``run_training`` with a recording callback; file writes seen by an audit hook."""
    from accelerate.state import PartialState

    from facenet_hf.cli.train import parse_train_config, run_training, train_parser
    from facenet_hf.training import Callback

    calls: list[dict] = []

    class Recorder(Callback):
        def on_batch(self, run, batch):
            calls.append(
                {
                    "epoch": run.state.epoch,
                    "batch_in_epoch": run.state.batches_in_epoch,  # already counts this batch
                    "paths": list(batch["path"]),
                    "labels": batch["labels"].tolist(),
                }
            )

        def on_step_end(self, run, batch, stats):
            calls[-1]["sync"] = bool(run.accelerator.sync_gradients)
            calls[-1]["param_hash"] = param_hash(run.model)
            calls[-1]["loss"] = float(stats["loss"])

    cfg, args = parse_train_config(argv, train_parser(prog="dist_worker.py"))
    run_dir = Path(cfg.output_dir).resolve()
    writes = _record_writes(run_dir)
    rc = run_training(cfg, args, callbacks=[Recorder()])
    state = PartialState()
    _write(
        out,
        state.process_index,
        {"rc": rc, "num_processes": state.num_processes, "calls": calls, "writes": sorted(set(writes))},
    )


def _record_writes(root: Path) -> list[str]:
    """Paths under ``root`` (relative) that this process opens for writing or renames into (``sys.addaudithook``:
    every Python-level ``open`` and ``os.rename``/``os.replace``, whoever calls them)."""
    import os

    seen: list[str] = []

    def rel(path) -> str | None:
        try:
            p = Path(os.fsdecode(path)).resolve()
        except (TypeError, ValueError, OSError):
            return None
        return p.relative_to(root).as_posix() if p.is_relative_to(root) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1], args[2]
            writing = (
                any(c in mode for c in "wax+")
                if isinstance(mode, str)
                else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            )
            if writing and (r := rel(args[0])) is not None:
                seen.append(r)
        elif event == "os.rename" and (r := rel(args[1])) is not None:
            seen.append(r)

    sys.addaudithook(hook)
    return seen


# ------------------------------------------------------------------------------------------------------- step

STEP_DIM, STEP_EMB, STEP_P, STEP_K = 6, 4, 3, 2


def step_data(world: int, micro: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[micro, world, P*K, D]`` and labels ``[micro, world, P*K]`` (P distinct labels x K per block)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(micro, world, STEP_P * STEP_K, STEP_DIM, generator=g)
    labels = torch.empty(micro, world, STEP_P * STEP_K, dtype=torch.int64)
    for m in range(micro):
        for r in range(world):
            ids = torch.randperm(10, generator=g)[:STEP_P]
            labels[m, r] = ids.repeat_interleave(STEP_K)
    return x, labels


def step_model() -> torch.nn.Module:
    torch.manual_seed(1234)
    return torch.nn.Linear(STEP_DIM, STEP_EMB)


def step_config(global_mining: bool, grad_accum: int):
    from facenet_hf.config import Config

    cfg = Config()
    cfg.loss.global_mining = global_mining
    cfg.loss.mining = "batch_hard"
    cfg.train.grad_accum = grad_accum
    cfg.train.lr = 1.0  # SGD without momentum: the update is exactly -grad
    cfg.train.scheduler = "constant"
    cfg.train.warmup_steps = 0
    cfg.train.grad_clip = None
    return cfg


def run_step(out: Path) -> None:
    """Both step checks, one after the other in the same processes (one launch)."""
    from facenet_hf.training import reset_accelerate_state

    record: dict = {}
    for kind in ("global", "accum"):
        record[kind], accelerator = _one_step_check(kind)
        reset_accelerate_state(accelerator)
    _write(out, record["global"]["rank"], record)


def _one_step_check(kind: str):
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from facenet_hf.losses import TripletLoss
    from facenet_hf.training import train_step
    from facenet_hf.training.state import TrainState

    grad_accum = 2 if kind == "accum" else 1
    cfg = step_config(global_mining=kind == "global", grad_accum=grad_accum)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=grad_accum)
    set_seed(0)
    world, rank = accelerator.num_processes, accelerator.process_index
    model = step_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    allreduces: list[int] = []
    if world > 1:
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(process_group, bucket):
            allreduces[-1] += 1
            return allreduce_hook(process_group, bucket)

        model.register_comm_hook(None, counting_hook)
    loss_fn = TripletLoss(margin=cfg.loss.margin, mining=cfg.loss.mining, squared=cfg.loss.squared)
    state = TrainState()
    x, labels = step_data(world, grad_accum)
    record: dict = {"world": world, "rank": rank, "micro": []}
    for m in range(grad_accum):
        batch = {
            "pixel_values": x[m, rank],
            "labels": labels[m, rank],
            "valid": torch.ones(STEP_P * STEP_K, dtype=torch.bool),
        }
        allreduces.append(0)
        stats = train_step(batch, model, optimizer, loss_fn, accelerator, cfg, state, 10)
        record["micro"].append(
            {
                "sync": bool(accelerator.sync_gradients),
                "loss": float(stats["loss"]),
                "allreduces": allreduces[-1],
            }
        )
    record["after"] = [p.tolist() for p in model.parameters()]
    if kind == "accum":
        # a NaN on the last rank's last micro-batch only: every rank must skip (all-reduced), weights unchanged
        before = param_hash(model)
        for m in range(grad_accum):
            xm = x[m, rank].clone()
            if rank == world - 1 and m == grad_accum - 1:
                xm[0, 0] = float("nan")
            batch = {
                "pixel_values": xm,
                "labels": labels[m, rank],
                "valid": torch.ones(len(xm), dtype=torch.bool),
            }
            train_step(batch, model, optimizer, loss_fn, accelerator, cfg, state, 10)
        record["nan_unchanged"] = param_hash(model) == before
        record["skipped_nonfinite"] = state.skipped_nonfinite
    return record, accelerator


# ------------------------------------------------------------------------------------------------------- eval

EVAL_BATCH = 7  # does not divide the number of images: the last batches are padded, then de-duplicated
EVAL_FOLDS = [1, 2, 3, 4, 5]


def eval_pairs():
    from facenet_hf.data.lfw import read_pairs

    return read_pairs(SAMPLE / "pairs.txt").select_folds(EVAL_FOLDS)


def eval_model():
    from facenet_hf.config import Config
    from facenet_hf.training.build import build_model

    cfg = Config()
    cfg.model.backbone = "test_resnet"
    cfg.model.image_size = 32
    cfg.model.embedding_dim = 32
    torch.manual_seed(7)
    model = build_model(cfg)
    # non-trivial BatchNorm statistics, the same in every process
    with torch.no_grad():
        model.train()
        model(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(3)))
    return model.eval()


def run_eval(out: Path) -> None:
    from accelerate import Accelerator

    from facenet_hf.evaluation.lfw_eval import evaluate_lfw

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(eval_model())
    report, distances = evaluate_lfw(
        model,
        SAMPLE / "lfw-deepfunneled",
        eval_pairs(),
        flip="sum",
        batch_size=EVAL_BATCH,
        accelerator=accelerator,
        progress=False,
    )
    _write(
        out,
        accelerator.process_index,
        {
            "world": accelerator.num_processes,
            "accuracy_mean": report["accuracy_mean"],
            "auc": report["auc"],
            "threshold": report["threshold"],
            "n_images": report["n_images"],
            "distances": distances.tolist(),
        },
    )


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    if mode == "train":
        run_train(out, argv[2:])
    elif mode == "step":
        run_step(out)
    elif mode == "eval":
        run_eval(out)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

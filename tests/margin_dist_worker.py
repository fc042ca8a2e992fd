"""Worker for the margin-softmax multi-process tests (2 CPU processes, gloo), run by ``torch.distributed.run``:

    python -m torch.distributed.run --nproc_per_node 2 tests/margin_dist_worker.py MODE OUT [ARGS...]

Each process writes ``OUT/rank{R}.json``. Modes:

``step OUT``
    ``facenet_hf.training.train_step`` with a ``Linear`` model and a triplet + ArcFace loss whose classifier is
    prepared by accelerate (DDP), one SGD step (lr 1) with local mining, then one with ``loss.global_mining``;
    the parameters after each (model's, then classifier's).
``train OUT ARGV...``
    The recipes' entry point with a callback recording, after every micro-batch, a hash of the model's and of
    the loss's (the classifier's) parameters, and the loss.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

STEP_DIM, STEP_EMB, STEP_CLASSES, STEP_P, STEP_K = 6, 4, 10, 3, 2


def param_hash(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for p in module.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _write(out: Path, rank: int, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def step_parts() -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model and the loss (triplet + 0.5 x ArcFace), seeded: the same in every process and in the test."""
    from facenet_hf.losses import CombinedLoss, MarginSoftmaxLoss, TripletLoss

    torch.manual_seed(1234)
    model = torch.nn.Linear(STEP_DIM, STEP_EMB)
    classifier = MarginSoftmaxLoss(
        STEP_CLASSES, STEP_EMB, kind="arcface", scale=8.0, generator=torch.Generator().manual_seed(5)
    )
    return model, CombinedLoss(TripletLoss(mining="batch_hard"), classifier, weight=0.5)


def step_data(world: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs ``[world, P*K, D]`` and labels ``[world, P*K]`` (P distinct labels x K per block)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world, STEP_P * STEP_K, STEP_DIM, generator=g)
    labels = torch.stack(
        [torch.randperm(STEP_CLASSES, generator=g)[:STEP_P].repeat_interleave(STEP_K) for _ in range(world)]
    )
    return x, labels


def run_step(out: Path) -> None:
    from accelerate import Accelerator

    from facenet_hf.config import Config
    from facenet_hf.training import reset_accelerate_state, train_step
    from facenet_hf.training.state import TrainState

    record: dict = {}
    for mode in ("local", "global"):
        cfg = Config()
        cfg.loss.global_mining = mode == "global"
        cfg.train.lr = 1.0
        cfg.train.scheduler = "constant"
        cfg.train.warmup_steps = 0
        accelerator = Accelerator(cpu=True)
        model, loss_fn = step_parts()
        optimizer = torch.optim.SGD([*model.parameters(), *loss_fn.parameters()], lr=1.0)
        model, optimizer, loss_fn = accelerator.prepare(model, optimizer, loss_fn)
        world, rank = accelerator.num_processes, accelerator.process_index
        x, labels = step_data(world)
        batch = {
            "pixel_values": x[rank],
            "labels": labels[rank],
            "valid": torch.ones(STEP_P * STEP_K, dtype=torch.bool),
        }
        train_step(batch, model, optimizer, loss_fn, accelerator, cfg, TrainState(), 10)
        record[mode] = {
            "world": world,
            "params": [p.detach().tolist() for p in [*model.parameters(), *loss_fn.parameters()]],
        }
        record["rank"] = rank
        reset_accelerate_state(accelerator)
    _write(out, record["rank"], record)


def run_train(out: Path, argv: list[str]) -> None:
    from accelerate.state import PartialState

    from facenet_hf.cli.train import parse_train_config, run_training, train_parser
    from facenet_hf.training import Callback

    calls: list[dict] = []

    class Recorder(Callback):
        def on_step_end(self, run, batch, stats):
            calls.append(
                {
                    "sync": bool(run.accelerator.sync_gradients),
                    "hashes": [param_hash(run.model), param_hash(run.loss_fn)],
                    "loss": float(stats["loss"]),
                }
            )

    cfg, args = parse_train_config(argv, train_parser(prog="margin_dist_worker.py"))
    rc = run_training(cfg, args, callbacks=[Recorder()])
    state = PartialState()
    _write(out, state.process_index, {"rc": rc, "num_processes": state.num_processes, "calls": calls})


def main(argv: list[str]) -> int:
    mode, out = argv[0], Path(argv[1])
    if mode == "step":
        run_step(out)
    elif mode == "train":
        run_train(out, argv[2:])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

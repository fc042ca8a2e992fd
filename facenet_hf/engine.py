"""The training loop: P x K batches -> FaceNet -> mined triplet loss, under ``accelerate``.

``train(cfg)`` builds everything from a :class:`~facenet_hf.config.Config`, trains, evaluates on the held-out
LFW folds, and writes into ``cfg.output_dir``:

- ``config.yaml``: the resolved config; ``metrics.jsonl``: one JSON line per log step and evaluation;
- ``checkpoints/step_N/``: ``accelerator.save_state`` + manifest (atomic, verified on resume);
- ``model/``: the final model (``save_pretrained``: safetensors + config.json with the threshold);
- ``eval/``: the LFW report (JSON) and its ROC / distance plots; ``bad_images.tsv`` if any file was skipped.

Multi-process (``accelerate launch`` / ``torchrun``; docs/training.md): every process takes whole P x K blocks,
process r the sampler's batches r, r + N, ..., so each process gets ``len(sampler) // N`` batches per epoch and an
epoch has ``ceil(len(sampler) // N / grad_accum)`` optimizer steps; the engine sets the sampler's epoch itself
(accelerate does not with N > 1). ``loss.global_mining`` (off by default: one all-gather per step, and the mined
batch becomes N x P x K) mines over all processes' blocks. Only the main process writes files.

Resume (``resume=latest`` or a checkpoint folder) restores model, optimizer, RNG and :class:`TrainState`, cuts
``metrics.jsonl`` back to the checkpoint's step, and skips the batches the epoch already consumed: a run killed
and resumed logs the same losses as an uninterrupted one (CPU, same thread count; tests/test_resume.py).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from facenet_hf import checkpoint
from facenet_hf.build import build_data, build_model
from facenet_hf.config import Config, config_to_dict, save_config
from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import labels_of
from facenet_hf.data.transforms import BatchTransform, build_transform, collate_batch
from facenet_hf.data.workers import LowPriorityWorkers
from facenet_hf.ema import ModelEMA
from facenet_hf.evaluation.lfw_eval import evaluate_lfw, write_report
from facenet_hf.interrupt import DeferredInterrupt, any_process
from facenet_hf.losses import TripletLoss
from facenet_hf.optim import build_optimizer
from facenet_hf.step import NonFiniteLossError, should_stop
from facenet_hf.step import train_step as _train_step  # a module-level name: tests wrap it
from facenet_hf.train_state import (
    RowsByPath,
    TrainState,
    exclude_bad_rows,
    position,
    remap_position,
    save_checkpoint,
    truncate_metrics,
    write_bad_images,
)

__all__ = ["NonFiniteLossError", "TrainResult", "TrainState", "build_data", "build_model", "train"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None
    report: dict[str, Any] | None
    state: TrainState
    images_per_second: float


def _check_output_dir(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    if (out / "config.yaml").exists() and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds a run; pass resume=latest to continue it, overwrite=true to replace it, "
            "or choose another output_dir"
        )
    try:  # fail now, not after the data is loaded: permissions, a file in the way, a read-only disk
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise type(e)(
            e.errno,
            f"cannot write into output_dir {out}: {e.strerror or e} ({e.filename}); fix its permissions or "
            "choose another output_dir",
        ) from None
    return out


def train(cfg: Config, *, progress: bool = True) -> TrainResult:
    """Train a FaceNet as ``cfg`` says; see the module docstring for what is written where."""
    t = cfg.train
    out = _check_output_dir(cfg)
    accelerator = Accelerator(
        cpu=not _has_accelerator_device(),  # else torchrun on CPUs gives N independent 1-process runs
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with=_trackers(),
        project_dir=str(out),
    )
    try:
        _check_world_size(accelerator)
        return _train(cfg, accelerator, out, progress)
    finally:
        _release(accelerator)


def _has_accelerator_device() -> bool:
    """Whether torch sees a GPU (or another accelerator); without one, accelerate must be told ``cpu=True``."""
    acc = getattr(torch, "accelerator", None)
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def _check_world_size(accelerator: Accelerator) -> None:
    """Refuse to run as several independent single-process runs (they would write the same files)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); on CPUs use `accelerate launch --multi_gpu --num_processes N` or "
            "`torchrun --nproc_per_node N` (`accelerate launch --cpu --num_processes N` starts 1 process)"
        )


def _train(cfg: Config, accelerator: Accelerator, out: Path, progress: bool) -> TrainResult:
    t = cfg.train
    set_seed(t.seed)
    prescan_bad: list = []
    train_ds, eval_pairs = build_data(
        cfg, bad_images=prescan_bad, progress=progress and accelerator.is_main_process
    )
    sampler = PKBatchSampler(
        labels_of(train_ds),
        cfg.data.p,
        cfg.data.k,
        seed=t.seed,
        replacement=cfg.data.replacement,
        min_images=cfg.data.min_images,
    )
    model = build_model(cfg)
    if accelerator.is_main_process:  # written once the data and the model are known to be usable
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_tf = build_transform(
        cfg.data.train_transforms, image_size=model.image_size, mean=model.mean, std=model.std
    )
    batch_tf = BatchTransform(
        train_tf, bad_image_policy=cfg.data.bad_images, seed=t.seed, channels_last=t.channels_last
    )
    loader = DataLoader(
        train_ds.with_transform(batch_tf),
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_batch,
        # not persistent: each epoch's workers start from batch_tf as it is then (its epoch, see below)
        persistent_workers=False,
        generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG out of the data order
        worker_init_fn=LowPriorityWorkers(cfg.data.worker_nice),
    )
    optimizer = build_optimizer(model, t)
    loss_fn = TripletLoss(margin=cfg.loss.margin, mining=cfg.loss.mining, squared=cfg.loss.squared)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    ema = ModelEMA(accelerator.unwrap_model(model), t.ema_decay) if t.ema_decay else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    scored = ema.module if ema is not None else model  # what is evaluated and saved

    # len(loader) = len(sampler) // num_processes; accelerate also syncs on an epoch's last micro-batch
    steps_per_epoch = max(1, -(-len(loader) // t.grad_accum))
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    ckpt_root = out / "checkpoints"
    metrics_file = out / "metrics.jsonl"
    if cfg.resume:
        path = checkpoint.resolve(cfg.resume, ckpt_root)
        accelerator.load_state(str(path))
        logger.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
        state.batches_in_epoch = remap_position(state, accelerator.num_processes)
        if accelerator.is_main_process:
            truncate_metrics(metrics_file, state.step)
        accelerator.wait_for_everyone()
    saved = position(state) if cfg.resume else None  # the state the newest checkpoint holds
    state.num_processes = accelerator.num_processes
    known = {p for p, _ in state.bad_images}
    state.bad_images.extend(b for b in prescan_bad if b[0] not in known)
    if state.excluded:
        sampler.exclude(state.excluded)
    rows_of = RowsByPath(train_ds)
    if accelerator.is_main_process:
        accelerator.init_trackers("facenet_hf", config=_flat(config_to_dict(cfg)))

    report = None
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="training",
        disable=not (progress and accelerator.is_main_process),
    )
    stop = state.step >= total_steps
    mid_step = False  # micro-batches consumed whose optimizer step is not done (not in a checkpoint)
    agreed = False  # every process stops at the same step boundary (a deferred Ctrl-C)
    interrupt = DeferredInterrupt()
    try:
        interrupt.install()
        while not stop:
            # accelerate's loader re-sets the sampler's epoch from its own counter (1 process) and does not call
            # it at all (> 1 process): set both, then skip what a resumed run already consumed. With N processes
            # BatchSamplerShard hands process r the sampler's batches r, r + N, ...: the sampler position is
            # N x the batches each process consumed. The augmentations are seeded per (seed, epoch, batch).
            loader.set_epoch(state.epoch)
            sampler.set_epoch(state.epoch)
            sampler.skip(state.batches_in_epoch * accelerator.num_processes)
            batch_tf.set_epoch(state.epoch)
            t0 = time.perf_counter()
            for batch in loader:
                mid_step = True
                state.batches_in_epoch += 1
                stats = _train_step(batch, model, optimizer, loss_fn, accelerator, cfg, state, total_steps)
                if not accelerator.sync_gradients:
                    continue
                now = time.perf_counter()
                state.elapsed += now - t0
                t0 = now
                state.step += 1
                mid_step = False
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model))
                bar.update(1)
                if state.step % t.log_every == 0:
                    _log(accelerator, state, stats, optimizer, metrics_file, bar)
                    stop = should_stop(accelerator, state, cfg)
                if t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0:
                    save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
                    saved = position(state)
                if any_process(accelerator, interrupt.requested):
                    agreed = True
                    raise KeyboardInterrupt
                if state.step >= total_steps:
                    stop = True
                if stop:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
                exclude_bad_rows(accelerator, sampler, state, rows_of)
                save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
                saved = position(state)
                if (
                    eval_pairs is not None
                    and t.eval_every_epochs
                    and state.epoch % t.eval_every_epochs == 0
                    and not stop
                ):
                    report = _evaluate(accelerator, scored, cfg, eval_pairs, state, metrics_file, write=False)
    except KeyboardInterrupt:
        # Only a state between optimizer steps can be saved (accumulated gradients are not in a checkpoint),
        # and with several processes only if all stopped at the same step (else one may be in a collective).
        if not mid_step and (agreed or accelerator.num_processes == 1) and saved != position(state):
            logger.warning("interrupted: saving a checkpoint at step %d before exiting", state.step)
            save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
        else:
            logger.warning(
                "interrupted at step %d; resume=latest continues from the last checkpoint", state.step
            )
        raise
    finally:
        interrupt.uninstall()
        bar.close()
        write_bad_images(accelerator, state, out)

    if saved != position(state):
        save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
    if eval_pairs is not None:
        report = _evaluate(accelerator, scored, cfg, eval_pairs, state, metrics_file, write=True)
    model_dir = None
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(scored)
        if report is not None:
            final.threshold = float(report["threshold"])
            final.threshold_flip = t.eval_flip
        model_dir = out / "model"
        final.save_pretrained(model_dir)
        _publish(cfg, model_dir, report, state, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    ips = state.images / state.elapsed if state.elapsed > 0 else 0.0
    return TrainResult(out, model_dir, report, state, ips)


def _log(accelerator, state, stats, optimizer, metrics_file: Path, bar) -> None:
    """Log the last step's stats, averaged over the processes (each mines its own block unless global)."""
    names = sorted(stats)
    vec = torch.stack([stats[k].detach().float().reshape(()) for k in names]).to(accelerator.device)
    if accelerator.num_processes > 1:
        vec = accelerator.reduce(vec, reduction="mean")
    values: dict[str, Any] = dict(zip(names, vec.tolist(), strict=True))
    values["skipped_nonfinite"] = state.skipped_nonfinite
    values["lr"] = optimizer.param_groups[0]["lr"]
    values["images_per_second"] = state.images / max(state.elapsed, 1e-9)
    values["epoch"] = state.epoch
    if values.get("mean_neg_dist", 1.0) < 1e-4 and values.get("mean_pos_dist", 1.0) < 1e-4:
        logger.warning(
            "step %d: embeddings have collapsed (mean anchor-positive %.2e, anchor-negative %.2e); "
            "lower the learning rate or use semihard mining",
            state.step,
            values["mean_pos_dist"],
            values["mean_neg_dist"],
        )
    accelerator.log(values, step=state.step)
    if accelerator.is_main_process:
        bar.set_postfix(loss=f"{values['loss']:.4f}", active=f"{values.get('frac_active', 0):.2f}")
        with metrics_file.open("a") as f:
            f.write(json.dumps({"step": state.step, "elapsed": round(state.elapsed, 2), **values}) + "\n")


def _evaluate(accelerator, model, cfg, pairs, state, metrics_file: Path, *, write: bool) -> dict[str, Any]:
    t = cfg.train
    report, distances = evaluate_lfw(
        model,
        cfg.data.lfw_dir,
        pairs,
        flip=t.eval_flip,
        batch_size=t.eval_batch_size,
        num_workers=cfg.data.num_workers,
        worker_nice=cfg.data.worker_nice,
        squared=cfg.loss.squared,
        accelerator=accelerator,
        progress=False,
    )
    if accelerator.is_main_process:
        summary = {k: report[k] for k in ("accuracy_mean", "accuracy_std", "auc", "tar_at_far", "threshold")}
        accelerator.log({f"eval/{k}": v for k, v in summary.items()}, step=state.step)
        with metrics_file.open("a") as f:
            f.write(
                json.dumps({"step": state.step, "elapsed": round(state.elapsed, 2), "eval": summary}) + "\n"
            )
        if write:
            write_report(report, distances, pairs.is_same, Path(cfg.output_dir) / "eval")
    return report


def _publish(cfg: Config, model_dir: Path, report, state: TrainState, accelerator) -> None:
    """Model card (with the evaluation and the resolved config) and, if asked, the push to the Hub."""
    from facenet_hf.evaluation.verification import report_to_json
    from facenet_hf.hub import push_model, write_model_card

    roc = Path(cfg.output_dir) / "eval" / "lfw_roc.png"
    info = {
        "hardware": _hardware(accelerator),
        "processes": accelerator.num_processes,
        "mixed_precision": cfg.train.mixed_precision,
        "steps": state.step,
        "images": state.images,
        "wall_time_s": round(state.elapsed, 1),
    }
    write_model_card(
        model_dir,
        report=report_to_json(report) if report is not None else None,
        train_config=config_to_dict(cfg),
        training_info=info,
        repo_id=cfg.push_to_hub,
        roc_image=roc if roc.is_file() else None,
    )
    if cfg.push_to_hub:
        push_model(model_dir, cfg.push_to_hub)


def _hardware(accelerator) -> str:
    import platform

    if accelerator.device.type == "cuda":
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _release(accelerator: Accelerator) -> None:
    """Forget this run's precision / accumulation settings (accelerate keeps them process-wide), so that the
    same process can train again with others (tests, notebooks, the 10-fold protocol). The process group stays."""
    from accelerate.state import AcceleratorState, GradientState

    accelerator.free_memory()
    AcceleratorState._reset_state()
    GradientState._reset_state()


def _trackers() -> list[str] | None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return ["tensorboard"]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, f"{key}/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = "none" if v is None else v
        else:
            out[key] = json.dumps(v)
    return out

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

Seams (what tests and users plug in without touching the loop): ``loss_fn`` (any module ``(embeddings, labels)
-> (loss, stats)``; default from ``cfg.loss``, built once the training identities are known; a module with
trainable parameters, such as the margin softmax's classifier, is optimised, prepared and checkpointed with the
model but left out of ``model/``), ``step_fn`` (default :func:`facenet_hf.training.step.train_step`)
and ``callbacks`` (:class:`facenet_hf.training.callbacks.Callback`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from facenet_hf.config import Config, ConfigError, config_to_dict, save_config, source_name
from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import labels_of
from facenet_hf.data.transforms import BatchTransform, build_transform, collate_batch
from facenet_hf.data.workers import LowPriorityWorkers
from facenet_hf.losses import CombinedLoss, MarginSoftmaxLoss, TripletLoss
from facenet_hf.training import checkpoint
from facenet_hf.training.build import build_data, build_model
from facenet_hf.training.callbacks import Callback, CallbackList, Run
from facenet_hf.training.distributed import (
    any_process,
    check_mixed_precision,
    check_world_size,
    has_accelerator_device,
    reset_accelerate_state,
)
from facenet_hf.training.ema import ModelEMA
from facenet_hf.training.interrupt import DeferredInterrupt
from facenet_hf.training.optim import build_optimizer
from facenet_hf.training.reporting import evaluate_run, flat_config, log_step, publish_model, trackers
from facenet_hf.training.state import (
    RowsByPath,
    TrainState,
    exclude_bad_rows,
    position,
    remap_position,
    truncate_metrics,
    write_bad_images,
)
from facenet_hf.training.step import should_stop, train_step, trained_loss_parameters

__all__ = ["TrainResult", "build_loss", "num_classes", "train"]

logger = logging.getLogger(__name__)

StepFn = Callable[..., dict[str, torch.Tensor]]


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None
    report: dict[str, Any] | None
    state: TrainState
    images_per_second: float


def build_loss(cfg: Config, *, num_classes: int | None = None) -> torch.nn.Module:
    """The loss a config asks for (``loss.objective``).

    ``triplet``: a :class:`TripletLoss`. The margin-softmax objectives need ``num_classes`` (the training
    identities: the dataset's dense labels ``0..num_classes-1``) and give a :class:`CombinedLoss` holding the
    classifier, initialised from ``train.seed`` (its own generator: the global RNG is not drawn from)."""
    lc = cfg.loss
    triplet = TripletLoss(margin=lc.margin, mining=lc.mining, squared=lc.squared)
    if lc.objective == "triplet":
        return triplet
    kind = lc.objective.removeprefix("triplet+")
    if num_classes is None:
        raise ValueError(
            f"loss.objective={lc.objective!r} needs num_classes (the number of training identities) for its classifier"
        )
    margin_softmax = MarginSoftmaxLoss(
        num_classes,
        cfg.model.embedding_dim,
        kind=kind,
        margin=lc.arcface_margin if kind == "arcface" else lc.cosface_margin,
        scale=lc.margin_softmax_scale,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    return CombinedLoss(
        triplet if lc.objective.startswith("triplet+") else None,
        margin_softmax,
        weight=lc.margin_softmax_weight,
    )


def num_classes(ds) -> int:
    """The number of training identities of a dataset with dense labels (``max(label) + 1``)."""
    labels = labels_of(ds)
    return int(labels.max()) + 1 if labels.size else 0


def train(
    cfg: Config,
    *,
    progress: bool = True,
    loss_fn: torch.nn.Module | None = None,
    step_fn: StepFn = train_step,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Train a FaceNet as ``cfg`` says; see the module docstring for what is written where."""
    t = cfg.train
    try:  # a machine question, so asked here and not when the config is read
        check_mixed_precision(t.mixed_precision, "cuda" if torch.cuda.is_available() else "cpu")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = _check_output_dir(cfg)
    accelerator = Accelerator(
        cpu=not has_accelerator_device(),  # else torchrun on CPUs gives N independent 1-process runs
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with=trackers(),
        project_dir=str(out),
    )
    try:
        check_world_size(accelerator)
        return _train(
            cfg,
            accelerator,
            out,
            progress,
            loss_fn,
            step_fn,
            CallbackList(callbacks),
        )
    finally:
        reset_accelerate_state(accelerator)


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


@dataclass
class _Loop:
    """The loop's own bookkeeping (what a checkpoint does not need)."""

    saved: tuple[int, int, int] | None  # the position the newest checkpoint holds
    mid_step: bool = False  # micro-batches consumed whose optimizer step is not done (not in a checkpoint)
    agreed: bool = False  # every process stops at the same step boundary (a deferred Ctrl-C)
    report: dict[str, Any] | None = None


def _train(cfg, accelerator, out: Path, progress: bool, loss_fn, step_fn: StepFn, callbacks: CallbackList):
    t = cfg.train
    set_seed(t.seed)
    # 1. data, model, loader, optimizer
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
    if loss_fn is None:  # the training identities are known now: the margin softmax's classes
        loss_fn = build_loss(cfg, num_classes=num_classes(train_ds))
    if accelerator.is_main_process:  # written once the data and the model are known to be usable
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_tf = build_transform(
        cfg.data.train_transforms, image_size=model.image_size, mean=model.mean, std=model.std
    )
    source_tfs = {
        source_name(src): build_transform(
            src.train_transforms, image_size=model.image_size, mean=model.mean, std=model.std
        )
        for src in cfg.data.extra_sources
        if src.train_transforms is not None
    }
    batch_tf = BatchTransform(
        train_tf,
        bad_image_policy=cfg.data.bad_images,
        seed=t.seed,
        channels_last=t.channels_last,
        source_transforms=source_tfs,
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
    # a loss with parameters (the margin softmax's classifier) trains beside the model: in the optimizer, prepared
    # (DDP-wrapped with several processes: its gradients are averaged like the model's) and so in every
    # checkpoint (accelerate's model_1.safetensors), but never in the saved embedder (model/ is the FaceNet alone)
    trains_loss = bool(trained_loss_parameters(loss_fn))
    optimizer = build_optimizer(model, t, extra=loss_fn if trains_loss else None)
    if trains_loss:
        model, optimizer, loader, loss_fn = accelerator.prepare(model, optimizer, loader, loss_fn)
    else:
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

    # 2. resume
    if cfg.resume:
        path = checkpoint.resolve(cfg.resume, ckpt_root)
        accelerator.load_state(str(path))
        logger.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
        state.batches_in_epoch = remap_position(state, accelerator.num_processes)
        if accelerator.is_main_process:
            truncate_metrics(metrics_file, state.step)
        accelerator.wait_for_everyone()
    loop = _Loop(saved=position(state) if cfg.resume else None)
    state.num_processes = accelerator.num_processes
    known = {p for p, _ in state.bad_images}
    state.bad_images.extend(b for b in prescan_bad if b[0] not in known)
    if state.excluded:
        sampler.exclude(state.excluded)
    rows_of = RowsByPath(train_ds)
    if accelerator.is_main_process:
        accelerator.init_trackers("facenet_hf", config=flat_config(config_to_dict(cfg)))
    run = Run(cfg, accelerator, model, optimizer, state, out, total_steps, loss_fn=loss_fn)
    callbacks.on_train_start(run)

    def save() -> None:
        checkpoint.save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
        loop.saved = position(state)

    # 3. the epochs
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="training",
        disable=not (progress and accelerator.is_main_process),
    )
    interrupt = DeferredInterrupt()
    stop = state.step >= total_steps
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
            callbacks.on_epoch_start(run)
            stop = _train_epoch(run, loader, loss_fn, step_fn, callbacks, ema, interrupt, loop, bar, save)
            if stop:
                break
            state.epoch += 1
            state.batches_in_epoch = 0
            exclude_bad_rows(accelerator, sampler, state, rows_of)
            save()
            if eval_pairs is not None and t.eval_every_epochs and state.epoch % t.eval_every_epochs == 0:
                loop.report = evaluate_run(
                    accelerator, scored, cfg, eval_pairs, state, metrics_file, write=False
                )
            stop = state.step >= total_steps
    except KeyboardInterrupt:
        # Only a state between optimizer steps can be saved (accumulated gradients are not in a checkpoint),
        # and with several processes only if all stopped at the same step (else one may be in a collective).
        if (
            not loop.mid_step
            and (loop.agreed or accelerator.num_processes == 1)
            and loop.saved != position(state)
        ):
            logger.warning("interrupted: saving a checkpoint at step %d before exiting", state.step)
            save()
        else:
            logger.warning(
                "interrupted at step %d; resume=latest continues from the last checkpoint", state.step
            )
        raise
    finally:
        interrupt.uninstall()
        bar.close()
        write_bad_images(accelerator, state, out)

    # 4. the end: last checkpoint, evaluation, the model folder
    if loop.saved != position(state):
        save()
    if eval_pairs is not None:
        loop.report = evaluate_run(accelerator, scored, cfg, eval_pairs, state, metrics_file, write=True)
    model_dir = None
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(scored)
        if loop.report is not None:
            final.threshold = float(loop.report["threshold"])
            final.threshold_flip = t.eval_flip
        model_dir = out / "model"
        final.save_pretrained(model_dir)
        publish_model(cfg, model_dir, loop.report, state, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    ips = state.images / state.elapsed if state.elapsed > 0 else 0.0
    result = TrainResult(out, model_dir, loop.report, state, ips)
    callbacks.on_train_end(run, result)
    return result


def _train_epoch(
    run: Run, loader, loss_fn, step_fn: StepFn, callbacks, ema, interrupt, loop: _Loop, bar, save
) -> bool:
    """The rest of the current epoch; True when the run must stop before the epoch's end (step or time budget)."""
    accelerator, state, cfg, t = run.accelerator, run.state, run.cfg, run.cfg.train
    t0 = time.perf_counter()
    for batch in loader:
        loop.mid_step = True
        state.batches_in_epoch += 1
        callbacks.on_batch(run, batch)
        stats = step_fn(batch, run.model, run.optimizer, loss_fn, accelerator, cfg, state, run.total_steps)
        callbacks.on_step_end(run, batch, stats)
        if not accelerator.sync_gradients:
            continue
        now = time.perf_counter()
        state.elapsed += now - t0
        t0 = now
        state.step += 1
        loop.mid_step = False
        if ema is not None:
            ema.update(accelerator.unwrap_model(run.model))
        bar.update(1)
        stop = False
        if state.step % t.log_every == 0:
            log_step(accelerator, state, stats, run.optimizer, run.output_dir / "metrics.jsonl", bar)
            stop = should_stop(accelerator, state, cfg)
        if t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0:
            save()
        if any_process(accelerator, interrupt.requested):
            loop.agreed = True
            raise KeyboardInterrupt
        if stop or state.step >= run.total_steps:
            return True
    return False

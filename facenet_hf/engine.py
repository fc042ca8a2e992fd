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
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from facenet_hf import checkpoint
from facenet_hf.config import Config, ConfigError, config_to_dict, save_config
from facenet_hf.data.images import BadImageError
from facenet_hf.data.lfw import (
    LFWPairs,
    check_disjoint,
    identity_disjoint_split,
    missing_pair_images,
    read_pairs,
)
from facenet_hf.data.prescan import prescan_dataset, scan_files
from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import arrow_column, labels_of, load_source
from facenet_hf.data.transforms import BatchTransform, build_transform, collate_batch
from facenet_hf.evaluation.lfw_eval import evaluate_lfw, write_report
from facenet_hf.losses import TripletLoss
from facenet_hf.model import FaceNet
from facenet_hf.optim import build_optimizer, lr_factor, set_lr

logger = logging.getLogger(__name__)

FIXED_MEAN = (0.5, 0.5, 0.5)  # FaceNet's (x - 127.5) / 128 on [0, 255] pixels == (x - 0.5) / (128 / 255)
FIXED_STD = (128 / 255, 128 / 255, 128 / 255)


@dataclass
class TrainState:
    """Counters saved in every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches this process consumed in the current epoch
    num_processes: int = 0  # of the run that saved it (0: unknown), to place a resume with another count
    elapsed: float = 0.0  # training seconds (evaluation excluded)
    images: int = 0  # training images seen, all processes together
    skipped_nonfinite: int = 0
    bad_images: list = field(default_factory=list)  # [path, reason] of files skipped so far
    excluded: list = field(default_factory=list)  # rows no longer sampled (failed to decode; 1 process)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)


@dataclass
class TrainResult:
    output_dir: Path
    model_dir: Path | None
    report: dict[str, Any] | None
    state: TrainState
    images_per_second: float


class NonFiniteLossError(FloatingPointError):
    pass


def build_model(cfg: Config) -> FaceNet:
    """The one place a FaceNet is built from a config."""
    m = cfg.model
    mean, std = (FIXED_MEAN, FIXED_STD) if m.normalization == "fixed" else (None, None)
    model = FaceNet(
        backbone=m.backbone,
        embedding_dim=m.embedding_dim,
        head_bn=m.head_bn,
        dropout=m.dropout,
        image_size=m.image_size,
        mean=mean,
        std=std,
        eval_transforms=list(cfg.data.eval_transforms),
        distance="squared_euclidean" if cfg.loss.squared else "euclidean",
    )
    if m.pretrained_weights:
        model.load_backbone_weights(m.pretrained_weights)
    _check_image_size(model, cfg)
    return model


def _check_image_size(model: FaceNet, cfg: Config) -> None:
    """Refuse a ``model.image_size`` the backbone cannot take (e.g. a ViT built for 224 px), before training."""
    size, name = cfg.model.image_size, cfg.model.backbone
    patch = getattr(model.backbone, "patch_embed", None)
    fixed = getattr(patch, "img_size", None)
    if fixed is not None and getattr(patch, "strict_img_size", False) and tuple(fixed) != (size, size):
        raise ConfigError(
            f"model.image_size={size} does not fit backbone {name!r}: it takes only {fixed[0]}x{fixed[1]} images; "
            f"set model.image_size={fixed[0]}, or use a backbone that takes any size (a CNN such as resnet18)"
        )
    was_training = model.training
    model.eval()
    try:
        error = _forward_error(model, size)
        if error is None:
            return
        default = (getattr(model.backbone, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
        if default != size and _forward_error(model, default) is None:
            raise ConfigError(
                f"model.image_size={size} does not fit backbone {name!r}: it fails on {size}x{size} images "
                f"({error}) but works at {default}x{default}; set model.image_size={default}"
            )
        raise ValueError(
            f"backbone {name!r} does not work as a FaceNet backbone: a forward pass fails ({error})"
        )
    finally:
        model.train(was_training)


def _forward_error(model: FaceNet, size: int) -> str | None:
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def build_data(cfg: Config, *, bad_images: list | None = None, progress: bool = False):
    """Training dataset (identity-disjoint from the evaluation pairs) and the evaluation pairs (or None).

    Every data error surfaces here, before training: the source, the pairs file, missing or unusable pair
    images, and (``data.prescan``) unusable training images: the first one with ``data.bad_images=error``, more
    than ``data.max_bad_fraction`` of them with ``skip``; else they are dropped and their ``[path, reason]``
    appended to ``bad_images``.
    """
    d = cfg.data
    source = d.train_source or d.lfw_dir
    ds = load_source(
        source, image_column=d.image_column, label_column=d.label_column, name_column=d.name_column
    )
    pairs: LFWPairs | None = read_pairs(d.pairs) if d.pairs else None
    if pairs is not None and d.holdout_folds:
        ds, pairs = identity_disjoint_split(ds, pairs, d.holdout_folds)
    elif pairs is not None:
        check_disjoint(set(ds.unique("identity")), pairs)
    if pairs is not None:
        _check_pair_images(cfg, pairs)
    total = len(ds)
    ds, bad = prescan_dataset(
        ds,
        mode=d.prescan,
        policy=d.bad_images,
        max_bad_fraction=d.max_bad_fraction,
        num_workers=d.num_workers,
        progress=progress,
    )
    if bad:
        logger.warning(
            "pre-scan: %d of %d training images are unusable and left out (see bad_images.tsv), e.g. %s: %s",
            len(bad),
            total,
            bad[0][1],
            bad[0][2],
        )
        if bad_images is not None:
            bad_images.extend([path, reason] for _, path, reason in bad)
    return ds, pairs


def _check_pair_images(cfg: Config, pairs: LFWPairs) -> None:
    """Every pair image must exist (and, with ``data.prescan``, be usable): the protocol needs every pair."""
    root = Path(cfg.data.lfw_dir)
    missing = missing_pair_images(root, pairs)
    if missing:
        shown = ", ".join(missing[:20]) + (", ..." if len(missing) > 20 else "")
        raise FileNotFoundError(
            f"{len(missing)} images named by the evaluation pairs ({cfg.data.pairs}) are missing under {root}: "
            f"{shown}; data.lfw_dir must hold Name/Name_NNNN.jpg for every pair image"
        )
    if cfg.data.prescan == "off":
        return
    p1, p2 = pairs.paths()
    bad = scan_files(
        [root / p for p in sorted(set(p1) | set(p2))],
        decode=cfg.data.prescan == "decode",
        num_workers=cfg.data.num_workers,
    )
    if bad:
        others = "; ".join(f"{path}: {reason}" for _, path, reason in bad[1:6])
        raise BadImageError(
            bad[0][1],
            f"{bad[0][2]} [an evaluation pair image: the verification protocol needs every pair; "
            f"{len(bad)} pair image(s) are unusable{': ' + others if others else ''}]",
        )


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
    batch_tf = BatchTransform(train_tf, bad_image_policy=cfg.data.bad_images, seed=t.seed)
    loader = DataLoader(
        train_ds.with_transform(batch_tf),
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        collate_fn=collate_batch,
        # not persistent: each epoch's workers start from batch_tf as it is then (its epoch, see below)
        persistent_workers=False,
        generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG out of the data order
    )
    optimizer = build_optimizer(model, t)
    loss_fn = TripletLoss(margin=cfg.loss.margin, mining=cfg.loss.mining, squared=cfg.loss.squared)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    # len(loader) = len(sampler) // num_processes; accelerate also syncs on an epoch's last micro-batch
    steps_per_epoch = max(1, -(-len(loader) // t.grad_accum))
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    ckpt_root = out / "checkpoints"
    metrics_file = out / "metrics.jsonl"
    if cfg.resume:
        path = checkpoint.resolve(cfg.resume, ckpt_root)
        accelerator.load_state(str(path))
        logger.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
        state.batches_in_epoch = _remap_position(state, accelerator.num_processes)
        if accelerator.is_main_process:
            _truncate_metrics(metrics_file, state.step)
        accelerator.wait_for_everyone()
    saved = _position(state) if cfg.resume else None  # the state the newest checkpoint holds
    state.num_processes = accelerator.num_processes
    known = {p for p, _ in state.bad_images}
    state.bad_images.extend(b for b in prescan_bad if b[0] not in known)
    if state.excluded:
        sampler.exclude(state.excluded)
    rows_of = _RowsByPath(train_ds)
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
    interrupt = _DeferredInterrupt()
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
                bar.update(1)
                if state.step % t.log_every == 0:
                    _log(accelerator, state, stats, optimizer, metrics_file, bar)
                    stop = _should_stop(accelerator, state, cfg)
                if t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0:
                    save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
                    saved = _position(state)
                if _any_process(accelerator, interrupt.requested):
                    agreed = True
                    raise KeyboardInterrupt
                if state.step >= total_steps:
                    stop = True
                if stop:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
                _exclude_bad_rows(accelerator, sampler, state, rows_of)
                save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
                saved = _position(state)
                if (
                    eval_pairs is not None
                    and t.eval_every_epochs
                    and state.epoch % t.eval_every_epochs == 0
                    and not stop
                ):
                    report = _evaluate(accelerator, model, cfg, eval_pairs, state, metrics_file, write=False)
    except KeyboardInterrupt:
        # Only a state between optimizer steps can be saved (accumulated gradients are not in a checkpoint),
        # and with several processes only if all stopped at the same step (else one may be in a collective).
        if not mid_step and (agreed or accelerator.num_processes == 1) and saved != _position(state):
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
        _write_bad_images(accelerator, state, out)

    if saved != _position(state):
        save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
    if eval_pairs is not None:
        report = _evaluate(accelerator, model, cfg, eval_pairs, state, metrics_file, write=True)
    model_dir = None
    if accelerator.is_main_process:
        final = accelerator.unwrap_model(model)
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


def _train_step(
    batch, model, optimizer, loss_fn, accelerator, cfg, state, total_steps
) -> dict[str, torch.Tensor]:
    t = cfg.train
    x = batch["pixel_values"]
    if t.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    labels, valid = batch["labels"], batch["valid"]
    for path, reason in batch.get("bad", []):
        state.bad_images.append([path, reason])
    # BatchNorm running statistics change in the forward: keep a copy to undo a skipped (non-finite) batch
    buffers = [b for b in model.buffers() if b.is_floating_point()] if t.nonfinite_loss == "skip" else []
    saved_buffers = [b.detach().clone() for b in buffers]
    with accelerator.accumulate(model):
        emb = model(x)
        if cfg.loss.global_mining and accelerator.num_processes > 1:
            emb, labels, valid = _gather_with_local_grad(accelerator, emb, labels, valid)
        loss, stats = loss_fn(emb[valid], labels[valid])
        stats["loss"] = loss.detach()  # logged as computed (before the scaling below)
        if cfg.loss.global_mining and accelerator.num_processes > 1:
            loss = loss * accelerator.num_processes  # DDP averages: this makes the sum the global gradient
        if not _all_finite(accelerator, loss):
            if t.nonfinite_loss == "error":
                raise NonFiniteLossError(
                    f"non-finite loss ({loss.item()}) at step {state.step}; lower train.lr, set train.grad_clip, "
                    "or use train.nonfinite_loss=skip"
                )
            state.skipped_nonfinite += 1  # every process skips the same backward: the weights stay clean
            logger.warning(
                "step %d: non-finite loss, step skipped (%d so far)", state.step, state.skipped_nonfinite
            )
            with torch.no_grad():
                for b, old in zip(buffers, saved_buffers, strict=True):
                    b.copy_(old)
            optimizer.zero_grad(set_to_none=True)  # a no-op on a micro-step that does not sync
            return stats
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            progress = _progress(state, cfg, total_steps)
            set_lr(optimizer, t.lr * lr_factor(state.step, t, progress))
            if t.grad_clip:
                accelerator.clip_grad_norm_(model.parameters(), t.grad_clip)  # unscales fp16 grads first
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state.images += x.shape[0] * accelerator.num_processes
    return stats


class _DeferredInterrupt:
    """Ctrl-C (SIGINT) while training: finish the current optimizer step, then raise KeyboardInterrupt at the
    step boundary (so the checkpoint saved on the way out is exact); a second Ctrl-C raises at once."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def _any_process(accelerator, flag: bool) -> bool:
    """``flag`` on any process (a collective with several: every process must call it at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def _remap_position(state: TrainState, num_processes: int) -> int:
    """Batches per process already consumed in the epoch, for a resume with ``num_processes`` processes.

    The epoch's first ``batches_in_epoch x saved num_processes`` sampler batches are done; with another process
    count the position is rounded down to a multiple of it (at most ``num_processes - 1`` batches are seen twice).
    """
    old = state.num_processes
    if not old or old == num_processes or not state.batches_in_epoch:
        return state.batches_in_epoch
    done = state.batches_in_epoch * old
    logger.warning(
        "resuming a %d-process run with %d processes: the epoch continues at sampler batch %d (of %d done)",
        old,
        num_processes,
        done // num_processes * num_processes,
        done,
    )
    return done // num_processes


def _position(state: TrainState) -> tuple[int, int, int]:
    return state.step, state.epoch, state.batches_in_epoch


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the lines a killed run wrote after the checkpoint it resumes from (and a half-written last line)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and entry.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def _all_finite(accelerator, loss: torch.Tensor) -> bool:
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes
    return bool(finite.item() == 1.0)


def _gather_with_local_grad(accelerator, emb, labels, valid):
    """All processes' embeddings (others' without gradient, ours with it), labels and masks."""
    all_emb = accelerator.gather(emb.detach())
    b, r = emb.shape[0], accelerator.process_index
    all_emb = torch.cat([all_emb[: r * b], emb, all_emb[(r + 1) * b :]])
    return all_emb, accelerator.gather(labels), accelerator.gather(valid)


def _progress(state: TrainState, cfg: Config, total_steps: int) -> float:
    t = cfg.train
    span = max(1, total_steps - t.warmup_steps)
    p = (state.step - t.warmup_steps) / span
    if t.time_budget_minutes:
        p = max(p, state.elapsed / (60 * t.time_budget_minutes))
    return p


def _should_stop(accelerator, state: TrainState, cfg: Config) -> bool:
    """Time budget reached (decided by the main process, so every process stops at the same step)."""
    if not cfg.train.time_budget_minutes:
        return False
    flag = torch.tensor(
        [float(state.elapsed >= 60 * cfg.train.time_budget_minutes)], device=accelerator.device
    )
    return (
        bool(accelerator.reduce(flag, reduction="sum").item() > 0)
        if accelerator.num_processes > 1
        else bool(flag)
    )


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
        squared=cfg.loss.squared,
        accelerator=accelerator,
        progress=False,
    )
    model.train()
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


def save_checkpoint(accelerator, state: TrainState, root: Path, keep: int) -> Path | None:
    """``save_state`` into a temporary folder, then verify-and-rename it (main process), then prune.

    A write failure (disk full, permissions, ...) removes the temporary folder and raises
    :class:`~facenet_hf.checkpoint.CheckpointError` naming the checkpoint and the cause; earlier checkpoints are
    untouched, so ``resume=latest`` continues from the last complete one.
    """
    tmp = checkpoint.tmp_dir_for(root, state.step)
    try:
        if accelerator.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        accelerator.wait_for_everyone()
        final = None
        if accelerator.is_main_process:
            final = checkpoint.finalize(tmp, state.step)
            checkpoint.prune(root, keep)
    except Exception as e:
        if isinstance(e, checkpoint.CheckpointError):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoint.list_checkpoints(root)
        kept = f"the last complete one, {previous[-1]}, is intact" if previous else "there is no earlier one"
        raise checkpoint.CheckpointError(
            f"could not write checkpoint {root / f'step_{state.step:08d}'} (step {state.step}): "
            f"{type(e).__name__}: {e}. The partial folder was removed and {kept}; free disk space or fix "
            "permissions, then continue with resume=latest"
        ) from e
    accelerator.wait_for_everyone()
    return final


class _RowsByPath:
    """Image path -> its training row (built on first use; a path shared by several rows maps to nothing)."""

    def __init__(self, ds) -> None:
        self.ds = ds
        self._rows: dict[str, int] | None = None

    def __call__(self, path: str) -> int | None:
        if self._rows is None:
            import pyarrow.compute as pc

            paths = pc.struct_field(arrow_column(self.ds, "image"), "path").to_pylist()
            seen: dict[str, int] = {}
            for i, p in enumerate(paths):
                if p:
                    seen[p] = -1 if p in seen else i
            self._rows = {p: i for p, i in seen.items() if i >= 0}
        return self._rows.get(path)


def _exclude_bad_rows(accelerator, sampler: PKBatchSampler, state: TrainState, rows_of: _RowsByPath) -> None:
    """Stop sampling the rows whose files failed to decode (from the next epoch on; one process only: with
    several, each sees other failures and the samplers must stay identical, so the skip policy alone applies)."""
    if accelerator.num_processes > 1 or not state.bad_images:
        return
    rows = {r for path, _ in state.bad_images if (r := rows_of(path)) is not None} - set(state.excluded)
    if not rows:
        return
    try:
        sampler.exclude(sorted(rows))
    except ValueError as e:
        logger.warning(
            "cannot stop sampling %d unusable file(s): %s; they stay skipped batch by batch", len(rows), e
        )
        return
    state.excluded = sampler.excluded
    logger.info("%d unusable file(s) will not be sampled again", len(rows))


def _write_bad_images(accelerator, state: TrainState, out: Path) -> None:
    if not (state.bad_images and accelerator.is_main_process):
        return
    try:
        with (out / "bad_images.tsv").open("w") as f:
            f.write("path\treason\n")
            seen = set()
            for path, reason in state.bad_images:
                if path not in seen:
                    seen.add(path)
                    f.write(f"{_tsv(path)}\t{_tsv(reason)}\n")
    except OSError as e:  # never hide the error that ended the run (e.g. a full disk) behind this one
        logger.warning("could not write %s: %s", out / "bad_images.tsv", e)


def _tsv(text: str) -> str:
    return " ".join(str(text).split("\t")).replace("\n", " ")


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

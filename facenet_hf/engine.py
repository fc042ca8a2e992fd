"""The training loop: P x K batches -> FaceNet -> mined triplet loss, under ``accelerate``.

``train(cfg)`` builds everything from a :class:`~facenet_hf.config.Config`, trains, evaluates on the held-out
LFW folds, and writes into ``cfg.output_dir``:

- ``config.yaml``: the resolved config; ``metrics.jsonl``: one JSON line per log step and evaluation;
- ``checkpoints/step_N/``: ``accelerator.save_state`` + manifest (atomic, verified on resume);
- ``model/``: the final model (``save_pretrained``: safetensors + config.json with the threshold);
- ``eval/``: the LFW report (JSON) and its ROC / distance plots; ``bad_images.tsv`` if any file was skipped.
"""

from __future__ import annotations

import json
import logging
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
from facenet_hf.config import Config, config_to_dict, save_config
from facenet_hf.data.lfw import LFWPairs, check_disjoint, identity_disjoint_split, read_pairs
from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import labels_of, load_source
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
    elapsed: float = 0.0  # training seconds (evaluation excluded)
    images: int = 0  # training images seen, all processes together
    skipped_nonfinite: int = 0
    bad_images: list = field(default_factory=list)  # [path, reason] of files skipped so far

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
    return model


def build_data(cfg: Config):
    """Training dataset (identity-disjoint from the evaluation pairs) and the evaluation pairs (or None)."""
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
    return ds, pairs


def _check_output_dir(cfg: Config) -> Path:
    out = Path(cfg.output_dir)
    if (out / "config.yaml").exists() and not cfg.resume and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds a run; pass resume=latest to continue it, overwrite=true to replace it, "
            "or choose another output_dir"
        )
    return out


def train(cfg: Config, *, progress: bool = True) -> TrainResult:
    """Train a FaceNet as ``cfg`` says; see the module docstring for what is written where."""
    t = cfg.train
    out = _check_output_dir(cfg)
    accelerator = Accelerator(
        mixed_precision=t.mixed_precision,
        gradient_accumulation_steps=t.grad_accum,
        log_with=_trackers(),
        project_dir=str(out),
    )
    try:
        return _train(cfg, accelerator, out, progress)
    finally:
        _release(accelerator)


def _train(cfg: Config, accelerator: Accelerator, out: Path, progress: bool) -> TrainResult:
    t = cfg.train
    set_seed(t.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    accelerator.wait_for_everyone()

    train_ds, eval_pairs = build_data(cfg)
    sampler = PKBatchSampler(
        labels_of(train_ds),
        cfg.data.p,
        cfg.data.k,
        seed=t.seed,
        replacement=cfg.data.replacement,
        min_images=cfg.data.min_images,
    )
    model = build_model(cfg)
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
        persistent_workers=cfg.data.num_workers > 0,
        generator=torch.Generator().manual_seed(t.seed),  # keeps the global RNG out of the data order
    )
    optimizer = build_optimizer(model, t)
    loss_fn = TripletLoss(margin=cfg.loss.margin, mining=cfg.loss.mining, squared=cfg.loss.squared)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    steps_per_epoch = max(1, len(loader) // t.grad_accum)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    ckpt_root = out / "checkpoints"
    if cfg.resume:
        path = checkpoint.resolve(cfg.resume, ckpt_root)
        accelerator.load_state(str(path))
        logger.info("resumed from %s at step %d (epoch %d)", path, state.step, state.epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers("facenet_hf", config=_flat(config_to_dict(cfg)))
    metrics_file = out / "metrics.jsonl"

    report = None
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc="training",
        disable=not (progress and accelerator.is_main_process),
    )
    stop = state.step >= total_steps
    try:
        while not stop:
            # accelerate's loader re-sets the sampler's epoch from its own counter (1 process) and does not call
            # it at all (> 1 process): set both, then skip what a resumed run already consumed.
            loader.set_epoch(state.epoch)
            sampler.set_epoch(state.epoch)
            sampler.skip(state.batches_in_epoch * accelerator.num_processes)
            t0 = time.perf_counter()
            for batch in loader:
                state.batches_in_epoch += 1
                stats = _train_step(batch, model, optimizer, loss_fn, accelerator, cfg, state, total_steps)
                if not accelerator.sync_gradients:
                    continue
                now = time.perf_counter()
                state.elapsed += now - t0
                t0 = now
                state.step += 1
                bar.update(1)
                if state.step % t.log_every == 0:
                    _log(accelerator, state, stats, optimizer, metrics_file, bar)
                    stop = _should_stop(accelerator, state, cfg)
                if t.checkpoint_every_steps and state.step % t.checkpoint_every_steps == 0:
                    save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
                if state.step >= total_steps:
                    stop = True
                if stop:
                    break
            else:
                state.epoch += 1
                state.batches_in_epoch = 0
                save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
                if (
                    eval_pairs is not None
                    and t.eval_every_epochs
                    and state.epoch % t.eval_every_epochs == 0
                    and not stop
                ):
                    report = _evaluate(accelerator, model, cfg, eval_pairs, state, metrics_file, write=False)
    except KeyboardInterrupt:
        logger.warning("interrupted: saving a checkpoint at step %d before exiting", state.step)
        save_checkpoint(accelerator, state, ckpt_root, t.keep_checkpoints)
        raise
    finally:
        bar.close()
        _write_bad_images(accelerator, state, out)

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
    with accelerator.accumulate(model):
        emb = model(x)
        if cfg.loss.global_mining and accelerator.num_processes > 1:
            emb, labels, valid = _gather_with_local_grad(accelerator, emb, labels, valid)
        loss, stats = loss_fn(emb[valid], labels[valid])
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
            optimizer.zero_grad(set_to_none=True)
            stats["loss"] = loss.detach()
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
    stats["loss"] = loss.detach()
    return stats


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
    values = {k: float(v) for k, v in stats.items()}
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
    """``save_state`` into a temporary folder, then verify-and-rename it (main process), then prune."""
    tmp = checkpoint.tmp_dir_for(root, state.step)
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    final = None
    if accelerator.is_main_process:
        final = checkpoint.finalize(tmp, state.step)
        checkpoint.prune(root, keep)
    accelerator.wait_for_everyone()
    return final


def _write_bad_images(accelerator, state: TrainState, out: Path) -> None:
    if state.bad_images and accelerator.is_main_process:
        with (out / "bad_images.tsv").open("w") as f:
            f.write("path\treason\n")
            seen = set()
            for path, reason in state.bad_images:
                if path not in seen:
                    seen.add(path)
                    f.write(f"{path}\t{reason}\n")


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

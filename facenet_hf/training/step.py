"""One optimizer step (forward, mining, backward, clipping, the learning-rate schedule, the non-finite-loss
policy) and the per-step decisions that every process must take together."""

from __future__ import annotations

import logging

import torch

from facenet_hf.config import Config
from facenet_hf.losses import TripletLoss
from facenet_hf.training.distributed import any_process
from facenet_hf.training.optim import lr_factor, set_lr
from facenet_hf.training.state import TrainState

__all__ = ["NonFiniteLossError", "should_stop", "train_step", "trained_loss_parameters"]

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A NaN/Inf loss with ``train.nonfinite_loss=error``."""


def train_step(
    batch, model, optimizer, loss_fn, accelerator, cfg, state, total_steps
) -> dict[str, torch.Tensor]:
    """One micro-batch: forward, mining + loss, backward; on the micro-step that syncs, the LR for
    ``state.step``, clipping and ``optimizer.step()``. A non-finite loss is skipped on every process (weights and
    BatchNorm statistics unchanged) or raises :class:`NonFiniteLossError`. Returns the detached loss stats."""
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
    trained = trained_loss_parameters(loss_fn)
    # a loss with parameters (a margin-softmax classifier) is prepared like the model: DDP skips its all-reduce too
    with accelerator.accumulate(model, loss_fn) if trained else accelerator.accumulate(model):
        emb = model(x)
        hard = _schedule_mining(accelerator, loss_fn, cfg, state, total_steps)
        kwargs = {}
        if cfg.loss.global_mining and accelerator.num_processes > 1:
            emb, labels, valid, local = _gather_with_local_grad(accelerator, emb, labels, valid)
            if getattr(_unwrap(accelerator, loss_fn), "accepts_local_rows", False):
                kwargs["local"] = local[valid]
        loss, stats = loss_fn(emb[valid], labels[valid], **kwargs)
        stats["loss"] = loss.detach()  # logged as computed (before the scaling below)
        if hard is not None:
            stats["mining_after"] = torch.tensor(float(hard))  # 1.0 once loss.mining_after is in use
        if cfg.loss.global_mining and accelerator.num_processes > 1:
            loss = loss * accelerator.num_processes  # DDP averages: this makes the sum the global gradient
        if any_process(accelerator, ~torch.isfinite(loss.detach())):
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
            if t.grad_clip:  # the model's and the loss's parameters together; unscales fp16 grads first
                accelerator.clip_grad_norm_([*model.parameters(), *trained], t.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    state.images += x.shape[0] * accelerator.num_processes
    return stats


def trained_loss_parameters(loss_fn) -> list[torch.nn.Parameter]:
    """The parameters of ``loss_fn`` that train (a margin-softmax classifier's weights); [] for a plain loss."""
    if not isinstance(loss_fn, torch.nn.Module):
        return []
    return [p for p in loss_fn.parameters() if p.requires_grad]


def _unwrap(accelerator, module):
    return accelerator.unwrap_model(module) if isinstance(module, torch.nn.Module) else module


def _gather_with_local_grad(accelerator, emb, labels, valid):
    """All processes' embeddings (others' without gradient, ours with it), labels, masks, and which rows are ours."""
    all_emb = accelerator.gather(emb.detach())
    b, r = emb.shape[0], accelerator.process_index
    all_emb = torch.cat([all_emb[: r * b], emb, all_emb[(r + 1) * b :]])
    local = torch.zeros(all_emb.shape[0], dtype=torch.bool, device=emb.device)
    local[r * b : (r + 1) * b] = True
    return all_emb, accelerator.gather(labels), accelerator.gather(valid), local


def _schedule_mining(accelerator, loss_fn, cfg: Config, state: TrainState, total_steps: int) -> bool | None:
    """Apply ``loss.mining_switch_at``: set the triplet loss's mining for this step (``loss.mining`` before the
    switch, ``loss.mining_after`` from it). Returns whether the later mode is in use, or None without a schedule
    (or without a TripletLoss to schedule, e.g. a custom loss)."""
    lc = cfg.loss
    if lc.mining_switch_at is None:  # the common case: nothing to unwrap or set on the hot path
        return None
    loss_fn = _unwrap(accelerator, loss_fn)
    triplet = loss_fn if isinstance(loss_fn, TripletLoss) else getattr(loss_fn, "triplet", None)
    if not isinstance(triplet, TripletLoss):
        return None
    hard = _progress(state, cfg, total_steps) >= lc.mining_switch_at
    triplet.mining = lc.mining_after if hard else lc.mining
    return hard


def _progress(state: TrainState, cfg: Config, total_steps: int) -> float:
    t = cfg.train
    span = max(1, total_steps - t.warmup_steps)
    p = (state.step - t.warmup_steps) / span
    if t.time_budget_minutes:
        p = max(p, state.elapsed / (60 * t.time_budget_minutes))
    return p


def should_stop(accelerator, state: TrainState, cfg: Config) -> bool:
    """Time budget reached (on any process, so every process stops at the same step)."""
    if not cfg.train.time_budget_minutes:
        return False
    return any_process(accelerator, state.elapsed >= 60 * cfg.train.time_budget_minutes)

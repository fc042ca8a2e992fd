"""What a run reports: the per-step metrics line, the evaluations during and after training, and the published
model folder (model card, optional push)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from facenet_hf.config import Config, config_to_dict
from facenet_hf.evaluation.lfw_eval import evaluate_lfw, write_report
from facenet_hf.training.distributed import hardware_description
from facenet_hf.training.state import TrainState

__all__ = ["evaluate_run", "flat_config", "log_step", "publish_model", "trackers"]

logger = logging.getLogger(__name__)


def log_step(accelerator, state, stats, optimizer, metrics_file: Path, bar) -> None:
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


def evaluate_run(accelerator, model, cfg, pairs, state, metrics_file: Path, *, write: bool) -> dict[str, Any]:
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


def publish_model(cfg: Config, model_dir: Path, report, state: TrainState, accelerator) -> None:
    """Model card (with the evaluation and the resolved config) and, if asked, the push to the Hub."""
    from facenet_hf.evaluation.verification import report_to_json
    from facenet_hf.hub import push_model, write_model_card

    roc = Path(cfg.output_dir) / "eval" / "lfw_roc.png"
    info = {
        "hardware": hardware_description(accelerator),
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


def trackers() -> list[str] | None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return None
    return ["tensorboard"]


def flat_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_config(v, f"{key}/"))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[key] = "none" if v is None else v
        else:
            out[key] = json.dumps(v)
    return out

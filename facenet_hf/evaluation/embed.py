"""Batched embedding of image files with a FaceNet model, optional flip test-time augmentation."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import datasets
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from facenet_hf.data.transforms import BatchTransform, collate_batch
from facenet_hf.data.workers import DEFAULT_WORKER_NICE, LowPriorityWorkers
from facenet_hf.model.inference import flip_embed, is_channels_last, model_transform

__all__ = ["embed_files"]


@torch.inference_mode()
def embed_files(
    model: nn.Module,
    files: Sequence[str],
    *,
    transform: Callable | None = None,
    batch_size: int = 128,
    flip: str = "off",
    num_workers: int = 0,
    worker_nice: int = DEFAULT_WORKER_NICE,
    accelerator=None,
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    """Embed image files in order; returns float32 ``[len(files), D]`` (D doubles with ``flip='concat'``).

    With an ``accelerator`` the files are split across processes and gathered back without duplicates
    (``gather_for_metrics``); every process gets the full array.
    """
    net = accelerator.unwrap_model(model) if accelerator else model
    transform = transform or model_transform(net)
    ds = datasets.Dataset.from_dict({"image": list(files), "label": [0] * len(files)})
    ds = ds.cast_column("image", datasets.Image(decode=False))
    ds = ds.with_transform(
        BatchTransform(transform, bad_image_policy="error", channels_last=is_channels_last(net))
    )
    loader = DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_batch,
        worker_init_fn=LowPriorityWorkers(worker_nice),
    )
    was_training = model.training
    model.eval()
    if accelerator is not None:
        loader = accelerator.prepare(loader)
        device = accelerator.device
    else:
        device = next(model.parameters()).device
    show = progress and (accelerator is None or accelerator.is_main_process)
    out = []
    for batch in tqdm(loader, desc=desc, disable=not show, leave=False):
        x = batch["pixel_values"].to(device, non_blocking=True)
        emb = flip_embed(model, x, flip)
        if accelerator is not None:
            emb = accelerator.gather_for_metrics(emb)
        out.append(emb.cpu())
    model.train(was_training)
    if accelerator is not None and loader in getattr(accelerator, "_dataloaders", []):
        # a one-off loader: keep it out of the accelerator's registry (and so out of save_state/load_state)
        accelerator._dataloaders.remove(loader)
    if not out:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32)

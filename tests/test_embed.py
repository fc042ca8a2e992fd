"""embed_files: order, flip modes, and no leftover loader in the accelerator's checkpointed state."""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from conftest import SAMPLE

from facenet_hf import FaceNet
from facenet_hf.evaluation.embed import embed_files
from facenet_hf.training import reset_accelerate_state


def _files(n: int) -> list[str]:
    return [str(p) for p in sorted((SAMPLE / "lfw-deepfunneled").glob("*/*.jpg"))[:n]]


def test_embedding_order_and_flip_modes():
    torch.manual_seed(0)
    model = FaceNet("resnet18", embedding_dim=16, image_size=32).eval()
    files = _files(6)
    off = embed_files(model, files, batch_size=4, progress=False)
    one_by_one = np.concatenate([embed_files(model, [f], progress=False) for f in files])
    np.testing.assert_allclose(off, one_by_one, atol=1e-5)
    summed = embed_files(model, files, batch_size=4, flip="sum", progress=False)
    concat = embed_files(model, files, batch_size=4, flip="concat", progress=False)
    assert summed.shape == (6, 16) and concat.shape == (6, 32)
    np.testing.assert_allclose(np.linalg.norm(summed, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(concat, axis=1), 1.0, atol=1e-5)


def test_evaluation_loader_does_not_join_the_training_state():
    # a prepared loader left registered would be saved by save_state and break resuming in a fresh process
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(FaceNet("resnet18", embedding_dim=16, image_size=32))
    before = len(accelerator._dataloaders)
    for _ in range(2):
        emb = embed_files(model, _files(8), batch_size=4, progress=False, accelerator=accelerator)
    assert emb.shape == (8, 16) and len(accelerator._dataloaders) == before
    reset_accelerate_state(accelerator)  # let later tests build accelerators with other precisions

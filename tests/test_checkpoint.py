"""Checkpoint folders: atomic finalize, manifest verification naming the bad file, latest falls back."""

from __future__ import annotations

import pytest

from facenet_hf.training import checkpoint
from facenet_hf.training.checkpoint import CheckpointError


def _make(root, step, payload=b"x" * 100):
    tmp = checkpoint.tmp_dir_for(root, step)
    tmp.mkdir(parents=True)
    (tmp / "model.safetensors").write_bytes(payload)
    (tmp / "sub").mkdir()
    (tmp / "sub" / "rng.pkl").write_bytes(b"rng")
    return checkpoint.finalize(tmp, step)


def test_finalize_and_verify(tmp_path):
    path = _make(tmp_path, 5)
    assert path.name == "step_00000005" and not list(tmp_path.glob(".tmp-*"))
    manifest = checkpoint.verify(path)
    assert set(manifest["files"]) == {"model.safetensors", "sub/rng.pkl"}


def test_half_written_checkpoint_is_never_latest(tmp_path):
    _make(tmp_path, 1)
    half = checkpoint.tmp_dir_for(tmp_path, 2)
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    assert checkpoint.resolve("latest", tmp_path).name == "step_00000001"


def test_truncated_file_is_named_and_latest_falls_back(tmp_path):
    _make(tmp_path, 1)
    bad = _make(tmp_path, 2)
    (bad / "model.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(
        CheckpointError, match=r"step_00000002: file model.safetensors has 10 bytes, expected 100"
    ):
        checkpoint.verify(bad)
    with pytest.raises(CheckpointError, match="model.safetensors has 10 bytes"):
        checkpoint.resolve(str(bad), tmp_path)
    assert checkpoint.resolve("latest", tmp_path).name == "step_00000001"


def test_corrupted_bytes_same_size(tmp_path):
    path = _make(tmp_path, 3)
    (path / "model.safetensors").write_bytes(b"y" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors is corrupted"):
        checkpoint.verify(path)


def test_missing_manifest_and_no_checkpoint(tmp_path):
    (tmp_path / "step_00000009").mkdir()
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        checkpoint.resolve("latest", tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint under"):
        checkpoint.resolve("latest", tmp_path / "nothing")


def test_prune_keeps_newest(tmp_path):
    for s in (1, 2, 3, 4):
        _make(tmp_path, s)
    checkpoint.tmp_dir_for(tmp_path, 5).mkdir()
    checkpoint.prune(tmp_path, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert not list(tmp_path.glob(".tmp-*"))

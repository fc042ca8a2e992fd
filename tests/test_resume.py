"""A run that survives being killed: SIGKILL mid-epoch, resume=latest, the same losses step for step.

Also: corrupted checkpoints through the real entry point (a truncated file is refused by name; latest falls back
to the previous complete checkpoint; a half-written ``.tmp-step_*`` folder is never picked), metrics.jsonl cut
back to the checkpoint on resume, and the resume positions in accelerate's one-process loader.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE, load_recipe, tiny_train_args
from safetensors.torch import load_file

from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.training import checkpoint
from facenet_hf.training.checkpoint import CheckpointError

HANG = ROOT / "tests" / "train_and_hang.py"
STEPS_PER_EPOCH = 32  # the sample's 259 usable training images // (p=4 x k=2)
MAX_STEPS = 40  # into the second epoch
DETERMINISTIC = ("loss", "frac_active", "mean_pos_dist", "mean_neg_dist", "num_triplets", "lr", "epoch")


def _args(out: Path, *extra: str) -> list[str]:
    return tiny_train_args(
        SAMPLE,
        out,
        "--model.backbone=test_resnet",
        f"--train.max_steps={MAX_STEPS}",
        "--train.checkpoint_every_steps=2",
        *extra,
    )


def _start(hang: int, args: list[str], log: Path) -> subprocess.Popen:
    """``train_and_hang.py HANG ARGS`` in a subprocess; its output goes to ``log`` (no pipe to fill up)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        env.pop(key, None)
    with log.open("w") as f:
        proc = subprocess.Popen(
            [sys.executable, str(HANG), str(hang), *args],
            cwd=ROOT,
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    proc.log = log  # type: ignore[attr-defined]
    return proc


def _tail(proc: subprocess.Popen) -> str:
    return proc.log.read_text()[-6000:]  # type: ignore[attr-defined]


def _finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    proc.wait(timeout=timeout)
    assert proc.returncode == 0, _tail(proc)


def _kill_when_hanging(proc: subprocess.Popen, out: Path, timeout: float = 600) -> None:
    """Wait until the run hangs inside a step (after its checkpoints and metrics), then SIGKILL it."""
    marker = out / "HANGING"
    deadline = time.monotonic() + timeout
    try:
        while not marker.is_file():
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before it was killed:\n{_tail(proc)}")
            assert time.monotonic() < deadline, "the run did not reach the step to be killed at"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    marker.unlink()


def _train_state(ckpt: Path) -> dict:
    return torch.load(ckpt / "custom_checkpoint_0.pkl", weights_only=False)


def _train_lines(out: Path) -> list[dict]:
    return [x for x in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in x]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_same_losses(tmp_path):
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "killed"
    reference = _start(0, _args(ref_dir), tmp_path / "reference.log")  # uninterrupted, alongside
    try:
        _kill_and_resume(run_dir, tmp_path)
        _finish(reference)
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    got, want = _train_lines(run_dir), _train_lines(ref_dir)
    assert [x["step"] for x in got] == list(range(1, MAX_STEPS + 1))  # cut back to the checkpoint on resume
    assert [x["step"] for x in want] == list(range(1, MAX_STEPS + 1))
    assert [x["epoch"] for x in got][STEPS_PER_EPOCH - 1 : STEPS_PER_EPOCH + 1] == [0, 1]
    for g, w in zip(got, want, strict=True):
        for key in DETERMINISTIC:
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-6), (g["step"], key, g[key], w[key])
    final, expected = (
        load_file(run_dir / "model" / "model.safetensors"),
        load_file(ref_dir / "model" / "model.safetensors"),
    )
    assert final.keys() == expected.keys()
    for name in final:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-6, atol=1e-6)


def _kill_and_resume(run_dir: Path, tmp: Path) -> None:
    """Killed in epoch 0 and again in epoch 1, each time resumed with resume=latest; then run to the end."""
    # 1. killed in epoch 0, inside step 6; the last checkpoint is step 4 (mid-epoch)
    _kill_when_hanging(_start(5, _args(run_dir), tmp / "killed-1.log"), run_dir)
    latest = checkpoint.resolve("latest", run_dir / "checkpoints")
    assert latest.name == "step_00000004"
    assert {k: _train_state(latest)[k] for k in ("step", "epoch", "batches_in_epoch")} == {
        "step": 4,
        "epoch": 0,
        "batches_in_epoch": 4,
    }
    assert [x["step"] for x in _train_lines(run_dir)] == [1, 2, 3, 4, 5]  # step 5 is past the checkpoint
    # 2. resumed, killed again in epoch 1 (inside step 38; checkpoint 36), so resume also starts mid-epoch 1
    _kill_when_hanging(_start(37, [*_args(run_dir), "--resume=latest"], tmp / "killed-2.log"), run_dir)
    latest = checkpoint.resolve("latest", run_dir / "checkpoints")
    state = _train_state(latest)
    assert (latest.name, state["epoch"], state["batches_in_epoch"]) == ("step_00000036", 1, 4)
    # 3. resumed to the end
    _finish(_start(0, [*_args(run_dir), "--resume=latest"], tmp / "resumed.log"))


@pytest.mark.slow
def test_corrupted_latest_is_refused_by_path_and_skipped_by_latest(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="facenet_hf")
    recipe = load_recipe("train_r18_lfw")
    out = tmp_path / "run"
    args = tiny_train_args(
        SAMPLE,
        out,
        "--model.backbone=test_resnet",
        "--train.max_steps=3",
        "--train.checkpoint_every_steps=1",
        "--train.keep_checkpoints=5",
    )
    assert recipe.main(args) == 0
    first = _train_lines(out)
    root = out / "checkpoints"
    assert [p.name for p in checkpoint.list_checkpoints(root)] == [f"step_{s:08d}" for s in (1, 2, 3)]
    # the newest checkpoint loses the end of its weights file
    weights = root / "step_00000003" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    # a checkpoint whose rename never happened, even with a manifest, is not a checkpoint
    half = checkpoint.tmp_dir_for(root, 9)
    half.mkdir()
    (half / "model.safetensors").write_bytes(data)
    (half / checkpoint.MANIFEST).write_text(json.dumps({"step": 9, "files": {}}))

    with pytest.raises(
        CheckpointError, match=r"step_00000003: file model.safetensors has \d+ bytes, expected"
    ):
        recipe.main([*args, f"--resume={root / 'step_00000003'}", "--train.max_steps=5"])

    caplog.clear()
    assert recipe.main([*args, "--resume=latest", "--train.max_steps=5"]) == 0
    text = caplog.text
    assert "skipping checkpoint" in text and "step_00000003: file model.safetensors" in text
    assert f"resumed from {root / 'step_00000002'} at step 2" in text
    lines = _train_lines(out)
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]  # the old step 3 line is gone, the new one is there
    for old, new in zip(first, lines[:3], strict=True):  # resumed at 2: step 3 is computed again, identically
        assert new["loss"] == pytest.approx(old["loss"], rel=1e-6, abs=1e-7)
    assert not half.exists()  # pruned
    assert [p.name for p in checkpoint.list_checkpoints(root)][-1] == "step_00000005"
    checkpoint.verify(root / "step_00000003")  # rewritten whole by the resumed run


def test_resume_positions_with_accelerates_one_process_loader():
    """loader.set_epoch + sampler.set_epoch + skip: the prepared loader (one-batch look-ahead) resumes exactly."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from facenet_hf.training import reset_accelerate_state

    class Index(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 120

        def __getitem__(self, i: int) -> int:
            return i

    labels = np.repeat(np.arange(30), 4)
    accelerator = Accelerator(cpu=True)
    try:
        for epoch, consumed in ((0, 0), (0, 5), (1, 3), (2, 15)):
            sampler = PKBatchSampler(labels, 4, 2, seed=5)
            loader = accelerator.prepare(DataLoader(Index(), batch_sampler=sampler))
            loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            sampler.skip(consumed * accelerator.num_processes)
            got = [b.tolist() for b in loader]
            assert got == sampler.epoch_batches(epoch)[consumed:].tolist()
            # and the next epoch follows on its own
            loader.set_epoch(epoch + 1)
            sampler.set_epoch(epoch + 1)
            sampler.skip(0)
            assert [b.tolist() for b in loader] == sampler.epoch_batches(epoch + 1).tolist()
    finally:
        reset_accelerate_state(accelerator)


@pytest.mark.parametrize(
    ("saved_by", "consumed", "resumed_on", "expected"),
    [(2, 5, 1, 10), (2, 5, 4, 2), (2, 5, 2, 5), (0, 5, 4, 5), (8, 0, 2, 0), (1, 7, 2, 3)],
)
def test_resume_with_another_number_of_processes_keeps_the_sampler_position(
    saved_by, consumed, resumed_on, expected
):
    from facenet_hf.training.state import TrainState
    from facenet_hf.training.state import remap_position as _remap_position

    state = TrainState(batches_in_epoch=consumed, num_processes=saved_by)
    assert _remap_position(state, resumed_on) == expected

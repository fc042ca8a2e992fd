"""Multi-process training on CPU (2 processes, gloo), checked against one process.

The ``@pytest.mark.slow`` tests launch ``tests/dist_worker.py`` in 2 real processes (``torch.distributed.run``,
and once ``accelerate launch``) and compare what each process saw with what one process computes here:

- each process gets whole P x K blocks: process r takes the sampler's batches r, r + 2, ... (BatchSamplerShard),
  ``len(sampler) // 2`` per epoch, and epoch 1's batches are epoch 1's, not epoch 0's again;
- parameters are bit-identical across the processes after every optimizer step; only the main process writes;
- global mining (``_gather_with_local_grad`` + TripletLoss + DDP) gives the loss and the update of one process
  on the concatenated global batch; gradient accumulation all-reduces only on the last micro-step and gives the
  update of the mean loss of all blocks; a NaN on one process makes every process skip the step;
- the 2-process LFW evaluation (``gather_for_metrics``) gives the report of 1 process.

The fast tests check the same step arithmetic in one process, and the resume positions in the sharded sampler.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import dist_worker as dw
import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from conftest import ROOT, SAMPLE, accelerate_launch_cmd, launch_env, tiny_train_args

from facenet_hf.cli.train import parse_train_config, train_parser
from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import arrow_column, labels_of
from facenet_hf.losses import TripletLoss
from facenet_hf.training import reset_accelerate_state
from facenet_hf.training.build import build_data

WORKER = Path(dw.__file__)
LAUNCH_TIMEOUT = 600  # generous: the machine may be shared; a hang still ends


def launch(out: Path, *args: str, launcher: str = "torchrun") -> list[dict]:
    """Run ``dist_worker.py ARGS`` in 2 CPU processes; return each rank's record."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    else:
        cmd = accelerate_launch_cmd(2)
    t0 = time.monotonic()
    proc = subprocess.run(
        [*cmd, str(WORKER), *args],
        cwd=ROOT,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    records = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    records[0]["_wall_s"] = time.monotonic() - t0
    return records


# ------------------------------------------------------------------------------------------ training (slow)

P, K, EPOCHS = 4, 2, 2


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist_train")
    args = tiny_train_args(
        SAMPLE,
        tmp / "run",
        "--model.backbone=test_resnet",
        f"--data.p={P}",
        f"--data.k={K}",
        f"--train.epochs={EPOCHS}",
        "--train.max_steps=null",
        "--train.eval_every_epochs=1",
        "--loss.global_mining=true",  # the multi-GPU preset's setting: mining over both processes' blocks
    )
    records = launch(tmp / "records", "train", str(tmp / "records"), *args)
    cfg, _ = parse_train_config(args, train_parser())
    train_ds, _ = build_data(cfg)
    sampler = PKBatchSampler(labels_of(train_ds), P, K, seed=cfg.train.seed, min_images=cfg.data.min_images)
    image_paths = pc.struct_field(arrow_column(train_ds, "image"), "path").to_pylist()
    return records, sampler, image_paths, tmp / "run"


@pytest.mark.slow
def test_each_process_gets_whole_pk_blocks_of_the_shared_sequence(two_process_run):
    records, sampler, paths, _ = two_process_run
    assert [r["num_processes"] for r in records] == [2, 2]  # not two independent 1-process runs
    per_epoch = len(sampler) // 2
    for rank, record in enumerate(records):
        calls = record["calls"]
        assert len(calls) == EPOCHS * per_epoch
        for call in calls:
            labels = np.asarray(call["labels"]).reshape(P, K)
            assert (labels == labels[:, :1]).all() and len(set(labels[:, 0].tolist())) == P
            # process r's j-th batch of epoch e is the sampler's batch 2 j + r of epoch e
            expected = sampler.epoch_batches(call["epoch"])[2 * (call["batch_in_epoch"] - 1) + rank]
            assert call["paths"] == [paths[i] for i in expected]
        assert [c["batch_in_epoch"] for c in calls] == list(range(1, per_epoch + 1)) * EPOCHS
    for a, b in zip(records[0]["calls"], records[1]["calls"], strict=True):
        assert a["epoch"] == b["epoch"] and a["paths"] != b["paths"]


@pytest.mark.slow
def test_epochs_differ_with_two_processes(two_process_run):
    records, *_ = two_process_run
    for record in records:
        by_epoch = [[c["paths"] for c in record["calls"] if c["epoch"] == e] for e in range(EPOCHS)]
        assert by_epoch[0] != by_epoch[1]
        assert not set(map(tuple, by_epoch[0])) & set(map(tuple, by_epoch[1]))


@pytest.mark.slow
def test_parameters_identical_across_processes_after_every_step(two_process_run):
    records, *_ = two_process_run
    hashes = [[c["param_hash"] for c in r["calls"]] for r in records]
    assert hashes[0] == hashes[1]
    assert len(set(hashes[0])) == len(hashes[0])  # and they do change every step


@pytest.mark.slow
def test_only_the_main_process_writes(two_process_run):
    records, sampler, _, run = two_process_run
    # rank 1 writes nothing of the run: at most the start-up probe that the output folder is writable (removed at
    # once) and its own RNG state inside a checkpoint (accelerate's save_state keeps one file per process)
    allowed = (r"\.write-test-\d+", r"checkpoints/\.tmp-step_\d+/random_states_1\.pkl")
    other = records[1]["writes"]
    assert all(any(re.fullmatch(a, w) for a in allowed) for w in other), other
    main = set(records[0]["writes"])
    assert {"config.yaml", "metrics.jsonl", "eval/lfw_report.json", "model/config.json"} <= main
    assert any(re.fullmatch(r"checkpoints/step_\d+", w) for w in main)  # the verified rename
    assert not any("random_states_1" in w for w in main)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in lines if "loss" in x]
    assert steps == list(range(1, EPOCHS * (len(sampler) // 2) + 1))  # once each: not once per process
    assert sum("eval" in x for x in lines) == 2  # epoch 1 and the end
    assert (run / "eval" / "lfw_report.json").is_file() and (run / "model" / "model.safetensors").is_file()


# ------------------------------------------------------------------------- step arithmetic (slow + fast)


def _reference_update(blocks_x: torch.Tensor, blocks_labels: torch.Tensor, *, pooled: bool):
    """One process: SGD(lr=1) update and loss for the blocks ``[n, B, D]``.

    ``pooled``: one loss over all blocks concatenated (global mining); else the mean of the per-block losses.
    """
    model = dw.step_model()
    loss_fn = TripletLoss(mining="batch_hard")
    if pooled:
        loss, _ = loss_fn(model(blocks_x.reshape(-1, dw.STEP_DIM)), blocks_labels.reshape(-1))
    else:
        losses = [loss_fn(model(x), y)[0] for x, y in zip(blocks_x, blocks_labels, strict=True)]
        loss = torch.stack(losses).mean()
    loss.backward()
    after = [(p - p.grad).detach() for p in model.parameters()]
    return float(loss.detach()), after


def _check_after(record: dict, expected: list[torch.Tensor]) -> None:
    for got, want in zip(record["after"], expected, strict=True):
        torch.testing.assert_close(torch.tensor(got), want, rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def step_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_step")
    return launch(out, "step", str(out), launcher="accelerate")


@pytest.mark.slow
def test_global_mining_two_processes_equals_one_process_on_the_global_batch(step_records):
    x, labels = dw.step_data(world=2, micro=1)
    loss, after = _reference_update(x[0], labels[0], pooled=True)
    for record in step_records:
        g = record["global"]
        assert g["world"] == 2 and g["micro"][0]["sync"]
        assert g["micro"][0]["loss"] == pytest.approx(loss, rel=1e-6)  # the global loss, not x world size
        _check_after(g, after)
    # and it is not what per-process mining would give
    _, local = _reference_update(x[0], labels[0], pooled=False)
    assert not all(
        torch.allclose(torch.tensor(a), b)
        for a, b in zip(step_records[0]["global"]["after"], local, strict=True)
    )


@pytest.mark.slow
def test_grad_accumulation_syncs_on_the_last_micro_step_only(step_records):
    x, labels = dw.step_data(world=2, micro=2)
    _, after = _reference_update(x.reshape(4, *x.shape[2:]), labels.reshape(4, -1), pooled=False)
    for record in step_records:
        a = record["accum"]
        assert [m["sync"] for m in a["micro"]] == [False, True]
        assert a["micro"][0]["allreduces"] == 0 and a["micro"][1]["allreduces"] >= 1
        _check_after(a, after)  # mean over 2 processes x 2 micro-batches of the per-block losses
        # a NaN on one process only: both skip, nothing changes, both count it
        assert a["nan_unchanged"] and a["skipped_nonfinite"] == 1


@pytest.mark.parametrize("kind", ["global", "accum"])
def test_step_arithmetic_in_one_process(kind):
    record, accelerator = dw._one_step_check(kind)
    reset_accelerate_state(accelerator)
    micro = 2 if kind == "accum" else 1
    x, labels = dw.step_data(world=1, micro=micro)
    _, after = _reference_update(x.reshape(micro, *x.shape[2:]), labels.reshape(micro, -1), pooled=False)
    assert [m["sync"] for m in record["micro"]] == [False] * (micro - 1) + [True]
    _check_after(record, after)
    if kind == "accum":
        assert record["nan_unchanged"] and record["skipped_nonfinite"] == 1


# -------------------------------------------------------------------------------------- evaluation (slow)


@pytest.mark.slow
def test_two_process_evaluation_equals_one_process(tmp_path):
    from facenet_hf.evaluation.lfw_eval import evaluate_lfw

    records = launch(tmp_path, "eval", str(tmp_path))
    report, distances = evaluate_lfw(
        dw.eval_model(),
        SAMPLE / "lfw-deepfunneled",
        dw.eval_pairs(),
        flip="sum",
        batch_size=dw.EVAL_BATCH,
        progress=False,
    )
    assert report["n_images"] % (2 * dw.EVAL_BATCH) != 0  # the shards are padded: duplicates must be dropped
    for record in records:
        assert record["world"] == 2 and record["n_images"] == report["n_images"]
        assert record["accuracy_mean"] == report["accuracy_mean"] and record["auc"] == report["auc"]
        assert record["threshold"] == pytest.approx(report["threshold"], abs=1e-5)
        np.testing.assert_allclose(record["distances"], distances, atol=1e-5)


# ----------------------------------------------------------------------- resume positions in the shards


@pytest.mark.parametrize("epoch", [0, 1])
def test_sharded_sampler_resumes_at_n_times_the_consumed_batches(epoch):
    """The engine's resume arithmetic against accelerate's BatchSamplerShard: ``skip(consumed x N)``."""
    from accelerate.data_loader import BatchSamplerShard

    labels = np.repeat(np.arange(30), 4)
    full = PKBatchSampler(labels, 4, 2, seed=3).epoch_batches(epoch)
    for rank in range(2):
        for consumed in (0, 3, len(full) // 2):
            sampler = PKBatchSampler(labels, 4, 2, seed=3)
            sampler.set_epoch(epoch)
            sampler.skip(consumed * 2)
            got = list(BatchSamplerShard(sampler, num_processes=2, process_index=rank))
            want = full[2 * consumed + rank :: 2][: len(full) // 2 - consumed]
            assert got == [b.tolist() for b in want]

"""Shared fixtures: the bundled LFW sample, recipe loading, the full LFW when FACENET_HF_LFW_DIR is set."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "lfw_sample"


def load_recipe(name: str):
    """Import ``recipes/<name>.py`` as a module (recipes are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def lfw_sample() -> Path:
    """The bundled sample: ``lfw-deepfunneled/`` and ``pairs.txt`` (10 folds)."""
    assert (SAMPLE / "pairs.txt").is_file(), "the bundled LFW sample is missing"
    return SAMPLE


@pytest.fixture(scope="session")
def full_lfw() -> Path:
    """The full LFW (folder with ``lfw-deepfunneled/`` and ``pairs.txt``), or skip."""
    root = os.environ.get("FACENET_HF_LFW_DIR")
    if not root or not (Path(root) / "pairs.txt").is_file():
        pytest.skip("FACENET_HF_LFW_DIR is not set to the full LFW folder")
    return Path(root)


def tiny_train_args(sample: Path, out: Path, *extra: str) -> list[str]:
    """Overrides for a training run of a few seconds on the bundled sample."""
    return [
        "--config",
        str(ROOT / "configs" / "demo" / "lfw_sample.yaml"),
        f"--data.lfw_dir={sample / 'lfw-deepfunneled'}",
        f"--data.pairs={sample / 'pairs.txt'}",
        f"--output_dir={out}",
        "--model.image_size=32",
        "--model.embedding_dim=32",
        "--data.p=4",
        "--data.k=2",
        "--data.num_workers=0",
        "--train.max_steps=4",
        "--train.log_every=1",
        "--train.warmup_steps=0",
        "--train.eval_batch_size=64",
        "--train.mixed_precision=no",
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="session")
def full_celeba() -> Path:
    """The CelebA subset (folder with ``img_align_celeba/`` and ``identity_CelebA.txt``), or skip."""
    root = os.environ.get("FACENET_HF_CELEBA_DIR")
    if not root or not (Path(root) / "identity_CelebA.txt").is_file():
        pytest.skip(
            "FACENET_HF_CELEBA_DIR is not set to the CelebA folder (img_align_celeba/, identity_CelebA.txt)"
        )
    return Path(root)


def free_port() -> int:
    """A free TCP port on the loopback interface (for a multi-process run's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env() -> dict[str, str]:
    """The environment of a multi-process CPU run: one OpenMP thread a process, offline, no inherited ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def accelerate_launch_cmd(num_processes: int = 2) -> list[str]:
    """``accelerate launch`` of N CPU processes (gloo). ``--cpu --num_processes N`` starts ONE process in
    accelerate 1.x: ``--multi_gpu`` on a machine without GPUs is the way."""
    return [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]

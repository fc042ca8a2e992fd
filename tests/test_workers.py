"""DataLoader workers at a lower CPU priority (data.worker_nice)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from facenet_hf.config import ConfigError, load_config
from facenet_hf.data.workers import LowPriorityWorkers


class _Niceness(Dataset):
    """Each item is the niceness of the process that produced it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return os.nice(0)


@pytest.mark.parametrize("nice", [0, 7, 19])
def test_workers_run_at_the_asked_niceness(nice):
    parent = os.nice(0)
    loader = DataLoader(_Niceness(), batch_size=2, num_workers=2, worker_init_fn=LowPriorityWorkers(nice))
    seen = torch.cat(list(loader)).tolist()
    assert seen == [min(parent + nice, 19)] * 4
    assert os.nice(0) == parent  # the training process itself is untouched


def test_picklable_for_spawned_workers():
    assert pickle.loads(pickle.dumps(LowPriorityWorkers(5))).nice == 5


@pytest.mark.parametrize("bad", [-1, 20, 2.5, True, "19"])
def test_bad_niceness_is_refused(bad):
    with pytest.raises(ValueError, match="worker_nice"):
        LowPriorityWorkers(bad)


@pytest.mark.parametrize("bad", [-1, 20])
def test_config_range(tmp_path, bad):
    with pytest.raises(ConfigError, match=r"data\.worker_nice"):
        load_config(None, [f"data.lfw_dir={tmp_path}", f"data.worker_nice={bad}"])

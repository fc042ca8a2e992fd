"""DataLoader worker set-up: workers at a lower CPU priority than the process that trains or embeds."""

from __future__ import annotations

import os

from facenet_hf.constants import DEFAULT_WORKER_NICE, check_worker_nice

__all__ = ["DEFAULT_WORKER_NICE", "LowPriorityWorkers", "check_worker_nice"]


class LowPriorityWorkers:
    """DataLoader ``worker_init_fn`` raising each worker's niceness by ``nice`` (0 = leave it).

    When the model already uses every core (CPU training, or embedding on CPU), workers at the same priority
    preempt its OpenMP threads, and a parallel region waits for its slowest thread, so every preemption stalls
    the whole step. At a low priority the workers run on the cycles the model leaves idle, and still get the CPU
    whenever the model waits for them. Measured on 2 cores: docs/benchmarks.md, section 2.
    """

    def __init__(self, nice: int = DEFAULT_WORKER_NICE) -> None:
        self.nice = check_worker_nice(nice)

    def __call__(self, worker_id: int) -> None:
        if self.nice:
            os.nice(self.nice)

    def __repr__(self) -> str:
        return f"LowPriorityWorkers(nice={self.nice})"

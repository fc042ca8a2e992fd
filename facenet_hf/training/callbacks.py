"""Hooks into a training run: subclass :class:`Callback`, override what you need, pass it to ``train``.

The loop calls, in order: ``on_train_start`` once (after a resume is restored), then per epoch
``on_epoch_start``, and per micro-batch ``on_batch`` (before the step) and ``on_step_end`` (after it;
``run.accelerator.sync_gradients`` says whether the optimizer stepped), and ``on_train_end`` once with the result.
A callback runs on every process; guard file writes with ``run.accelerator.is_main_process``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from facenet_hf.config import Config
    from facenet_hf.training.state import TrainState

__all__ = ["Callback", "CallbackList", "Run"]


@dataclass
class Run:
    """What a callback sees of the run (the live objects, after ``accelerator.prepare``)."""

    cfg: Config
    accelerator: Any
    model: Any
    optimizer: Any
    state: TrainState
    output_dir: Path
    total_steps: int
    loss_fn: Any = None  # the loss module (prepared when it has parameters: the margin softmax's classifier)


class Callback:
    """Base class: every hook does nothing."""

    def on_train_start(self, run: Run) -> None:
        pass

    def on_epoch_start(self, run: Run) -> None:
        pass

    def on_batch(self, run: Run, batch: dict[str, Any]) -> None:
        pass

    def on_step_end(self, run: Run, batch: dict[str, Any], stats: dict[str, Any]) -> None:
        pass

    def on_train_end(self, run: Run, result: Any) -> None:
        pass


class CallbackList(Callback):
    """Calls each callback in turn."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        for cb in callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"callbacks must be facenet_hf.training.Callback instances, got {cb!r}")
        self.callbacks = list(callbacks)

    def on_train_start(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_train_start(run)

    def on_epoch_start(self, run: Run) -> None:
        for cb in self.callbacks:
            cb.on_epoch_start(run)

    def on_batch(self, run: Run, batch: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_batch(run, batch)

    def on_step_end(self, run: Run, batch: dict[str, Any], stats: dict[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_step_end(run, batch, stats)

    def on_train_end(self, run: Run, result: Any) -> None:
        for cb in self.callbacks:
            cb.on_train_end(run, result)

"""Ctrl-C during training: finish the step, agree across processes, then stop at a step boundary."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch

__all__ = ["DeferredInterrupt", "any_process"]


class DeferredInterrupt:
    """Ctrl-C (SIGINT) while training: finish the current optimizer step, then raise KeyboardInterrupt at the
    step boundary (so the checkpoint saved on the way out is exact); a second Ctrl-C raises at once."""

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous: Any = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True


def any_process(accelerator, flag: bool) -> bool:
    """``flag`` on any process (a collective with several: every process must call it at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([float(flag)], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)

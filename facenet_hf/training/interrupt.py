"""Ctrl-C during training: finish the step, then stop at a step boundary (the processes agree through
:func:`facenet_hf.training.distributed.any_process`)."""

from __future__ import annotations

import signal
import threading
from typing import Any

__all__ = ["DeferredInterrupt"]


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

"""Exponential moving average (EMA) of a model's weights, for evaluation and the saved model.

After every optimizer step ``update(model)`` moves each floating-point tensor of the model's ``state_dict``
(parameters and BatchNorm running statistics) towards the live one::

    ema = d * ema + (1 - d) * live,   d = min(decay, (1 + n) / (10 + n))

where ``n`` is the number of updates so far: the warm-up keeps the random initialisation from dominating the
first averages. Integer buffers (BatchNorm's ``num_batches_tracked``) are copied. The averaged copy lives on the
model's device, in float32 whatever the autocast precision, and is never trained: evaluate or save
``ema.module``. ``state_dict``/``load_state_dict`` make it a checkpointed object
(``accelerator.register_for_checkpointing``), so a resumed run continues the same average.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["ModelEMA"]


class ModelEMA:
    """EMA of ``model``'s weights with decay ``decay`` in (0, 1) and the warm-up above."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._names = list(self.module.state_dict())

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold ``model``'s current weights into the average (``model`` has the same architecture)."""
        d = self.current_decay()
        live = model.state_dict()
        mine = self.module.state_dict()
        if live.keys() != mine.keys():
            raise ValueError(
                f"ModelEMA.update: the model's state_dict keys differ from the averaged copy's "
                f"(e.g. {sorted(set(live) ^ set(mine))[:3]})"
            )
        floats_mine, floats_live = [], []
        for name in self._names:
            a, b = mine[name], live[name]
            if a.is_floating_point():
                floats_mine.append(a)
                floats_live.append(b.detach().to(a.dtype))
            else:
                a.copy_(b)
        if floats_mine:
            torch._foreach_lerp_(floats_mine, floats_live, 1.0 - d)
        self.updates += 1

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["module"])

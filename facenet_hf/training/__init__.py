"""The training program: ``train(cfg)`` and the parts of a run (the library parts it uses live beside it:
:mod:`facenet_hf.model`, :mod:`facenet_hf.losses`, :mod:`facenet_hf.data`, :mod:`facenet_hf.evaluation`).

- :mod:`.engine`: ``train`` (set-up, resume, the epochs, the end) and ``TrainResult``;
- :mod:`.step`: one optimizer step; :mod:`.callbacks`: hooks into the loop;
- :mod:`.build`: model, loss inputs and data from a config; :mod:`.optim`: optimizers and the LR schedule;
- :mod:`.state`: ``TrainState`` and the resume position; :mod:`.checkpoint`: atomic, verified checkpoints;
- :mod:`.ema`, :mod:`.interrupt` (Ctrl-C), :mod:`.distributed` (cross-process agreement), :mod:`.reporting`.
"""

from facenet_hf.training.callbacks import Callback, Run
from facenet_hf.training.distributed import reset_accelerate_state
from facenet_hf.training.engine import TrainResult, build_loss, train
from facenet_hf.training.state import TrainState
from facenet_hf.training.step import NonFiniteLossError, train_step

__all__ = [
    "Callback",
    "NonFiniteLossError",
    "Run",
    "TrainResult",
    "TrainState",
    "build_loss",
    "reset_accelerate_state",
    "train",
    "train_step",
]

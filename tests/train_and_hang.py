"""Train as ``recipes/train_r18_lfw.py`` does (same parser and config), then hang inside the step after step HANG.

    python tests/train_and_hang.py HANG ARGV...

The test that runs it waits for a checkpoint and then kills the process with SIGKILL: the hang makes sure the
kill lands mid-epoch and mid-step (a micro-batch consumed, its optimizer step not done), after the metrics of
steps beyond the checkpoint were written. HANG = 0 trains without hanging (the uninterrupted reference run).
The hang is a public :class:`facenet_hf.training.Callback` passed to ``train``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from facenet_hf.cli.train import parse_train_config, run_training, train_parser
from facenet_hf.training import Callback


class HangAfter(Callback):
    """Sleep for an hour in the micro-batch after optimizer step ``step`` (0: never)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_batch(self, run, batch) -> None:
        if self.step and run.state.step >= self.step:
            (Path(run.cfg.output_dir) / "HANGING").write_text(str(run.state.step))
            time.sleep(3600)


def main(argv: list[str]) -> int:
    cfg, args = parse_train_config(argv[1:], train_parser(prog="train_and_hang.py"))
    return run_training(cfg, args, callbacks=[HangAfter(int(argv[0]))])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Train through ``recipes/train_r18_lfw.py``'s ``main(ARGV)``, then hang inside the step after step HANG.

    python tests/train_and_hang.py HANG ARGV...

The test that runs it waits for a checkpoint and then kills the process with SIGKILL: the hang makes sure the
kill lands mid-epoch and mid-step (a micro-batch consumed, its optimizer step not done), after the metrics of
steps beyond the checkpoint were written. HANG = 0 trains without hanging (the uninterrupted reference run).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from conftest import load_recipe  # tests/ is sys.path[0] when this file is run as a script

import facenet_hf.engine as engine


def main(argv: list[str]) -> int:
    hang = int(argv[0])
    original = engine._train_step

    def step(batch, model, optimizer, loss_fn, accelerator, cfg, state, total_steps):
        if hang and state.step >= hang:
            (Path(cfg.output_dir) / "HANGING").write_text(str(state.step))
            time.sleep(3600)
        return original(batch, model, optimizer, loss_fn, accelerator, cfg, state, total_steps)

    engine._train_step = step
    return load_recipe("train_r18_lfw").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What every process of a run must agree on, and the accelerate set-up around it.

``any_process`` is the one collective behind every per-step decision that all processes take together (stop at
the time budget, skip a non-finite loss, stop on Ctrl-C): each process must call it at the same step.
"""

from __future__ import annotations

import os
import platform

import torch

__all__ = [
    "any_process",
    "check_mixed_precision",
    "check_world_size",
    "hardware_description",
    "has_accelerator_device",
    "reset_accelerate_state",
]


def any_process(accelerator, flag: bool | torch.Tensor) -> bool:
    """``flag`` on any process (a collective with several: every process must call it at the same step).

    ``flag`` may be a 0-d/1-element tensor on the accelerator's device (no host sync before the reduction)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.as_tensor(flag, dtype=torch.float32, device=accelerator.device).reshape(1)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)


def has_accelerator_device() -> bool:
    """Whether torch sees a GPU (or another accelerator); without one, accelerate must be told ``cpu=True``."""
    acc = getattr(torch, "accelerator", None)
    return bool(acc.is_available()) if acc is not None else torch.cuda.is_available()


def check_world_size(accelerator) -> None:
    """Refuse to run as several independent single-process runs (they would write the same files)."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); on CPUs use `accelerate launch --multi_gpu --num_processes N` or "
            "`torchrun --nproc_per_node N` (`accelerate launch --cpu --num_processes N` starts 1 process)"
        )


def check_mixed_precision(mixed_precision: str, device_type: str) -> None:
    """fp16 needs a CUDA GPU (a machine question, so it is checked where the run is built, not in the config)."""
    if mixed_precision == "fp16" and device_type != "cuda":
        raise ValueError(
            "train.mixed_precision: 'fp16' needs a CUDA GPU (none found); use 'bf16' on CPU or 'no'"
        )


def hardware_description(accelerator) -> str:
    if accelerator.device.type == "cuda":
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def reset_accelerate_state(accelerator=None) -> None:
    """Forget a run's precision / accumulation settings (accelerate keeps them process-wide), so that the same
    process can build another Accelerator with others (tests, notebooks, the 10-fold protocol). The process group
    stays. :func:`facenet_hf.training.train` calls it on the way out."""
    from accelerate.state import AcceleratorState, GradientState

    if accelerator is not None:
        accelerator.free_memory()
    AcceleratorState._reset_state()
    GradientState._reset_state()

"""Helpers shared by the benchmark scripts: paths, option resolution, timing, tables, and the plain reference
pieces (torchvision transform, P x K sampler, batch_all triplet loss, ImageFolder restricted to some people)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import ImageFolder

ROOT = Path(__file__).resolve().parents[1]
try:
    import facenet_hf  # noqa: F401
except ImportError:  # run from a checkout without installing the package
    sys.path.insert(0, str(ROOT))

SAMPLE_DIR = ROOT / "data" / "lfw_sample"
SHARED_LFW = ROOT.parent / "shared" / "data" / "lfw"  # the shared data folder beside the checkout

# LFW deep-funneled images are 250 x 250; facenet_hf's face_crop(fraction=0.6) keeps the central 150 px.
LFW_SIDE = 250


def default_lfw_root() -> Path:
    """Folder holding ``lfw-deepfunneled/`` and ``pairs.txt``: $FACENET_HF_LFW_DIR, the shared copy, the sample."""
    env = os.environ.get("FACENET_HF_LFW_DIR")
    for cand in (Path(env) if env else None, SHARED_LFW, SAMPLE_DIR):
        if cand is not None and (cand / "pairs.txt").is_file() and (cand / "lfw-deepfunneled").is_dir():
            return cand
    return SAMPLE_DIR


def add_common_args(parser: Any, *, lfw: bool = True) -> None:
    """``--quick``, ``--out``, ``--seed`` and (``lfw``) ``--lfw-dir`` / ``--pairs``."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of a few seconds")
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the measurements to this JSON file"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's, one per core; --quick: 1, which stays stable on a busy "
        "machine, where 2 OpenMP threads sharing 2 loaded cores can run 10-50x slower)",
    )
    if lfw:
        root = default_lfw_root()
        parser.add_argument(
            "--lfw-dir",
            type=Path,
            default=root / "lfw-deepfunneled",
            help="folder of Name/Name_NNNN.jpg (default: %(default)s)",
        )
        parser.add_argument(
            "--pairs", type=Path, default=root / "pairs.txt", help="LFW pairs.txt (default: %(default)s)"
        )


def resolve(args: Any, full: dict[str, Any], quick: dict[str, Any]) -> None:
    """Fill every option left at None from ``quick`` (with ``--quick``) or ``full``."""
    table = quick if args.quick else full
    for key in {**full, **quick}:
        if getattr(args, key, None) is None:
            setattr(args, key, table.get(key, full.get(key)))


def apply_threads(args: Any) -> None:
    """``torch.set_num_threads(args.threads)``; ``--quick`` defaults to 1 thread."""
    if args.threads is None and args.quick:
        args.threads = 1
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("--threads must be >= 1")
        torch.set_num_threads(args.threads)


def int_list(text: str) -> list[int]:
    return [int(s) for s in str(text).split(",") if s.strip()]


def str_list(text: str) -> list[str]:
    return [s.strip() for s in str(text).split(",") if s.strip()]


def environment() -> dict[str, Any]:
    """What the figures depend on: versions, threads, CPU, device."""
    import torchvision

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def warm_page_cache(root: Path | str) -> tuple[int, float]:
    """Read every file under ``root`` once, so that no measurement pays for the first (disk) read of a file that
    a method measured earlier already had in the page cache. Returns (files, seconds)."""
    t = time.perf_counter()
    n = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError), open(os.path.join(dirpath, name), "rb") as f:
                while f.read(1 << 20):
                    pass
            n += 1
    return n, time.perf_counter() - t


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_loop(steps: Iterator[Any] | Callable[[], Any], n: int, device: torch.device) -> list[float]:
    """Seconds per iteration of ``n`` iterations: of a callable, or of ``next()`` on an iterator (the body of the
    iterator being the work, e.g. a training loop written as a generator)."""
    out = []
    call = steps if callable(steps) else (lambda: next(steps))
    t0 = time.perf_counter()
    for _ in range(n):
        call()
        sync(device)
        t1 = time.perf_counter()
        out.append(t1 - t0)
        t0 = t1
    return out


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            if v != v:  # NaN
                return "n/a"
            return f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    print(f"\nwrote {path}")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (Path, torch.device, torch.dtype)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``precision`` ``bf16`` / ``fp16``; a no-op context for ``no``."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


# ------------------------------------------------------------------------------------------ reference pieces


def torchvision_train_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], *, side: int = LFW_SIDE
) -> Callable:
    """The classic ``torchvision.transforms`` equivalent of facenet_hf's ``DEFAULT_TRAIN_STEPS`` on LFW images.

    rotate(10) -> centre crop 0.6 x side (face_crop) -> random_resized_crop(scale 0.8-1, ratio 0.9-1.1) ->
    hflip -> color_jitter(0.2, 0.2, 0.2) -> ToTensor -> Normalize.
    """
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomRotation(10, interpolation=T.InterpolationMode.BILINEAR, fill=0),
            T.CenterCrop(round(0.6 * side)),
            T.RandomResizedCrop(image_size, scale=(0.8, 1.0), ratio=(0.9, 1.1), antialias=True),
            T.RandomHorizontalFlip(),
            T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def torchvision_eval_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], *, side: int = LFW_SIDE
) -> Callable:
    """Equivalent of ``DEFAULT_EVAL_STEPS`` (face_crop 0.6 -> resize) in ``torchvision.transforms``."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.CenterCrop(round(0.6 * side)),
            T.Resize((image_size, image_size), antialias=True),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


class PeopleFolder(ImageFolder):
    """``torchvision.datasets.ImageFolder`` on ``root``, restricted to the identity folders ``people`` (all if None)."""

    def __init__(self, root: Path | str, people: Sequence[str] | None, transform: Callable | None) -> None:
        self.people = None if people is None else sorted(people)
        super().__init__(str(root), transform=transform)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        if self.people is None:
            return super().find_classes(directory)
        return self.people, {c: i for i, c in enumerate(self.people)}


class SimplePKBatchSampler:
    """A plain P x K batch sampler (the reference loop's): each batch draws ``p`` distinct identities uniformly
    among those with >= ``min_images`` images, then ``k`` images of each (with replacement when it has fewer)."""

    def __init__(
        self, labels: Sequence[int], p: int, k: int, *, num_batches: int, seed: int = 0, min_images: int = 2
    ) -> None:
        by_id: dict[int, list[int]] = {}
        for i, y in enumerate(labels):
            by_id.setdefault(int(y), []).append(i)
        self.groups = [idx for idx in by_id.values() if len(idx) >= min_images]
        if len(self.groups) < p:
            raise ValueError(f"only {len(self.groups)} identities have >= {min_images} images, need p={p}")
        self.p, self.k, self.num_batches = p, k, num_batches
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.num_batches):
            batch: list[int] = []
            for g in self.rng.choice(len(self.groups), self.p, replace=False):
                idx = self.groups[g]
                batch.extend(self.rng.choice(idx, self.k, replace=len(idx) < self.k).tolist())
            yield batch


def batch_all_triplet_loss(
    labels: torch.Tensor, embeddings: torch.Tensor, margin: float = 0.2
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_all triplet loss as torchvision's ``references/similarity/loss.py`` computes it: a B x B x B tensor of
    ``d(a, p) - d(a, n) + margin`` times a B x B x B validity mask; mean over the positive triplets."""
    dist = torch.cdist(embeddings, embeddings, p=2.0)
    loss = dist.unsqueeze(2) - dist.unsqueeze(1) + margin
    b = labels.size(0)
    not_eye = ~torch.eye(b, dtype=torch.bool, device=labels.device)
    distinct = not_eye.unsqueeze(2) & not_eye.unsqueeze(1) & not_eye.unsqueeze(0)
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    mask = same.unsqueeze(2) & ~same.unsqueeze(1) & distinct
    loss = mask.float() * loss
    loss[loss < 0] = 0
    num_positive = (loss > 1e-16).sum()
    fraction = num_positive / (mask.sum().float() + 1e-16)
    return loss.sum() / (num_positive + 1e-16), fraction

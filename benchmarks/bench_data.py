"""Benchmark the training data pipeline: decoded + augmented images/s, facenet_hf (HF datasets) vs torchvision.

* ``hf``: what the engine builds: ``load_source(lfw_dir)`` -> ``ds.with_transform(BatchTransform(
  build_transform(DEFAULT_TRAIN_STEPS), seed=0))`` -> ``DataLoader(batch_sampler=PKBatchSampler(labels_of(ds),
  p, k), collate_fn=collate_batch)``;
* ``torchvision``: ``ImageFolder(lfw_dir, transform=...)`` with the classic ``torchvision.transforms`` equivalent
  of the default train steps (rotate 10, centre crop 150, random resized crop, hflip, colour jitter, ToTensor,
  Normalize) -> ``DataLoader(batch_sampler=<the same PKBatchSampler>)``, default collate.

Both read the same files in the same order (one sorted file list, one sampler seed; checked), all read once
beforehand so that both find them in the page cache (whichever ran first would otherwise pay the disk). For each
``--workers`` value a fresh DataLoader runs ``--warmup`` untimed batches (worker start-up), then ``--batches``
timed ones; with ``--rounds R`` the two pipelines alternate R times and the median is reported. Nothing else
runs: this is the rate at which the pipeline can feed a model that takes no time.

The breakdown table (``--breakdown-images`` images, in this process, no DataLoader, microseconds per image, median
of ``--breakdown-repeats`` alternating runs) splits the cost: decoding (``load_image`` vs ImageFolder's
``pil_loader``), augmentation (``FaceTransform`` vs ``Compose``, and each of their ops in turn), a whole batch
through the transform alone (for hf: its rows read from Arrow + ``BatchTransform``), and a whole batch through the
dataset (``Dataset.__getitems__`` + collate vs ``[ds[i] for i in batch]`` + ``default_collate``).

Usage: ``python benchmarks/bench_data.py --out data.json`` (about 2 minutes on 2 cores); ``--quick`` for seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.data.images import load_image
from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import arrow_column, labels_of, load_source
from facenet_hf.data.transforms import (
    DEFAULT_TRAIN_STEPS,
    BatchTransform,
    build_transform,
    collate_batch,
)

PIPELINES = ("hf", "torchvision")
FULL = {
    "image_size": 112,
    "p": 16,
    "k": 4,
    "workers": "0,1,2",
    "warmup": 2,
    "batches": 30,
    "breakdown_images": 256,
    "breakdown_repeats": 3,
}
QUICK = {**FULL, "p": 4, "k": 2, "warmup": 1, "batches": 2, "breakdown_images": 8, "breakdown_repeats": 1}
MEAN = (0.485, 0.456, 0.406)  # timm resnet18 (ImageNet) statistics, what FaceNet("resnet18") normalises with
STD = (0.229, 0.224, 0.225)


class Pipelines:
    """The two datasets (same files, same order), their transforms and a sampler factory."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tf = build_transform(DEFAULT_TRAIN_STEPS, image_size=args.image_size, mean=MEAN, std=STD)
        self.bt = BatchTransform(self.tf, bad_image_policy="skip", seed=args.seed)  # as the engine
        self.hf_raw = load_source(args.lfw_dir)
        self.hf = self.hf_raw.with_transform(self.bt)
        self.tv_tf = C.torchvision_train_transform(args.image_size, MEAN, STD)
        self.tv = C.PeopleFolder(args.lfw_dir, None, self.tv_tf)
        self.labels = labels_of(self.hf_raw)
        rel = arrow_column(self.hf_raw, "path").to_pylist()
        root = Path(args.lfw_dir)
        tv_rel = [Path(p).relative_to(root).as_posix() for p, _ in self.tv.samples]
        if rel != tv_rel or self.labels.tolist() != self.tv.targets:
            raise RuntimeError("load_source and ImageFolder list different files or labels: not comparable")

    def sampler(self, n: int) -> PKBatchSampler:
        return PKBatchSampler(self.labels, self.args.p, self.args.k, seed=self.args.seed, num_batches=n)

    def loader(self, name: str, workers: int, n: int) -> DataLoader:
        if name == "hf":
            return DataLoader(
                self.hf, batch_sampler=self.sampler(n), num_workers=workers, collate_fn=collate_batch
            )
        return DataLoader(self.tv, batch_sampler=self.sampler(n), num_workers=workers)


def measure(pipes: Pipelines, name: str, workers: int) -> dict[str, Any]:
    """Images/s of one fresh DataLoader over warmup + batches batches (the warm-up batches untimed)."""
    a = pipes.args
    torch.manual_seed(a.seed)
    it = iter(pipes.loader(name, workers, a.warmup + a.batches))
    t0 = time.perf_counter()
    for _ in range(a.warmup):
        next(it)
    t1 = time.perf_counter()
    images = 0
    for _ in range(a.batches):
        batch = next(it)
        images += len(batch["labels"] if isinstance(batch, dict) else batch[1])
    t2 = time.perf_counter()
    del it
    return {
        "images_per_second": images / (t2 - t1),
        "timed_s": t2 - t1,
        "warmup_s": t1 - t0,
        "images": images,
    }


def breakdown(pipes: Pipelines, n_images: int, repeats: int) -> dict[str, dict[str, float]]:
    """Microseconds per image of each stage, both pipelines, in this process: the median of ``repeats`` runs,
    the two pipelines alternating."""
    a = pipes.args
    batch_size = a.p * a.k
    idx = [i for b in pipes.sampler(-(-n_images // batch_size)) for i in b][:n_images]
    n = len(idx)
    paths = [pipes.tv.samples[i][0] for i in idx]
    rows = pipes.hf_raw[idx]["image"]  # [{"bytes": None, "path": ...}]: Arrow read, not timed
    chunks = [idx[i : i + batch_size] for i in range(0, n, batch_size)]
    imgs = [pipes.tv.loader(p) for p in paths]  # decoded once, the input of the augmentation stages
    torch.manual_seed(a.seed)

    def us_per_image(fns: dict[str, Any]) -> dict[str, float]:
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(1e6 * (time.perf_counter() - t) / n)
        return {k: C.median(v) for k, v in times.items()}

    def hf_batches() -> None:  # the batch's rows read from Arrow + BatchTransform (no Dataset formatting)
        for c in chunks:
            pipes.bt(pipes.hf_raw[c])

    def tv_batches() -> None:
        for c in chunks:
            torch.stack([pipes.tv_tf(pipes.tv.loader(pipes.tv.samples[i][0])) for i in c])

    out = {
        "decode": us_per_image(
            {
                "hf": lambda: [load_image(r) for r in rows],
                "torchvision": lambda: [pipes.tv.loader(p) for p in paths],
            }
        ),
        "augment": us_per_image(
            {
                "hf": lambda: [pipes.tf(im) for im in imgs],
                "torchvision": lambda: [pipes.tv_tf(im) for im in imgs],
            }
        ),
        "batch: decode + augment + stack": us_per_image({"hf": hf_batches, "torchvision": tv_batches}),
        "batch: dataset + collate": us_per_image(
            {
                "hf": lambda: [collate_batch(pipes.hf.__getitems__(c)) for c in chunks],
                "torchvision": lambda: [default_collate([pipes.tv[i] for i in c]) for c in chunks],
            }
        ),
    }
    hf_ops = [*pipes.tf.image_ops, pipes.tf.to_tensor, *pipes.tf.tensor_ops]
    for name, ops in (("hf", hf_ops), ("torchvision", list(pipes.tv_tf.transforms))):
        cur = imgs
        for i, op in enumerate(ops):
            cost = us_per_image({name: lambda op=op, cur=cur: [op(im) for im in cur]})
            out[f"{name} op {i + 1}: {type(op).__name__}"] = cost
            cur = [op(im) for im in cur]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    parser.add_argument("--workers", default=None, help="comma-separated DataLoader num_workers (0,1,2)")
    parser.add_argument("--image-size", type=int, default=None, help="output resolution (112)")
    parser.add_argument("--p", type=int, default=None, help="identities per batch (16; quick 4)")
    parser.add_argument("--k", type=int, default=None, help="images per identity (4; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed batches per loader (2; quick 1)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches per loader (30; quick 2)")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate the pipelines this many times (median)"
    )
    parser.add_argument(
        "--breakdown-images", type=int, default=None, help="images in the per-stage breakdown (256; 0: skip)"
    )
    parser.add_argument(
        "--breakdown-repeats", type=int, default=None, help="breakdown runs, median (3; quick 1)"
    )
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    C.apply_threads(args)
    workers = C.int_list(args.workers)
    if not workers or min(workers) < 0 or args.batches < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--workers must be >= 0, --batches and --rounds >= 1, --warmup >= 0")
    if not args.lfw_dir.is_dir():
        parser.error(f"no image folder at --lfw-dir {args.lfw_dir}")

    env = C.environment()
    batch = args.p * args.k
    print(
        f"{args.image_size}px, batches of P x K = {args.p} x {args.k} = {batch}, workers {workers}, "
        f"{args.warmup} warm-up + {args.batches} timed batches x {args.rounds} round(s); torch {env['torch']}, "
        f"{env['threads']} threads; data {args.lfw_dir}"
    )
    files, secs = C.warm_page_cache(args.lfw_dir)
    print(f"page cache warmed: read {files} files in {secs:.1f} s")
    pipes = Pipelines(args)
    print(
        f"{len(pipes.labels)} images, {int(pipes.labels.max()) + 1} identities, same files in both pipelines"
    )

    runs: dict[int, dict[str, list[dict[str, Any]]]] = {w: {p: [] for p in PIPELINES} for w in workers}
    for r in range(args.rounds):
        for w in workers:
            for name in PIPELINES:
                res = measure(pipes, name, w)
                runs[w][name].append(res)
                print(
                    f"  round {r + 1} workers {w} {name:11s} {res['images_per_second']:8.1f} img/s",
                    flush=True,
                )

    results = []
    for w in workers:
        row: dict[str, Any] = {"num_workers": w}
        for name in PIPELINES:
            row[f"{name}_images_per_second"] = C.median([x["images_per_second"] for x in runs[w][name]])
            row[f"{name}_runs"] = runs[w][name]
        row["hf/torchvision"] = row["hf_images_per_second"] / row["torchvision_images_per_second"]
        results.append(row)
    print()
    print(
        C.markdown_table(
            ["num_workers", "hf img/s", "torchvision img/s", "hf / torchvision"],
            [
                [
                    x["num_workers"],
                    x["hf_images_per_second"],
                    x["torchvision_images_per_second"],
                    x["hf/torchvision"],
                ]
                for x in results
            ],
        )
    )
    stages: dict[str, dict[str, float]] = {}
    if args.breakdown_images > 0:
        stages = breakdown(pipes, args.breakdown_images, args.breakdown_repeats)
        print(f"\nper-stage cost, {args.breakdown_images} images in this process (us/image):\n")
        both = {k: v for k, v in stages.items() if len(v) == 2}
        print(
            C.markdown_table(
                ["stage", "hf us/img", "torchvision us/img", "hf / torchvision"],
                [[k, v["hf"], v["torchvision"], v["hf"] / v["torchvision"]] for k, v in both.items()],
            )
        )
        print("\nper augmentation op, applied in turn to the decoded images (us/image):\n")
        print(
            C.markdown_table(
                ["pipeline op", "us/img"],
                [[k, next(iter(v.values()))] for k, v in stages.items() if len(v) == 1],
            )
        )
    meta = {
        **env,
        **{k: getattr(args, k) for k in (*FULL, "rounds", "seed", "threads")},
        "lfw_dir": str(args.lfw_dir),
        "images": len(pipes.labels),
        "quick": args.quick,
    }
    C.write_json(args.out, {"meta": meta, "results": results, "breakdown_us_per_image": stages})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

"""Benchmark evaluation: the LFW verification protocol, and embed_files against a bare forward pass.

* ``protocol``: ``verification_protocol(distances, is_same, folds)`` on ``--protocol-pairs`` pairs (6,000: the
  labels and folds of ``--pairs`` when it holds that many, as LFW View 2 does, else the same layout made up) with
  synthetic distances (matched pairs ~ N(0.8, 0.25), mismatched ~ N(1.6, 0.25)): milliseconds,
  median of ``--repeats`` runs after one warm-up.
* ``embed``: ``embed_files(model, files, batch_size, flip="off", num_workers=w)`` on the first ``--n`` distinct
  images of the pairs (decode + eval transform + forward) vs a bare forward of the same model over ``--n``
  images already in memory as one tensor (same batch size, same autocast / channels_last, inference mode):
  images/s, median of ``--repeats`` runs (the two interleaved, after one warm-up each) and the ratio.

The model is a randomly initialised FaceNet (``--backbone`` at ``--image-size``): speed does not depend on the
weights.

Usage: ``python benchmarks/bench_eval.py --out eval.json`` (about 2 minutes on 2 cores); ``--quick`` for seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.data.lfw import read_pairs
from facenet_hf.evaluation.embed import embed_files
from facenet_hf.evaluation.verification import verification_protocol
from facenet_hf.model import FaceNet

FULL = {
    "n": 1024,
    "batch_size": 128,
    "workers": "0,2",
    "repeats": 3,
    "protocol_repeats": 7,
    "image_size": 112,
    "backbone": "resnet18",
    "embedding_dim": 128,
}
QUICK = {
    **FULL,
    "n": 16,
    "batch_size": 8,
    "workers": "0",
    "repeats": 2,
    "protocol_repeats": 3,
    "image_size": 32,
    "backbone": "test_resnet",
    "embedding_dim": 32,
}


def protocol_labels(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, str]:
    """(is_same, fold, where from): the pairs file's when it holds ``--protocol-pairs`` pairs, else LFW View 2's
    layout (10 folds, each half matched then half mismatched) of that size."""
    pairs = read_pairs(args.pairs)
    if len(pairs) == args.protocol_pairs:
        return pairs.is_same.astype(bool), pairs.fold, str(args.pairs)
    per_fold = args.protocol_pairs // 10
    fold = np.repeat(np.arange(1, 11), per_fold)
    is_same = np.tile(np.arange(per_fold) < per_fold // 2, 10)
    return is_same, fold, f"synthetic View 2 layout ({args.pairs} has {len(pairs)} pairs)"


def bench_protocol(args: argparse.Namespace) -> dict[str, Any]:
    same, fold, source = protocol_labels(args)
    rng = np.random.default_rng(args.seed)
    d = np.where(same, rng.normal(0.8, 0.25, same.size), rng.normal(1.6, 0.25, same.size)).clip(0.0, 4.0)
    verification_protocol(d, same, fold)  # warm-up
    times = []
    for _ in range(args.protocol_repeats):
        t = time.perf_counter()
        report = verification_protocol(d, same, fold)
        times.append(time.perf_counter() - t)
    return {
        "pairs": int(same.size),
        "folds": len(np.unique(fold)),
        "labels_from": source,
        "median_ms": 1000 * C.median(times),
        "times_ms": [1000 * t for t in times],
        "accuracy_mean": float(report["accuracy_mean"]),
    }


def pair_files(args: argparse.Namespace) -> list[str]:
    paths1, paths2 = read_pairs(args.pairs).paths()
    unique = sorted(set(paths1) | set(paths2))
    files = [str(Path(args.lfw_dir) / p) for p in unique if (Path(args.lfw_dir) / p).is_file()]
    if len(files) < args.n:
        raise SystemExit(f"only {len(files)} pair images exist under {args.lfw_dir}, fewer than --n {args.n}")
    return files[: args.n]


def bench_embed(args: argparse.Namespace, workers: list[int], nices: list[int]) -> list[dict[str, Any]]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    model = FaceNet(args.backbone, args.embedding_dim, image_size=args.image_size).to(device).eval()
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    files = pair_files(args)
    x = torch.randn(args.n, 3, args.image_size, args.image_size).to(device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def bare() -> None:
        with torch.inference_mode(), C.autocast(device, args.precision):
            for chunk in x.split(args.batch_size):
                model(chunk).float().cpu()
        C.sync(device)

    def embed(w: int, nice: int) -> None:
        with C.autocast(device, args.precision):
            emb = embed_files(
                model,
                files,
                batch_size=args.batch_size,
                flip="off",
                num_workers=w,
                worker_nice=nice,
                progress=False,
            )
        assert emb.shape == (args.n, args.embedding_dim)

    # (workers, niceness): the niceness only matters with worker processes
    variants = [(w, n) for w in workers for n in (nices if w else nices[:1])]
    methods = {"bare": bare, **{f"embed_w{w}_n{n}": (lambda w=w, n=n: embed(w, n)) for w, n in variants}}
    times: dict[str, list[float]] = {m: [] for m in methods}
    for fn in methods.values():
        fn()  # warm-up
    for _ in range(args.repeats):
        for name, fn in methods.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    bare_ips = args.n / C.median(times["bare"])
    rows = [{"method": "bare", "num_workers": None, "images_per_second": bare_ips, "times_s": times["bare"]}]
    for w, n in variants:
        ips = args.n / C.median(times[f"embed_w{w}_n{n}"])
        rows.append(
            {
                "method": "embed_files",
                "num_workers": w,
                "worker_nice": n if w else None,
                "images_per_second": ips,
                "times_s": times[f"embed_w{w}_n{n}"],
                "embed/bare": ips / bare_ips,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser)
    parser.add_argument("--n", type=int, default=None, help="images to embed (1024; quick 16)")
    parser.add_argument("--batch-size", type=int, default=None, help="embedding batch size (128; quick 8)")
    parser.add_argument(
        "--workers", default=None, help="comma-separated embed_files num_workers (0,2; quick 0)"
    )
    parser.add_argument(
        "--worker-nice",
        default="19",
        help="comma-separated worker niceness for num_workers > 0, each timed (19 = embed_files' default; 0,19 "
        "compares the workers at the model's priority with the default)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="timed embedding runs (3; quick 2)")
    parser.add_argument(
        "--protocol-pairs", type=int, default=6000, help="pairs scored by the protocol (6000)"
    )
    parser.add_argument("--protocol-repeats", type=int, default=None, help="timed protocol runs (7; quick 3)")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (112; quick 32)")
    parser.add_argument("--backbone", default=None, help="timm backbone (resnet18; quick test_resnet)")
    parser.add_argument("--embedding-dim", type=int, default=None)
    parser.add_argument("--precision", choices=("bf16", "fp16", "no"), default="bf16", help="autocast (both)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    C.apply_threads(args)
    workers = C.int_list(args.workers)
    nices = C.int_list(args.worker_nice)
    if not nices or min(nices) < 0 or max(nices) > 19:
        parser.error(f"--worker-nice must list values in 0..19, got {args.worker_nice!r}")
    if args.protocol_pairs < 20 or args.protocol_pairs % 20:
        parser.error("--protocol-pairs must be a multiple of 20 (10 folds, half matched)")
    if args.n < 1 or args.repeats < 1 or args.protocol_repeats < 1 or not workers or min(workers) < 0:
        parser.error("--n, --repeats, --protocol-repeats must be >= 1 and --workers >= 0")
    if not args.pairs.is_file():
        parser.error(f"no pairs file at --pairs {args.pairs}")

    env = C.environment()
    print(
        f"{args.backbone} @ {args.image_size}px, precision {args.precision}, channels_last {args.channels_last}, "
        f"n {args.n}, batch {args.batch_size}, workers {workers}, repeats {args.repeats}; torch {env['torch']}, "
        f"{env['threads']} threads; pairs {args.pairs}"
    )
    protocol = bench_protocol(args)
    print(
        "\n"
        + C.markdown_table(
            ["protocol", "pairs", "folds", "median ms", "min ms", "pairs/s"],
            [
                [
                    "verification_protocol",
                    protocol["pairs"],
                    protocol["folds"],
                    protocol["median_ms"],
                    min(protocol["times_ms"]),
                    1000 * protocol["pairs"] / protocol["median_ms"],
                ]
            ],
        )
    )
    embed = bench_embed(args, workers, nices)
    print(
        "\n"
        + C.markdown_table(
            ["embedding (flip off)", "num_workers", "worker nice", "img/s", "x bare forward"],
            [
                [
                    "bare forward, tensors in memory" if r["method"] == "bare" else "embed_files (LFW files)",
                    "-" if r["num_workers"] is None else r["num_workers"],
                    "-" if r.get("worker_nice") is None else r["worker_nice"],
                    r["images_per_second"],
                    r.get("embed/bare", 1.0),
                ]
                for r in embed
            ],
        )
    )
    meta = {
        **env,
        **{
            k: getattr(args, k)
            for k in (*FULL, "precision", "channels_last", "seed", "threads", "protocol_pairs")
        },
        "lfw_dir": str(args.lfw_dir),
        "pairs": str(args.pairs),
        "quick": args.quick,
    }
    C.write_json(args.out, {"meta": meta, "protocol": protocol, "embed": embed})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

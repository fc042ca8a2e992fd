"""Benchmark CPU inference of an exported embedder: onnxruntime fp32 and int8 against PyTorch eager.

* One forward pass on a batch already in memory (preprocessing excluded: it is the same PIL work for all three),
  at each of ``--batches`` (1 and 64): PyTorch eager (``torch.inference_mode``, float32, NCHW unless
  ``--channels-last``), onnxruntime on ``model.onnx`` and on ``model.int8.onnx`` (``facenet-hf export --int8``:
  dynamic quantisation), all with the same number of intra-op threads (``--threads``; default torch's).
* ``--rounds`` interleaved rounds; in each, every method and batch is warmed up (``--warmup`` calls) and timed
  over ``--iters`` calls. Images/s = batch / median seconds per call over all rounds; the ratio to PyTorch eager
  is measured in the same invocation.
* Also: the size of each file and the parity figures of the export (onnxruntime vs PyTorch on the bundled LFW
  sample: max abs difference per embedding value, mean cosine).

The model is a randomly initialised FaceNet (``--backbone`` at ``--image-size``, ``--embedding-dim``): speed does not
depend on the weights; ``--model DIR`` benchmarks a trained model folder instead (its int8 parity then means
something too).

Usage: ``python benchmarks/bench_export.py --batches 1 64 --out export.json`` (a few minutes on 2 cores);
``--quick`` for seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.export import OnnxEmbedder, export_onnx
from facenet_hf.model import FaceNet

FULL = {
    "batches": [1, 64],
    "iters": 20,
    "warmup": 3,
    "rounds": 3,
    "image_size": 112,
    "backbone": "resnet18",
    "embedding_dim": 128,
    "parity_count": 34,
}
QUICK = {
    **FULL,
    "batches": [1, 4],
    "iters": 2,
    "warmup": 1,
    "rounds": 1,
    "image_size": 32,
    "backbone": "test_resnet",
    "embedding_dim": 32,
    "parity_count": 17,
}
METHODS = ("torch_eager", "onnx_fp32", "onnx_int8")


def build_model(args: argparse.Namespace) -> FaceNet:
    if args.model is not None:
        return FaceNet.from_pretrained(str(args.model)).eval()
    torch.manual_seed(args.seed)
    return FaceNet(args.backbone, args.embedding_dim, image_size=args.image_size).eval()


def bench(args: argparse.Namespace, model: FaceNet, folder: Path) -> list[dict[str, Any]]:
    threads = torch.get_num_threads()
    sessions = {
        "onnx_fp32": OnnxEmbedder(folder, threads=threads),
        "onnx_int8": OnnxEmbedder(folder, int8=True, threads=threads),
    }
    net = model.to(memory_format=torch.channels_last) if args.channels_last else model
    s = model.image_size
    rng = np.random.default_rng(args.seed)
    inputs = {b: rng.standard_normal((b, 3, s, s), dtype=np.float32) for b in args.batches}
    tensors = {b: torch.from_numpy(x) for b, x in inputs.items()}
    if args.channels_last:
        tensors = {b: t.contiguous(memory_format=torch.channels_last) for b, t in tensors.items()}

    def call(method: str, b: int):
        if method == "torch_eager":

            def run_torch() -> None:
                with torch.inference_mode():
                    net(tensors[b])

            return run_torch
        embedder = sessions[method]
        return lambda: embedder.run(inputs[b])

    times: dict[tuple[str, int], list[float]] = {(m, b): [] for m in args.methods for b in args.batches}
    cpu = torch.device("cpu")
    for _ in range(args.rounds):
        for b in args.batches:
            for m in args.methods:
                fn = call(m, b)
                for _ in range(args.warmup):
                    fn()
                times[(m, b)] += C.timed_loop(fn, args.iters, cpu)
    rows = []
    for b in args.batches:
        base = b / C.median(times[("torch_eager", b)]) if "torch_eager" in args.methods else float("nan")
        for m in args.methods:
            med = C.median(times[(m, b)])
            rows.append(
                {
                    "batch": b,
                    "method": m,
                    "images_per_second": b / med,
                    "ms_per_batch_median": 1000 * med,
                    "x_torch_eager": (b / med) / base,
                    "times_s": times[(m, b)],
                }
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    C.add_common_args(parser, lfw=False)
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="batch sizes (1 64; quick 1 4)")
    parser.add_argument(
        "--iters", type=int, default=None, help="timed calls per method, batch and round (20)"
    )
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls before each timing (3)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (3; quick 1)")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (112; quick 32)")
    parser.add_argument("--backbone", default=None, help="timm backbone (resnet18; quick test_resnet)")
    parser.add_argument("--embedding-dim", type=int, default=None, help="embedding size (128; quick 32)")
    parser.add_argument(
        "--model", type=Path, default=None, help="a trained model folder instead of random weights"
    )
    parser.add_argument(
        "--methods",
        type=C.str_list,
        default=list(METHODS),
        help=f"comma-separated subset of {','.join(METHODS)} (default: all)",
    )
    parser.add_argument(
        "--parity-count", type=int, default=None, help="images of the export's parity check (34)"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="PyTorch eager in channels_last memory (default: NCHW, as from_pretrained loads it)",
    )
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    C.apply_threads(args)
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods:
        parser.error(f"--methods must list some of {', '.join(METHODS)}, got {args.methods}")
    if min(args.batches) < 1 or args.iters < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--batches, --iters, --rounds must be >= 1 and --warmup >= 0")

    import onnxruntime

    env = {**C.environment(), "onnxruntime": onnxruntime.__version__}
    model = build_model(args)
    what = args.model or f"{args.backbone} @ {args.image_size}px, {args.embedding_dim}-d (random weights)"
    print(
        f"{what}; batches {args.batches}, {args.rounds} x {args.iters} timed calls; torch {env['torch']}, "
        f"onnxruntime {env['onnxruntime']}, {env['threads']} threads"
    )
    with tempfile.TemporaryDirectory(prefix="bench_export_") as tmp:
        result = export_onnx(model, Path(tmp) / "onnx", int8=True, parity_count=args.parity_count)
        meta = result.metadata
        rows = bench(args, model, result.out_dir)
    safetensors_bytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    files = {
        "torch_eager": {"file": "model.safetensors (tensors)", "bytes": safetensors_bytes},
        "onnx_fp32": {"file": "model.onnx", "bytes": meta["files"]["fp32"]["bytes"]},
        "onnx_int8": {"file": "model.int8.onnx", "bytes": meta["files"]["int8"]["bytes"]},
    }
    parity = {"onnx_fp32": meta["parity"]["fp32"], "onnx_int8": meta["parity"]["int8"]}
    print(
        "\n"
        + C.markdown_table(
            ["batch", "method", "img/s", "ms/batch (median)", "x torch eager"],
            [
                [
                    r["batch"],
                    r["method"],
                    r["images_per_second"],
                    r["ms_per_batch_median"],
                    r["x_torch_eager"],
                ]
                for r in rows
            ],
        )
    )
    print(
        "\n"
        + C.markdown_table(
            ["format", "file", "MB", "max abs diff vs torch", "mean cosine vs torch"],
            [
                [
                    m,
                    files[m]["file"],
                    files[m]["bytes"] / 1e6,
                    f"{parity[m]['max_abs_diff']:.2e}" if m in parity else "-",
                    f"{parity[m]['mean_cosine']:.6f}" if m in parity else "-",
                ]
                for m in METHODS
            ],
        )
    )
    run_meta = {
        **env,
        **{k: getattr(args, k) for k in (*FULL, "seed", "threads", "methods", "channels_last")},
        "model": None if args.model is None else str(args.model),
        "quick": args.quick,
        "parity_source": meta["parity"]["source"],
        "opset": meta["opset"],
    }
    C.write_json(args.out, {"meta": run_meta, "results": rows, "files": files, "parity": parity})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

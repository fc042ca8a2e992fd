"""Benchmark triplet mining: forward+backward time and peak memory of each mode against the distance-matrix floor.

Rows, per batch size B (P x K batches, unit-norm random embeddings of size --dim):

* ``floor``: ``pairwise_distances(x).sum().backward()``, the B x B distance matrix alone;
* ``semihard``, ``batch_hard``, ``batch_all``: ``facenet_hf.losses.TripletLoss`` with that mining mode;
* ``pml_semihard``: pytorch-metric-learning's ``TripletMarginMiner(margin=0.2, type_of_triplets="semihard")``
  followed by ``TripletMarginLoss(margin=0.2)`` (a different rule: all triplets with 0 < d_an - d_ap <= margin),
  when the package is installed (``pip install pytorch-metric-learning``; a benchmark-only dependency).

Time: median of --repeats runs after one warm-up run, wall clock (``torch.cuda.synchronize`` on CUDA); the
methods are timed in interleaved rounds so that load from other processes affects them alike. On CPU the timing
runs with glibc told to keep the memory it frees (``M_MMAP_THRESHOLD`` 1 GiB, ``M_TRIM_THRESHOLD`` 2 GiB): by
default every step would map fresh B x B buffers and pay a page fault per 4 KiB of them (at B = 1800 a large
part of some rows' time, varying with the heap's history); kept memory is what CUDA's
caching allocator gives on a GPU and what tcmalloc/jemalloc give on CPU. The JSON output keeps every run.
The row ``dist_fwd`` (the distance matrix forward only, no autograd) is the part no miner can avoid; the miners
here backpropagate through the selected pairs only (semihard on CPU, batch_hard) or through the whole matrix
(batch_all, semihard's fixed-shape accelerator variant), so they are measured against both.

Peak memory on CPU, measured after all the timing: the growth of the process's resident set during one
forward+backward, measured by resetting the kernel's high-water mark (``/proc/self/clear_refs``) and reading
``VmHWM`` - ``VmRSS`` from ``/proc/self/status`` (Linux only). glibc is then told to serve every block >= 128 KiB
with mmap and the heap is trimmed first, so freed memory goes back to the OS and cannot hide an allocation; this
counts everything the process touches (torch, NumPy, Python), not only tensors. On CUDA:
``torch.cuda.max_memory_allocated`` growth.

Usage: ``python benchmarks/bench_mining.py --sizes 64,256,512,1024,1800 --repeats 3 --out mining.json``
(``--quick``: sizes 16 and 32, dim 16, one repeat, 1 thread, allocator untouched, no memory measurement: a
smoke run).
On a 2-core machine shared with other work the OpenMP threads wait on each other and every figure inflates;
the printed load average says how quiet the machine was.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C

from facenet_hf.losses import MINING_MODES, TripletLoss, pairwise_distances

MiB = 1024 * 1024
_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
_M_MMAP_THRESHOLD = -3


def _pml():
    """(miner, loss, version) from pytorch-metric-learning, or None when it is not installed."""
    try:
        import pytorch_metric_learning
        from pytorch_metric_learning import losses as pml_losses
        from pytorch_metric_learning import miners
    except ImportError:
        return None
    miner = miners.TripletMarginMiner(margin=0.2, type_of_triplets="semihard")
    return miner, pml_losses.TripletMarginLoss(margin=0.2), pytorch_metric_learning.__version__


def _keep_freed_memory() -> str:
    """Tell glibc to keep freed memory for reuse (no page faults on re-allocation); a note on what was done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 31)
    except (OSError, AttributeError) as err:
        return f"allocator left as is ({err})"
    return (
        "glibc keeps freed memory (mmap 1 GiB, trim 2 GiB)"
        if ok
        else "allocator left as is (mallopt refused)"
    )


class _RssPeak:
    """Peak resident-set growth of this process around a call (Linux /proc; see the module docstring)."""

    def __init__(self) -> None:
        self.available = False
        self.reason = ""
        try:
            self._libc = ctypes.CDLL("libc.so.6")
            self._libc.mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
            self._reset()
            self._read()
            self.available = True
        except (OSError, AttributeError, KeyError) as err:
            self.reason = f"RSS high-water mark unavailable: {err}"

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _read() -> dict[str, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    values[key] = int(value.split()[0]) * 1024
        return {"rss": values["VmRSS"], "hwm": values["VmHWM"]}

    def measure(self, fn: Callable[[], None]) -> float:
        gc.collect()
        self._libc.malloc_trim(0)
        self._reset()
        base = self._read()["rss"]
        fn()
        return (self._read()["hwm"] - base) / MiB


def _cuda_peak(fn: Callable[[], None], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / MiB


def _methods(x: torch.Tensor, labels: torch.Tensor, pml) -> dict[str, Callable[[], None]]:
    """Name -> one forward+backward."""

    def run(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            x.grad = None
            loss_fn().backward()

        return step

    def dist_fwd() -> None:
        with torch.no_grad():
            pairwise_distances(x)

    methods = {"floor": run(lambda: pairwise_distances(x).sum()), "dist_fwd": dist_fwd}
    for mode in MINING_MODES:
        loss = TripletLoss(margin=0.2, mining=mode)
        methods[mode] = run(lambda loss=loss: loss(x, labels)[0])
    if pml is not None:
        miner, pml_loss, _ = pml
        methods["pml_semihard"] = run(lambda: pml_loss(x, labels, miner(x, labels)))
    return methods


def _time(
    methods: dict[str, Callable[[], None]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Wall-clock ms per run: one warm-up each, then ``repeats`` rounds over all methods (interleaved, so that
    background load on a shared machine hits every method alike)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda *_: None)
    for fn in methods.values():
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(repeats):
        for name, fn in methods.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def _fmt(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.1f}{unit}"


def _tables(results: list[dict], sizes: list[int], names: list[str]) -> str:
    by = {(r["size"], r["method"]): r for r in results}
    ours = [n for n in names if n in MINING_MODES]
    has_pml = "pml_semihard" in names
    head = ["B", "floor ms", "dist fwd ms", *[f"{n} ms (x floor)" for n in ours]]
    if has_pml:
        head += ["pml semihard ms", "pml / our semihard"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for size in sizes:
        floor = by[(size, "floor")]["median_ms"]
        row = [str(size), _fmt(floor), _fmt(by[(size, "dist_fwd")]["median_ms"])]
        for n in ours:
            t = by[(size, n)]["median_ms"]
            row.append(f"{t:.1f} ({t / floor:.2f}x)")
        if has_pml:
            t = by[(size, "pml_semihard")]["median_ms"]
            row += [_fmt(t), f"{t / by[(size, 'semihard')]['median_ms']:.2f}x"]
        lines.append("| " + " | ".join(row) + " |")
    lines += [
        "",
        "| B | " + " | ".join(f"{n} peak MiB" for n in names) + " |",
        "|" + "---|" * (len(names) + 1),
    ]
    for size in sizes:
        lines.append(f"| {size} | " + " | ".join(_fmt(by[(size, n)]["peak_mib"]) for n in names) + " |")
    return "\n".join(lines)


FULL = {"sizes": "64,256,512,1024,1800", "dim": 128, "repeats": 3}
QUICK = {"sizes": "16,32", "dim": 16, "repeats": 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default=None,
        help=f"comma-separated batch sizes, multiples of k (default: {FULL['sizes']})",
    )
    parser.add_argument("--k", type=int, default=8, help="images per identity (P = B / k identities)")
    parser.add_argument("--dim", type=int, default=None, help=f"embedding dimension (default: {FULL['dim']})")
    parser.add_argument(
        "--repeats", type=int, default=None, help=f"timed runs after 1 warm-up (default: {FULL['repeats']})"
    )
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda, ...)")
    parser.add_argument(
        "--no-pml", action="store_true", help="skip pytorch-metric-learning even if installed"
    )
    parser.add_argument(
        "--no-memory", action="store_true", help="skip the peak-memory measurement (implied by --quick)"
    )
    C.add_common_args(parser, lfw=False)  # --quick, --out, --seed, --threads
    args = parser.parse_args(argv)
    C.resolve(args, FULL, QUICK)
    C.apply_threads(args)

    sizes = C.int_list(args.sizes)
    if not sizes or any(s % args.k or s < 2 * args.k for s in sizes):
        parser.error(f"every size must be a multiple of --k={args.k} and >= 2k, got {sizes}")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    device = torch.device(args.device)
    pml = None if args.no_pml else _pml()

    if device.type != "cpu":
        allocator = "CUDA caching allocator"
    elif args.quick:  # a smoke run (also run inside the test process): leave the allocator alone
        allocator = "allocator left as is (--quick)"
    else:
        allocator = _keep_freed_memory()
    env = C.environment()
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, dim {args.dim}, "
        f"k {args.k}, repeats {args.repeats} (median after 1 warm-up), load {env.get('loadavg_1m', 'n/a')}"
    )
    print(f"timing: {allocator}")
    if pml:
        print(
            f"pytorch-metric-learning {pml[2]}: TripletMarginMiner(semihard) + TripletMarginLoss, margin 0.2"
        )
    else:
        why = "skipped (--no-pml)" if args.no_pml else "not installed (pip install pytorch-metric-learning)"
        print(f"pytorch-metric-learning: {why}; its column is left out")

    def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(args.seed + size)
        emb = torch.nn.functional.normalize(torch.randn(size, args.dim, generator=gen), dim=1)
        labels = torch.arange(size // args.k).repeat_interleave(args.k).to(device)
        return emb.to(device).requires_grad_(True), labels

    results: list[dict] = []
    names: list[str] = []
    for size in sizes:
        x, labels = batch(size)
        methods = _methods(x, labels, pml)
        names = list(methods)
        timings = _time(methods, args.repeats, device)
        for name in methods:
            results.append(
                {
                    "size": size,
                    "method": name,
                    "median_ms": statistics.median(timings[name]),
                    "times_ms": timings[name],
                    "peak_mib": None,
                }
            )
            print(f"  B={size:5d} {name:13s} {statistics.median(timings[name]):9.1f} ms", flush=True)
        del methods, x
        gc.collect()

    peak: Callable[[Callable[[], None]], float | None] | None = None
    if args.no_memory or args.quick:
        memory_method = "not measured (--no-memory / --quick)"
    elif device.type == "cuda":
        memory_method = "torch.cuda.max_memory_allocated growth"
        peak = lambda fn: _cuda_peak(fn, device)  # noqa: E731
    else:
        rss = _RssPeak()  # switches glibc to mmap for blocks >= 128 KiB: after the timing
        if rss.available:
            memory_method = "process RSS high-water growth (/proc/self/clear_refs + VmHWM)"
            peak = rss.measure
        else:
            memory_method = rss.reason
    print(f"peak memory: {memory_method}")
    if peak is not None:
        by = {(r["size"], r["method"]): r for r in results}
        for size in sizes:
            x, labels = batch(size)
            for name, fn in _methods(x, labels, pml).items():
                fn()  # warm-up: lazy initialisation is not the method's memory
                by[(size, name)]["peak_mib"] = peak_mib = peak(fn)
                print(f"  B={size:5d} {name:13s} peak {_fmt(peak_mib, ' MiB')}", flush=True)
            del x
            gc.collect()

    print()
    print(_tables(results, sizes, names))
    meta = {
        **env,
        "loadavg_1m_end": C.environment().get("loadavg_1m"),
        "device": str(device),
        "dim": args.dim,
        "k": args.k,
        "repeats": args.repeats,
        "pml": pml[2] if pml else None,
        "memory_method": memory_method,
        "allocator": allocator,
    }
    C.write_json(args.out, {"meta": meta, "results": results})
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())

"""``facenet-hf export MODEL --out DIR``: an ONNX embedder folder, proven against PyTorch on real images."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from facenet_hf.cli.common import setup_logging

__all__ = ["main", "parser"]

EXAMPLE = """examples:
  facenet-hf export runs/r18/model --out r18-onnx
  facenet-hf export runs/r18/model --out r18-onnx --int8 --parity-images 'my_faces/**/*.jpg'
  facenet-hf evaluate r18-onnx --lfw-dir lfw/lfw-deepfunneled --pairs lfw/pairs.txt   # score the export

The folder holds model.onnx (dynamic batch, float32 NCHW RGB in, unit embeddings out), model.int8.onnx with
--int8, and facenet_export.json: input size, mean/std, eval steps, alignment, distance, threshold, the model
config and the parity figures (also in each ONNX file's metadata_props). Exit status: 0 exported; 1 not
exported (not a model, the exporter failed, parity above the tolerance, the export extra missing: nothing
written); 2 bad arguments. Run it with numpy + PIL + onnxruntime: facenet_hf.export.OnnxEmbedder, docs/deploy.md.
"""


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facenet-hf export",
        description="Export a FaceNet model (backbone + head + L2 normalisation) to ONNX with torch's dynamo "
        "exporter, check onnxruntime against PyTorch on real images at batch 1 and 17, and write the folder "
        "atomically (a failed export writes nothing).",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder (config.json + model.safetensors) or Hub repo id (cached)")
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format (default: onnx)")
    p.add_argument(
        "--parity-images",
        nargs="+",
        metavar="DIR_OR_GLOB",
        default=None,
        help="real face images for the parity check: folders, files or quoted globs (default: the bundled LFW "
        "sample, data/lfw_sample/lfw-deepfunneled)",
    )
    p.add_argument("--parity-count", type=int, default=34, help="images used, evenly spread (default 34)")
    p.add_argument(
        "--tolerance",
        type=_positive,
        default=1e-4,
        help="largest accepted |onnx - torch| of an embedding value (default 1e-4)",
    )
    p.add_argument(
        "--int8", action="store_true", help="also write model.int8.onnx (dynamic int8 quantisation)"
    )
    p.add_argument(
        "--int8-tolerance",
        type=_positive,
        default=None,
        help="fail if |int8 - torch| exceeds this (default: report the figure, do not fail)",
    )
    p.add_argument(
        "--int8-per-tensor",
        action="store_true",
        help="one int8 scale per weight tensor instead of per output channel",
    )
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch's recommended one)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only on success)")
    p.add_argument("--revision", default=None, help="Hub revision of MODEL")
    p.add_argument("--report-dir", default=None, help="write torch's exporter report (markdown) here")
    p.add_argument(
        "--json", action="store_true", help="print the result (facenet_export.json + paths) as JSON"
    )
    return p


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _print_summary(result: Any) -> None:
    meta = result.metadata
    fp32, files = meta["parity"]["fp32"], meta["files"]
    print(
        f"exported {meta['model_config']['backbone']} -> {result.onnx_path} ({_mb(files['fp32']['bytes'])}, opset "
        f"{meta['opset']}, dynamic batch, input {meta['input']['shape']} {meta['input']['layout']} RGB)"
    )
    e2e = fp32.get("end_to_end")
    print(
        f"parity on {fp32['images']} images ({meta['parity']['source']}): max |onnx - torch| "
        f"{fp32['batch_1']['max_abs_diff']:.2e} at batch 1, {fp32['batch_17']['max_abs_diff']:.2e} at batch 17"
        + (f", {e2e['max_abs_diff']:.2e} end to end (numpy preprocessing)" if e2e else "")
        + f"; tolerance {fp32['tolerance']:g}: ok"
    )
    if result.int8_path is not None:
        q = meta["parity"]["int8"]
        checked = (
            f"tolerance {q['tolerance']:g}: ok" if "tolerance" in q else "not checked (no --int8-tolerance)"
        )
        print(
            f"int8 -> {result.int8_path} ({_mb(files['int8']['bytes'])}): max |int8 - torch| "
            f"{q['max_abs_diff']:.2e}, mean cosine {q['mean_cosine']:.6f}, min {q['min_cosine']:.6f}; {checked}"
        )
    print(f"metadata: {result.out_dir / 'facenet_export.json'}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.parity_count < 1:
        parser().error("--parity-count must be >= 1")
    from facenet_hf.export.errors import ExportError, MissingExtraError, ParityError

    setup_logging()
    for noisy in ("onnxscript", "onnx_ir"):  # the exporter's optimiser logs every pass at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from facenet_hf.export.onnx_export import export_onnx

    try:
        result = export_onnx(
            args.model,
            args.out,
            parity_images=args.parity_images,
            parity_count=args.parity_count,
            tolerance=args.tolerance,
            int8=args.int8,
            int8_tolerance=args.int8_tolerance,
            int8_per_channel=not args.int8_per_tensor,
            opset=args.opset,
            overwrite=args.overwrite,
            revision=args.revision,
            report_dir=args.report_dir,
        )
    except (ExportError, MissingExtraError, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"facenet-hf export: {e}", file=sys.stderr)
        if args.json:
            parity = e.parity if isinstance(e, ParityError) else None
            print(json.dumps({"ok": False, "error": str(e), "parity": parity}, indent=2))
        return 1
    if args.json:
        print(json.dumps({"ok": True, **result.to_dict()}, indent=2))
    else:
        _print_summary(result)
    return 0

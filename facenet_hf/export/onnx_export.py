"""FaceNet -> ONNX with torch's current exporter (``torch.onnx.export(..., dynamo=True)``), proven against PyTorch.

:func:`export_onnx` writes a folder holding ``model.onnx`` (backbone + head + BatchNorm + L2 normalisation, a
dynamic batch dimension), optionally ``model.int8.onnx`` (onnxruntime's dynamic int8 quantisation), and
``facenet_export.json``: what a user needs to feed it (input size, mean/std, RGB, NCHW, the eval steps, the
alignment) and to decide with it (the distance and calibrated threshold, the whole model config), plus the
parity figures. The same facts are in each ONNX file's ``metadata_props`` (every value JSON-encoded).

The folder is built beside the target and renamed into place at the end: an export that fails (the exporter,
parity above the tolerance, a full disk) leaves no folder, and an existing one untouched.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from facenet_hf import __version__
from facenet_hf.constants import DEFAULT_EVAL_STEPS
from facenet_hf.export.errors import (
    ExportError,
    NotAModelError,
    ParityError,
    UnsupportedModelError,
    require,
)
from facenet_hf.export.parity import (
    DEFAULT_BATCHES,
    DEFAULT_PARITY_IMAGES,
    compare_embeddings,
    resolve_images,
)
from facenet_hf.export.runtime import (
    EXPORT_JSON,
    FORMAT,
    FORMAT_VERSION,
    INPUT_NAME,
    INT8_FILE,
    ONNX_FILE,
    OUTPUT_NAME,
    Preprocessor,
    is_export_folder,
)
from facenet_hf.fileio import atomic_write_text

__all__ = ["DEFAULT_TOLERANCE", "ExportError", "ExportResult", "export_metadata", "export_onnx", "load_model"]

logger = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 1e-4
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote: the folder, its files and ``facenet_export.json``'s content."""

    out_dir: Path
    onnx_path: Path
    int8_path: Path | None
    metadata: dict[str, Any]

    @property
    def parity(self) -> dict[str, Any]:
        return self.metadata["parity"]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "onnx": str(self.onnx_path),
            "int8": None if self.int8_path is None else str(self.int8_path),
            **self.metadata,
        }


def load_model(model: Any, *, revision: str | None = None) -> tuple[Any, str]:
    """A FaceNet instance, or a model folder / Hub repo id loaded with ``FaceNet.from_pretrained``; returns
    (a CPU float32 copy in eval mode, a description of the source). :class:`NotAModelError` otherwise."""
    from facenet_hf.model import FaceNet, InvalidConfigError

    if isinstance(model, FaceNet):
        return copy.deepcopy(model).to("cpu", torch.float32).eval(), f"<FaceNet {model.backbone_name}>"
    if not isinstance(model, (str, os.PathLike)):
        raise TypeError(f"expected a FaceNet, a model folder or a Hub repo id, got {type(model).__name__}")
    source = os.fspath(model)
    if is_export_folder(source):
        raise NotAModelError(
            f"{source} is an exported folder already ({EXPORT_JSON}); export the PyTorch model folder (the one "
            "with config.json and model.safetensors)"
        )
    if os.path.exists(source) and not os.path.isdir(source):
        raise NotAModelError(
            f"{source} is a file, not a FaceNet model folder (config.json + model.safetensors)"
        )
    try:
        net = FaceNet.from_pretrained(source, revision=revision)
    except (FileNotFoundError, InvalidConfigError, KeyError, ValueError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise NotAModelError(f"{source} is not a FaceNet model: {msg}") from e
    return net.to("cpu", torch.float32).eval(), source


def export_metadata(model: Any, *, source: str, opset: int | None) -> dict[str, Any]:
    """The facts an exported folder carries (``facenet_export.json`` without files and parity)."""
    cfg = model.config
    steps = model.eval_transforms if model.eval_transforms is not None else DEFAULT_EVAL_STEPS
    from facenet_hf.data.transforms import canonical_steps

    steps = canonical_steps(steps)
    s = int(model.image_size)
    try:
        pre = Preprocessor(steps, image_size=s, mean=model.mean, std=model.std)
        mean, std, numpy_ok = pre.mean, pre.std, True
    except ValueError:
        mean, std, numpy_ok = list(model.mean), list(model.std), False
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "input": {
            "name": INPUT_NAME,
            "shape": ["batch", 3, s, s],
            "layout": "NCHW",
            "dtype": "float32",
            "color_order": "RGB",
            "image_size": s,
            "mean": mean,
            "std": std,
            "scaling": "(pixel / 255 - mean) / std, pixel in 0..255",
        },
        "preprocessing": steps,
        "numpy_preprocessing": numpy_ok,
        "output": {
            "name": OUTPUT_NAME,
            "shape": ["batch", int(model.embedding_dim)],
            "dtype": "float32",
            "l2_normalized": True,
        },
        "alignment": model.alignment,
        "alignment_note": (
            "LFW deep-funneled style crops (face centred, about 60% of a 250 px square); no detection"
            if model.alignment is None
            else "five-point aligned crops: `facenet-hf align --size S --margin M --template T` with these values"
        ),
        "distance": model.distance,
        "threshold": model.threshold,
        "threshold_flip": model.threshold_flip,
        "model_config": cfg,
        "opset": opset,
        "created_by": _versions(),
    }


def _versions() -> dict[str, str]:
    out = {"facenet_hf": __version__, "torch": torch.__version__}
    for name in ("onnx", "onnxscript", "onnxruntime"):
        with contextlib.suppress(ImportError):
            out[name] = getattr(require(name), "__version__", "?")
    return out


def _metadata_props(meta: dict[str, Any]) -> dict[str, str]:
    """The ONNX ``metadata_props``: the same facts, every value JSON-encoded."""
    cfg = meta["model_config"]
    props = {
        "facenet_hf.format": meta["format"],
        "facenet_hf.format_version": meta["format_version"],
        "input_name": meta["input"]["name"],
        "output_name": meta["output"]["name"],
        "layout": "NCHW",
        "color_order": "RGB",
        "image_size": meta["input"]["image_size"],
        "mean": meta["input"]["mean"],
        "std": meta["input"]["std"],
        "embedding_dim": cfg["embedding_dim"],
        "l2_normalized": True,
        "preprocessing": meta["preprocessing"],
        "alignment": meta["alignment"],
        "distance": meta["distance"],
        "threshold": meta["threshold"],
        "threshold_flip": meta["threshold_flip"],
        "model_config": cfg,
        "library_version": __version__,
    }
    return {k: json.dumps(v, sort_keys=True) for k, v in props.items()}


def _set_props(path: Path, props: dict[str, str]) -> None:
    onnx = require("onnx")
    proto = onnx.load(str(path))
    merged = {p.key: p.value for p in proto.metadata_props}  # the exporter's own, if any, are kept
    onnx.helper.set_model_props(proto, {**merged, **props})
    proto.doc_string = "FaceNet embedder exported by facenet_hf: see the metadata_props / facenet_export.json"
    onnx.save(proto, str(path))
    onnx.checker.check_model(str(path))


def _summary(exc: BaseException) -> str:
    """The one line of a torch.onnx error that says what failed."""
    text = _ANSI.sub("", str(exc))
    lines = [ln.strip() for ln in text.splitlines()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1 :]
        found = next((ln for ln in after if ln), "")
        if found:
            return found[:500]
    return next((ln for ln in lines if ln), type(exc).__name__)[:500]


def _export_graph(model: Any, path: Path, *, opset: int | None, report_dir: str | None) -> int:
    """``torch.onnx.export(dynamo=True)`` with a dynamic batch; returns the default-domain opset."""
    onnx = require("onnx")
    require("onnxscript")
    s = int(model.image_size)
    # batch 2: torch.export treats a dimension of size 1 as a constant and would fix the batch to 1
    example = torch.zeros(2, 3, s, s)
    stdout = io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout):
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                opset_version=opset,
                external_data=False,
                optimize=True,
                verbose=False,
                report=report_dir is not None,
                artifacts_dir=report_dir or ".",
            )
            program.save(str(path), external_data=False)
    except (ImportError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        captured = (
            type(e).__name__ != "TorchExportError" and "torch.export" not in _ANSI.sub("", str(e))[:200]
        )
        stage = "translating the graph to ONNX" if captured else "capturing the model (torch.export)"
        raise UnsupportedModelError(
            f"torch.onnx.export(dynamo=True) (torch {torch.__version__}) cannot export backbone "
            f"{model.backbone_name!r}: it failed {stage}: {_summary(e)}. What to do: (1) check that "
            f"timm.create_model({model.backbone_name!r}) runs on a [2, 3, {s}, {s}] batch in eval mode; (2) upgrade "
            "torch, onnx and onnxscript (the exporter covers more models each release); (3) rerun with "
            "--report-dir DIR for the exporter's own report; (4) use a backbone that exports (resnet18/50, "
            "mobilenetv3_small_100, efficientnet_b0, convnext_atto, vit_tiny_patch16_224 did with torch 2.14) and "
            "retrain, or report the failure to PyTorch"
        ) from e
    finally:
        if stdout.getvalue().strip():
            logger.debug("torch.onnx.export output:\n%s", stdout.getvalue())
    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _session(path: Path) -> Any:
    ort = require("onnxruntime")
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _runner(session: Any):
    name_in, name_out = session.get_inputs()[0].name, session.get_outputs()[0].name
    return lambda x: session.run([name_out], {name_in: x})[0]


class _QuietQuantizer(logging.Filter):
    """onnxruntime's quantiser logs on the root logger: one INFO line per tensor, and advice to run its
    pre-processing (which fails on dynamo-exported graphs: symbolic shape inference of Expand); both dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "root" and record.levelno < logging.WARNING:
            return False
        return "consider to run pre-processing" not in record.getMessage()


def _quantize(src: Path, dst: Path, *, per_channel: bool) -> None:
    quantization = require("onnxruntime.quantization")
    root = logging.getLogger()
    hint, null = _QuietQuantizer(), logging.NullHandler()
    added = not root.handlers  # else logging.warning() would call basicConfig() on the caller's process
    root.addFilter(hint)
    if added:
        root.addHandler(null)
    try:
        quantization.quantize_dynamic(
            str(src), str(dst), weight_type=quantization.QuantType.QInt8, per_channel=per_channel
        )
    finally:
        root.removeFilter(hint)
        if added:
            root.removeHandler(null)


def _file_entry(path: Path) -> dict[str, Any]:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"path": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


@contextlib.contextmanager
def _staged_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """A fresh folder beside ``out``, renamed to ``out`` on success (replacing it with ``overwrite``), removed on
    any failure: ``out`` is the old folder or the complete new one, never half of one."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            if any(out.iterdir()) and not overwrite:  # appeared meanwhile
                raise FileExistsError(f"{out} exists and is not empty (overwrite to replace it)")
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def export_onnx(
    model: Any,
    out_dir: str | os.PathLike,
    *,
    parity_images: Sequence[str | os.PathLike] | None = None,
    parity_count: int = DEFAULT_PARITY_IMAGES,
    tolerance: float = DEFAULT_TOLERANCE,
    int8: bool = False,
    int8_tolerance: float | None = None,
    int8_per_channel: bool = True,
    opset: int | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    report_dir: str | os.PathLike | None = None,
) -> ExportResult:
    """Export ``model`` (a FaceNet, a model folder or a Hub repo id) to ``out_dir`` and prove it.

    Parity: onnxruntime vs PyTorch embeddings of ``parity_count`` real images (``parity_images``: folders, files
    or globs; None = the bundled LFW sample) at batch 1 and 17, and end to end through the numpy preprocessing;
    above ``tolerance`` (max abs difference) the export fails with :class:`ParityError` and writes nothing.
    ``int8``: also ``model.int8.onnx`` (onnxruntime ``quantize_dynamic``, QInt8 weights, per channel unless
    ``int8_per_channel=False``); its parity is reported, and only checked against ``int8_tolerance`` if given.
    Raises :class:`MissingExtraError` (the ``export`` extra), :class:`NotAModelError`,
    :class:`UnsupportedModelError` (the exporter failed), ``FileExistsError`` (``out_dir`` is not empty and not
    ``overwrite``).
    """
    for name in ("onnx", "onnxscript", "onnxruntime"):
        require(name)
    if not tolerance > 0:
        raise ValueError(f"tolerance must be > 0, got {tolerance}")
    if int8_tolerance is not None and not int8_tolerance > 0:
        raise ValueError(f"int8_tolerance must be > 0, got {int8_tolerance}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(
            f"{out} exists and is not empty: choose another folder or overwrite it (--overwrite)"
        )
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} is a file, not a folder")
    net, source = load_model(model, revision=revision)
    if (
        isinstance(model, (str, os.PathLike))
        and os.path.isdir(model)
        and out.resolve() == Path(model).resolve()
    ):
        raise ValueError(f"the output folder {out} is the model folder itself: choose another one")
    files, images_source = resolve_images(parity_images, parity_count)
    preprocessor: Preprocessor | None = None
    with _staged_folder(out, overwrite=overwrite) as tmp:
        onnx_path = tmp / ONNX_FILE
        used_opset = _export_graph(
            net, onnx_path, opset=opset, report_dir=None if report_dir is None else os.fspath(report_dir)
        )
        meta = export_metadata(net, source=source, opset=used_opset)
        props = _metadata_props(meta)
        _set_props(onnx_path, props)  # parity is measured on the very bytes that are shipped
        if meta["numpy_preprocessing"]:
            preprocessor = Preprocessor.from_metadata(meta)
        parity: dict[str, Any] = {"source": images_source, "batches": list(DEFAULT_BATCHES)}
        parity["fp32"] = compare_embeddings(
            net, _runner(_session(onnx_path)), files, preprocessor=preprocessor, tolerance=tolerance
        )
        meta["parity"] = parity
        logger.info(
            "parity fp32 on %d images: max |onnx - torch| %.3g (tolerance %g)",
            len(files),
            parity["fp32"]["max_abs_diff"],
            tolerance,
        )
        if not parity["fp32"]["passed"]:
            raise ParityError(
                f"onnxruntime's embeddings differ from PyTorch's by up to {parity['fp32']['max_abs_diff']:.3g} "
                f"(batch 1: {parity['fp32']['batch_1']['max_abs_diff']:.3g}, batch 17: "
                f"{parity['fp32']['batch_17']['max_abs_diff']:.3g}) on {len(files)} images, above the tolerance "
                f"{tolerance:g}: nothing was written. Check the model in eval mode, a newer torch/onnxruntime, or "
                "raise the tolerance if you accept the difference",
                parity,
            )
        meta["files"] = {"fp32": _file_entry(onnx_path)}
        int8_path = None
        if int8:
            int8_path = tmp / INT8_FILE
            _quantize(onnx_path, int8_path, per_channel=int8_per_channel)
            _set_props(int8_path, {**props, "quantization": json.dumps("dynamic int8 (onnxruntime)")})
            try:
                int8_session = _session(int8_path)
            except Exception as e:  # e.g. an old onnxruntime without int8-weight ConvInteger kernels
                raise ExportError(
                    f"onnxruntime {_versions().get('onnxruntime')} cannot run the int8 model: {_summary(e)}; "
                    "upgrade onnxruntime or export without --int8 (nothing was written)"
                ) from e
            parity["int8"] = compare_embeddings(
                net, _runner(int8_session), files, preprocessor=preprocessor, tolerance=int8_tolerance
            )
            parity["int8"]["method"] = {
                "quantize_dynamic": "onnxruntime.quantization",
                "weight_type": "QInt8",
                "per_channel": int8_per_channel,
            }
            logger.info(
                "parity int8: max |int8 - torch| %.3g, mean cosine %.6f",
                parity["int8"]["max_abs_diff"],
                parity["int8"]["mean_cosine"],
            )
            if int8_tolerance is not None and not parity["int8"]["passed"]:
                raise ParityError(
                    f"the int8 model's embeddings differ from PyTorch's by up to "
                    f"{parity['int8']['max_abs_diff']:.3g} (mean cosine {parity['int8']['mean_cosine']:.6f}), above "
                    f"the int8 tolerance {int8_tolerance:g}: nothing was written. Export without --int8, or "
                    "accept a larger int8 tolerance",
                    parity,
                )
            meta["files"]["int8"] = _file_entry(int8_path)
        atomic_write_text(tmp / EXPORT_JSON, json.dumps(meta, indent=2, sort_keys=True))
    return ExportResult(
        out_dir=out,
        onnx_path=out / ONNX_FILE,
        int8_path=None if int8_path is None else out / INT8_FILE,
        metadata=meta,
    )

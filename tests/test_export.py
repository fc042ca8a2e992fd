"""ONNX export (`facenet-hf export`): parity with PyTorch on real images at batch 1 and 17, the folder's metadata,
the torch-free runtime and the docs snippet, LFW scoring of an export, int8, and every way an export fails."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facenet_hf.cli import main as cli_main
from facenet_hf.data.images import load_image
from facenet_hf.data.lfw import read_pairs
from facenet_hf.data.transforms import build_transform
from facenet_hf.evaluation.lfw_eval import evaluate_lfw
from facenet_hf.export import (
    MissingExtraError,
    OnnxEmbedder,
    OnnxFaceNet,
    ParityError,
    Preprocessor,
    ReadOnlyExportError,
    UnsupportedModelError,
    check_parity,
    export_onnx,
)
from facenet_hf.model import FaceNet

ROOT = Path(__file__).resolve().parent.parent
TOL = 1e-4
THRESHOLD = 1.1


def sample_files(lfw_sample: Path, n: int = 20) -> list[Path]:
    files = sorted((lfw_sample / "lfw-deepfunneled").rglob("*.jpg"))
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small FaceNet (random weights are fine for parity) with non-trivial BatchNorm statistics."""
    torch.manual_seed(0)
    model = FaceNet(backbone="resnet18", embedding_dim=32, image_size=64, threshold=THRESHOLD)
    with torch.no_grad():
        model.bn.running_mean.normal_(0.0, 0.1)
        model.bn.running_var.uniform_(0.5, 2.0)
    folder = tmp_path_factory.mktemp("export") / "model"
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(model_dir) -> FaceNet:
    return FaceNet.from_pretrained(str(model_dir)).eval()


@pytest.fixture(scope="module")
def exported(model_dir) -> tuple[Path, dict]:
    """`facenet-hf export MODEL --out DIR --int8 --json`: the folder and the printed JSON."""
    out = model_dir.parent / "onnx"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = cli_main(["export", str(model_dir), "--out", str(out), "--int8", "--json"])
    assert rc == 0
    return out, json.loads(buf.getvalue())


def test_export_writes_the_folder_with_what_a_user_needs(exported, model):
    out, printed = exported
    assert printed["ok"] is True
    assert sorted(p.name for p in out.iterdir()) == ["facenet_export.json", "model.int8.onnx", "model.onnx"]
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no staging leftovers
    meta = json.loads((out / "facenet_export.json").read_text())
    assert meta["input"] == {
        "name": "pixel_values",
        "shape": ["batch", 3, 64, 64],
        "layout": "NCHW",
        "dtype": "float32",
        "color_order": "RGB",
        "image_size": 64,
        "mean": model.mean,
        "std": model.std,
        "scaling": "(pixel / 255 - mean) / std, pixel in 0..255",
    }
    assert meta["preprocessing"] == [{"face_crop": {"fraction": 0.6}}, {"resize": {}}]
    assert meta["alignment"] is None
    assert (meta["threshold"], meta["distance"], meta["threshold_flip"]) == (
        THRESHOLD,
        "squared_euclidean",
        "sum",
    )
    assert meta["model_config"] == json.loads(json.dumps(model.config))
    assert meta["output"] == {
        "name": "embeddings",
        "shape": ["batch", 32],
        "dtype": "float32",
        "l2_normalized": True,
    }
    for kind, name in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        entry = meta["files"][kind]
        data = (out / name).read_bytes()
        assert entry == {"path": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert meta["files"]["int8"]["bytes"] < 0.35 * meta["files"]["fp32"]["bytes"]
    # the parity figures of the export itself, on the bundled sample
    fp32 = meta["parity"]["fp32"]
    assert "lfw_sample" in meta["parity"]["source"] and fp32["images"] == 34
    for key in ("batch_1", "batch_17", "end_to_end"):
        assert fp32[key]["max_abs_diff"] <= TOL and fp32[key]["min_cosine"] > 0.99999
    assert fp32["end_to_end"]["preprocessing_max_abs_diff"] <= 1e-6
    assert fp32["passed"] is True and fp32["tolerance"] == TOL
    int8 = meta["parity"]["int8"]
    assert TOL < int8["max_abs_diff"] < 0.1 and int8["mean_cosine"] > 0.99
    assert "passed" not in int8 and int8["method"]["weight_type"] == "QInt8"
    assert printed["parity"] == meta["parity"]


def test_onnx_metadata_props_carry_the_same_facts(exported):
    import onnx
    import onnxruntime as ort

    out, _ = exported
    meta = json.loads((out / "facenet_export.json").read_text())
    for name in ("model.onnx", "model.int8.onnx"):
        proto = onnx.load(str(out / name))
        raw = {p.key: p.value for p in proto.metadata_props}  # the quantiser adds keys of its own
        ours = ("image_size", "color_order", "layout", "mean", "std", "alignment", "threshold", "distance")
        ours += ("threshold_flip", "model_config", "preprocessing", "input_name", "output_name")
        props = {k: json.loads(raw[k]) for k in ours}
        assert props["input_name"] == "pixel_values" and props["output_name"] == "embeddings"
        assert props["image_size"] == 64 and props["color_order"] == "RGB" and props["layout"] == "NCHW"
        assert props["mean"] == meta["input"]["mean"] and props["std"] == meta["input"]["std"]
        assert props["alignment"] is None and props["threshold"] == THRESHOLD
        assert props["distance"] == "squared_euclidean" and props["threshold_flip"] == "sum"
        assert props["model_config"] == meta["model_config"]
        assert props["preprocessing"] == meta["preprocessing"]
        (inp,) = proto.graph.input
        dims = inp.type.tensor_type.shape.dim
        assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]  # dynamic batch
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        custom = session.get_modelmeta().custom_metadata_map
        assert json.loads(custom["threshold"]) == THRESHOLD


def test_parity_at_batch_1_and_17_on_real_images(exported, model, lfw_sample):
    """Independent of the export's own report: onnxruntime run here on facenet_hf's preprocessing of 34 real
    images, one at a time and 17 at a time, against the PyTorch model."""
    import onnxruntime as ort

    out, _ = exported
    files = sample_files(lfw_sample, 34)
    x = model.preprocess(files, detect=False)
    with torch.inference_mode():
        ref = model(x).numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    one = np.concatenate([session.run(None, {"pixel_values": x[i : i + 1].numpy()})[0] for i in range(34)])
    seventeen = np.concatenate([session.run(None, {"pixel_values": c.numpy()})[0] for c in x.split(17)])
    assert seventeen.shape == one.shape == (34, 32)
    assert np.abs(one - ref).max() <= TOL
    assert np.abs(seventeen - ref).max() <= TOL
    np.testing.assert_allclose(np.linalg.norm(one, axis=1), 1.0, atol=1e-5)  # the L2 norm is in the graph


def test_onnx_embedder_is_the_model_end_to_end(exported, model, lfw_sample):
    out, _ = exported
    files = sample_files(lfw_sample, 12)
    embedder = OnnxEmbedder(out)
    # the numpy/PIL preprocessing is facenet_hf's, bit for bit on RGB JPEGs
    assert np.array_equal(embedder.preprocess(files), model.preprocess(files, detect=False).numpy())
    for flip in ("off", "sum", "concat"):
        got = embedder.embed(files, batch_size=5, flip=flip)
        ref = model.embed(files, batch_size=5, flip=flip, detect=False).numpy()
        assert got.shape == ref.shape and np.abs(got - ref).max() <= TOL
    same, d = embedder.verify(files[0], files[1])
    ref_same, ref_d = model.verify(files[0], files[1], detect=False)
    assert same == ref_same and d == pytest.approx(ref_d, abs=1e-5)
    assert embedder.threshold == THRESHOLD and embedder.alignment is None
    int8 = OnnxEmbedder(out, int8=True).embed(files)
    cos = np.sum(int8 * model.embed(files, detect=False).numpy(), axis=1)
    assert cos.min() > 0.99


def test_runtime_runs_without_torch(exported, model, lfw_sample, tmp_path):
    out, _ = exported
    files = [str(f) for f in sample_files(lfw_sample, 6)]
    code = (
        "import sys, json, numpy as np\n"
        "import facenet_hf.export, facenet_hf.cli.export\n"
        "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'onnxscript') if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
        "from facenet_hf.export import OnnxEmbedder\n"
        f"emb = OnnxEmbedder({str(out)!r}).embed(json.loads(sys.argv[1]), flip='sum')\n"
        f"np.save({str(tmp_path / 'emb.npy')!r}, emb)\n"
        "assert 'torch' not in sys.modules, 'the runtime imported torch'\n"
    )
    subprocess.run([sys.executable, "-c", code, json.dumps(files)], check=True, cwd=ROOT, timeout=120)
    got = np.load(tmp_path / "emb.npy")
    assert np.abs(got - model.embed(files, flip="sum", detect=False).numpy()).max() <= TOL


def test_the_deploy_snippet_in_the_docs_runs_and_matches_pytorch(exported, model, lfw_sample):
    out, _ = exported
    text = (ROOT / "docs" / "deploy.md").read_text()
    block = re.search(
        r"<!-- deploy-snippet: begin -->\n```python\n(.*?)```\n<!-- deploy-snippet: end -->", text, re.S
    )
    assert block, "docs/deploy.md lost its marked snippet"
    code = block.group(1)
    assert 'FOLDER = Path("r18-onnx")' in code
    namespace: dict = {}
    exec(
        compile(code.replace('Path("r18-onnx")', f"Path({str(out)!r})"), "docs/deploy.md", "exec"), namespace
    )
    files = sample_files(lfw_sample, 8)
    got = namespace["embed"](files)  # the flip mode the threshold was calibrated with ("sum")
    assert np.abs(got - model.embed(files, flip="sum", detect=False).numpy()).max() <= TOL
    for a, b in ((files[0], files[1]), (files[2], files[2])):
        same, d = namespace["verify"](a, b)
        ref_same, ref_d = model.verify(a, b, detect=False)
        assert same == ref_same and d == pytest.approx(ref_d, abs=1e-5)


def test_lfw_protocol_on_the_export_equals_pytorch(exported, model, lfw_sample, tmp_path, capsys):
    out, _ = exported
    pairs = read_pairs(lfw_sample / "pairs.txt")
    lfw = lfw_sample / "lfw-deepfunneled"
    kw = {"flip": "sum", "num_workers": 0, "progress": False, "batch_size": 64}
    ref_report, ref_d = evaluate_lfw(model, lfw, pairs, **kw)
    onnx_model = OnnxFaceNet(out)
    report, d = evaluate_lfw(onnx_model, lfw, pairs, **kw)
    assert np.abs(d - ref_d).max() <= 1e-5
    assert report["accuracy_mean"] == ref_report["accuracy_mean"]
    np.testing.assert_array_equal(report["fold_accuracy"], ref_report["fold_accuracy"])
    np.testing.assert_allclose(report["fold_threshold"], ref_report["fold_threshold"], atol=1e-5)
    # the CLI scores an exported folder the same way, and never changes it
    before = folder_digest(out)
    argv = ["--lfw-dir", str(lfw), "--pairs", str(lfw_sample / "pairs.txt"), "--num-workers", "0"]
    assert cli_main(["evaluate", str(out), *argv, "--out", str(tmp_path / "eval")]) == 0
    scored = json.loads((tmp_path / "eval" / "lfw_report.json").read_text())
    assert scored["accuracy_mean"] == pytest.approx(ref_report["accuracy_mean"])
    # DIR/model.int8.onnx scores the int8 model
    int8_argv = ["evaluate", str(out / "model.int8.onnx"), *argv, "--out", str(tmp_path / "eval8")]
    assert cli_main([*int8_argv, "--folds", "1", "2"]) == 0
    assert json.loads((tmp_path / "eval8" / "lfw_report.json").read_text())["folds"] == [1, 2]
    assert OnnxFaceNet(out / "model.int8.onnx").embedder.path.name == "model.int8.onnx"
    assert folder_digest(out) == before
    assert "accuracy" in capsys.readouterr().out
    with pytest.raises(ReadOnlyExportError, match="export it again"):
        onnx_model.write_config(out)


def test_preprocessor_matches_facenet_hf_on_other_steps(lfw_sample):
    img = load_image(sample_files(lfw_sample, 1)[0]).crop((10, 30, 240, 200))  # 230 x 170, not square
    steps_list = [
        [{"square_pad": {}}, {"center_crop": {"size": 200}}, {"resize": {"size": 48, "keep_aspect": True}}],
        [{"square_pad": {"padding_mode": "reflect"}}, {"resize": {"interpolation": "bicubic"}}, "normalize"],
        [{"center_crop": {"size": [240, 180]}}, {"normalize": {"mode": "fixed"}}],
        [{"face_crop": {"fraction": 0.5}}, {"resize": {"size": 40, "keep_aspect": True}}],
    ]
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    for steps in steps_list:
        ref = build_transform(steps, image_size=48, mean=mean, std=std)(img).numpy()
        canonical = [s if isinstance(s, dict) else {s: {}} for s in steps]
        got = Preprocessor(canonical, image_size=48, mean=mean, std=std)(img)
        assert got.shape == ref.shape == (3, 48, 48)
        assert np.abs(got - ref).max() <= 1e-6, steps
    with pytest.raises(ValueError, match="no numpy implementation"):
        Preprocessor([{"hflip": {}}], image_size=48, mean=mean, std=std)


def test_export_refuses_what_is_not_a_model(exported, tmp_path, capsys, lfw_sample):
    out, _ = exported
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        empty: "not a FaceNet model",
        lfw_sample / "lfw-deepfunneled": "not a FaceNet model",
        lfw_sample / "pairs.txt": "is a file",
        out: "exported folder already",
    }
    for source, message in cases.items():
        target = tmp_path / f"out_{source.name}"
        assert cli_main(["export", str(source), "--out", str(target)]) == 1
        err = capsys.readouterr().err
        assert message in err and err.startswith("facenet-hf export: ")
        assert not target.exists()


def test_export_without_the_extra_says_how_to_install_it(monkeypatch, model_dir, exported, tmp_path, capsys):
    out, _ = exported
    for missing in ("onnxruntime", "onnxscript", "onnx"):
        with monkeypatch.context() as m:
            m.setitem(sys.modules, missing, None)  # `import missing` raises ImportError
            target = tmp_path / f"out_{missing}"
            assert cli_main(["export", str(model_dir), "--out", str(target)]) == 1
            err = capsys.readouterr().err
            assert f"{missing} is not installed" in err and "pip install 'facenet-hf[export]'" in err
            assert not target.exists()
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "onnxruntime", None)
        with pytest.raises(MissingExtraError, match=re.escape("pip install 'facenet-hf[export]'")):
            OnnxEmbedder(out)


class DataDependentBackbone(nn.Module):
    """A backbone whose control flow depends on the pixel values: torch.export cannot capture it."""

    num_features = 8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = x.mean(dim=(2, 3)).repeat(1, 3)[:, :8]
        return feats * 2 if int((x > 0).sum().item()) > 10 else feats


def test_unsupported_backbone_is_explained(tmp_path):
    model = FaceNet(backbone="resnet18", embedding_dim=8, image_size=32).eval()
    model.backbone = DataDependentBackbone()
    model.head = nn.Linear(8, 8)
    out = tmp_path / "bad"
    with pytest.raises(UnsupportedModelError) as info:
        export_onnx(model, out)
    msg = str(info.value)
    assert "cannot export backbone 'resnet18'" in msg and "torch.export" in msg
    assert "What to do" in msg and "--report-dir" in msg and "data-dependent" in msg
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_parity_failure_writes_nothing_and_keeps_the_old_folder(model_dir, exported, tmp_path, capsys):
    out, _ = exported
    before = folder_digest(out)
    argv = ["export", str(model_dir), "--out", str(out), "--overwrite", "--int8", "--int8-tolerance", "1e-6"]
    assert cli_main([*argv, "--json"]) == 1
    captured = capsys.readouterr()
    assert "above the int8 tolerance 1e-06: nothing was written" in captured.err
    printed = json.loads(captured.out)
    assert printed["ok"] is False and printed["parity"]["int8"]["passed"] is False
    assert printed["parity"]["fp32"]["passed"] is True
    assert folder_digest(out) == before
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []
    # the fp32 tolerance, through the library
    target = tmp_path / "strict"
    with pytest.raises(ParityError, match="above the tolerance") as info:
        export_onnx(model_dir, target, tolerance=1e-12, parity_count=17)
    assert info.value.parity["fp32"]["batch_17"]["max_abs_diff"] > 1e-12
    assert not target.exists() and list(tmp_path.iterdir()) == []
    # an existing folder without --overwrite: refused before any work
    assert cli_main(["export", str(model_dir), "--out", str(out)]) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert folder_digest(out) == before


def test_export_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["export", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert (
        "examples:" in text and "facenet-hf export runs/r18/model --out r18-onnx" in text and "--json" in text
    )


@pytest.mark.lfw
def test_parity_on_64_real_lfw_images(exported, model, full_lfw):
    out, _ = exported
    p1, p2 = read_pairs(full_lfw / "pairs.txt").paths()
    unique = sorted(set(p1) | set(p2))
    files = [
        full_lfw / "lfw-deepfunneled" / unique[i] for i in np.linspace(0, len(unique) - 1, 64).astype(int)
    ]
    report = check_parity(model, out, files, count=64, tolerance=TOL)
    assert report["images"] == 64 and report["passed"] is True
    for key in ("batch_1", "batch_17", "end_to_end"):
        assert report[key]["max_abs_diff"] <= TOL


def test_metadata_of_a_five_point_model_names_its_alignment():
    from facenet_hf.export.onnx_export import export_metadata
    from facenet_hf.faces import AlignmentSpec

    spec = AlignmentSpec(size=112, margin=0.0, template="arcface").to_dict()
    model = FaceNet(
        backbone="resnet18", embedding_dim=8, image_size=112, alignment=spec, eval_transforms=["resize"]
    )
    meta = export_metadata(model, source="x", opset=20)
    assert meta["alignment"] == spec and meta["model_config"]["alignment"] == spec
    assert meta["preprocessing"] == [{"resize": {}}] and meta["numpy_preprocessing"] is True
    assert "facenet-hf align" in meta["alignment_note"]
    hflip = FaceNet(
        backbone="resnet18", embedding_dim=8, image_size=64, eval_transforms=[{"hflip": {"p": 1.0}}]
    )
    assert export_metadata(hflip, source="x", opset=20)["numpy_preprocessing"] is False

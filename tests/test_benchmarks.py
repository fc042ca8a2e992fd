"""Smoke tests of the benchmark scripts: each ``main(["--quick", ...])`` on the bundled LFW sample (seconds each)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _keep_threads():
    """The scripts' --quick sets torch's thread count for the process: give it back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_bench(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` (benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lfw_args(sample: Path) -> list[str]:
    return ["--lfw-dir", str(sample / "lfw-deepfunneled"), "--pairs", str(sample / "pairs.txt")]


def test_train_step(lfw_sample, tmp_path, capsys):
    out = tmp_path / "train.json"
    assert load_bench("bench_train_step").main(["--quick", *lfw_args(lfw_sample), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"full", "floor", "reference"}
    for res in data["results"].values():
        assert res["images_per_second"] > 0 and res["step_ms_median"] > 0
        assert res["rounds"][0]["timed_steps"] == 2
    assert data["results"]["full"]["rounds"][0]["engine_images_per_second"] > 0
    assert set(data["ratios"]) == {"full/floor", "full/reference"}
    assert data["meta"]["train_people"] == 192  # the sample's people outside fold 10
    text = capsys.readouterr().out
    assert "| method | img/s | ms/step (median) | x floor | full / this |" in text
    assert "full/floor = " in text and "full/reference = " in text


def test_data(lfw_sample, tmp_path, capsys):
    out = tmp_path / "data.json"
    bench = load_bench("bench_data")
    assert bench.main(["--quick", "--lfw-dir", str(lfw_sample / "lfw-deepfunneled"), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["num_workers"] for r in data["results"]] == [0, 1, 2]
    for row in data["results"]:
        assert row["hf_images_per_second"] > 0 and row["torchvision_images_per_second"] > 0
        assert row["hf/torchvision"] == pytest.approx(
            row["hf_images_per_second"] / row["torchvision_images_per_second"]
        )
    stages = data["breakdown_us_per_image"]
    for key in ("decode", "augment", "batch: decode + augment + stack", "batch: dataset + collate"):
        assert set(stages[key]) == {"hf", "torchvision"}
    assert any(k.startswith("hf op 1: ") for k in stages)
    assert "| num_workers | hf img/s | torchvision img/s | hf / torchvision |" in capsys.readouterr().out


def test_eval(lfw_sample, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert load_bench("bench_eval").main(["--quick", *lfw_args(lfw_sample), "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["protocol"]["pairs"] == 6000 and data["protocol"]["folds"] == 10
    assert data["protocol"]["median_ms"] > 0 and len(data["protocol"]["times_ms"]) == 3
    bare, embed = data["embed"]
    assert bare["method"] == "bare" and embed["method"] == "embed_files" and embed["num_workers"] == 0
    assert embed["embed/bare"] == pytest.approx(embed["images_per_second"] / bare["images_per_second"])
    text = capsys.readouterr().out
    assert "| protocol | pairs | folds | median ms |" in text and "| embedding (flip off) |" in text


def test_index(tmp_path, capsys):
    out = tmp_path / "index.json"
    assert load_bench("bench_index").main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["rows"] for r in data["results"]] == [2000, 6600]
    for r in data["results"]:
        assert r["images_opened"] == 0
        assert r["batches"] == r["rows"] // 64
        for key in ("labels_of_s", "sampler_init_s", "epoch_plan_s", "epoch_iter_s", "index_peak_mib"):
            assert r[key] > 0
    assert "tracemalloc" in data["meta"]["memory_method"]
    assert "images opened: 0" in capsys.readouterr().out


def test_index_dataset_has_no_real_image(tmp_path):
    bench = load_bench("bench_index")
    ds = bench.make_dataset(1000, 7, seed=0)
    assert len(ds) == 1000 and ds.column_names == ["image", "label", "identity", "path"]
    row = ds[999]
    assert row["image"]["bytes"] is None and row["image"]["path"].startswith(bench.FAKE_ROOT)
    assert not Path(bench.FAKE_ROOT).exists()


def test_gpu_script_cpu_side(tmp_path, capsys):
    bench = load_bench("bench_gpu")
    assert bench.main(["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "112px 16x4 compile off" in plan and "224px 8x8 compile on" in plan
    if not torch.cuda.is_available():
        assert bench.main([]) == 2  # no GPU: says so, runs nothing
    out = tmp_path / "gpu.json"
    assert bench.main(["--quick", "--device", "cpu", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    (res,) = data["results"]
    assert res["compile"] == "off" and res["images_per_second"] > 0
    with pytest.raises(SystemExit):
        bench.main(["--compile", "sometimes", "--dry-run"])


def test_optimizer(tmp_path, capsys):
    out = tmp_path / "opt.json"
    assert load_bench("bench_optimizer").main(["--quick", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["optimizer"] for r in rows} == {"adamw", "adam", "sgd"} and len(rows) == 9
    assert all(r["median_ms"] > 0 for r in rows)
    ours = [r for r in rows if r["implementation"].startswith("build_optimizer")]
    assert all("fused=True" in r["implementation"] for r in ours)  # CPU has the fused kernels
    assert "| optimizer | implementation | step ms (median) | x the for-loop |" in capsys.readouterr().out


def test_align(lfw_sample, tmp_path, capsys):
    out = tmp_path / "align.json"
    assert load_bench("bench_align").main(["--quick", *lfw_args(lfw_sample), "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"detect_batched", "detect_single", "align_batched", "align_single", "warp"}
    assert all(r["images_per_second"] > 0 for r in results.values())
    assert "batched / one by one" in capsys.readouterr().out


def test_identify(tmp_path, capsys):
    out = tmp_path / "identify.json"
    argv = ["--quick", "--rows", "2000", "--queries", "64", "--single-queries", "8", "--out", str(out)]
    assert load_bench("bench_identify").main(argv) == 0
    data = json.loads(out.read_text())
    rows = {(r["backend"], r["batch_size"]): r for r in data["results"]}
    assert set(rows) == {(b, n) for b in ("exact", "faiss", "faiss-hnsw") for n in (1, 64)}
    assert all(r["queries_per_second"] > 0 for r in rows.values())
    assert rows[("exact", 1)]["queries"] == 8 and rows[("exact", 64)]["queries"] == 64
    # faiss's flat index is exact: the same people as the torch search; HNSW is measured against it
    assert rows[("faiss", 64)]["top1_agreement"] == 1.0 and rows[("faiss", 64)]["topk_overlap"] == 1.0
    assert 0.0 <= rows[("faiss-hnsw", 64)]["top1_agreement"] <= 1.0 and rows[("faiss-hnsw", 1)]["build_s"] > 0
    assert data["meta"]["gallery_people"] == 200 and data["meta"]["file"]["load_s"] > 0
    assert set(data["ratios"]) == {
        "faiss/exact@1",
        "faiss-hnsw/exact@1",
        "faiss/exact@64",
        "faiss-hnsw/exact@64",
    }
    assert (
        "| backend | batch | queries/s | ms/query | build s | top-1 = exact | top-5 overlap |"
        in capsys.readouterr().out
    )


def test_export(tmp_path, capsys):
    out = tmp_path / "export.json"
    assert load_bench("bench_export").main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [(r["batch"], r["method"]) for r in rows] == [
        (b, m) for b in (1, 4) for m in ("torch_eager", "onnx_fp32", "onnx_int8")
    ]
    assert all(r["images_per_second"] > 0 and len(r["times_s"]) == 2 for r in rows)
    assert data["parity"]["onnx_fp32"]["max_abs_diff"] <= 1e-4
    assert data["parity"]["onnx_int8"]["mean_cosine"] > 0.99
    assert data["files"]["onnx_int8"]["bytes"] < data["files"]["onnx_fp32"]["bytes"]
    text = capsys.readouterr().out
    assert "| batch | method | img/s | ms/batch (median) | x torch eager |" in text


def test_cluster(tmp_path, capsys):
    import numpy as np

    out = tmp_path / "cluster.json"
    bench = load_bench("bench_cluster")
    assert bench.main(["--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["results"]] == list(bench.METHODS)
    for r in data["results"]:
        assert r["seconds"] > 0 and r["n_items"] == 600
        assert all(0 <= r[k] <= 1 for k in ("pairwise_f1", "bcubed_f1", "nmi"))
    best = {r["method"]: r["bcubed_f1"] for r in data["results"]}
    assert best["agglomerative"] > 0.9 and data["synthetic"]["verification_accuracy"] > 0.95
    assert bench.identity_sizes(1000, 100, np.random.default_rng(0)).sum() == 1000
    assert "| method | faces | seconds | clusters |" in capsys.readouterr().out


def test_listing(tmp_path, capsys):
    out = tmp_path / "listing.json"
    assert (
        load_bench("bench_listing").main(["--quick", "--work", str(tmp_path / "w"), "--out", str(out)]) == 0
    )
    data = json.loads(out.read_text())
    rows = {r["method"]: r for r in data["results"]}
    assert set(rows) == {"imports", "folder", "parquet"}
    # both routes see every generated file, as the same identities
    assert rows["folder"]["rows"] == rows["parquet"]["rows"] == data["meta"]["files"] == 2000
    assert data["pack"]["shards"] == 4 and all(r["seconds"] > 0 for r in rows.values())
    assert "| method | start | seconds to a ready P x K index |" in capsys.readouterr().out

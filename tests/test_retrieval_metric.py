"""Retrieval metrics vs a brute-force loop, the offline ``evaluate`` metric, embedding files and pair distances."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from facenet_hf.evaluation.embeddings_io import load_embeddings, pair_distances, save_embeddings
from facenet_hf.evaluation.retrieval import retrieval_metrics

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------------------------
# retrieval


def brute_force(x: np.ndarray, labels: np.ndarray, squared: bool = True) -> dict[str, float]:
    """Musgrave et al. definitions, one query at a time, ties broken by the smaller index."""
    p1, rp, mapr = [], [], []
    for q in range(len(x)):
        r = int(np.sum(labels == labels[q])) - 1
        if r == 0:
            continue
        others = [j for j in range(len(x)) if j != q]
        dist = {j: float(np.sum((x[q] - x[j]) ** 2)) for j in others}
        if not squared:
            dist = {j: np.sqrt(v) for j, v in dist.items()}
        ranked = sorted(others, key=lambda j: (dist[j], j))
        rel = [labels[j] == labels[q] for j in ranked]
        p1.append(float(rel[0]))
        rp.append(sum(rel[:r]) / r)
        mapr.append(sum(sum(rel[: i + 1]) / (i + 1) for i in range(r) if rel[i]) / r)
    return {"precision_at_1": np.mean(p1), "r_precision": np.mean(rp), "map_at_r": np.mean(mapr)}


def test_retrieval_hand_computed():
    # 1-D points; query 11 sees 10 (class a) and 12 (class b) at distance 1: the tie goes to index 2 (class a)
    x = np.array([[0.0], [1.0], [10.0], [11.0], [12.0], [100.0]])
    labels = np.array(["a", "b", "a", "b", "b", "c"])
    r = retrieval_metrics(x, labels)
    assert r["precision_at_1"] == pytest.approx(1 / 5)
    assert r["r_precision"] == pytest.approx((0.5 + 0.5) / 5)
    assert r["map_at_r"] == pytest.approx((0.25 + 0.5) / 5)
    assert (r["n_queries"], r["n_excluded"], r["n_embeddings"], r["n_classes"]) == (5, 1, 6, 3)


@pytest.mark.parametrize(
    ("kind", "squared", "chunk_rows"), [("float", True, 7), ("float", False, 1000), ("ties", True, 5)]
)
def test_retrieval_matches_brute_force(kind, squared, chunk_rows):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 90)
    labels[:3] = [100, 101, 102]  # singletons: never queries, still in the gallery
    if kind == "float":
        x = rng.normal(size=(12, 8))[labels % 12] + rng.normal(size=(90, 8))
    else:  # small integer grid: exact distances with many ties, also across the top-R boundary
        x = rng.integers(0, 2, size=(90, 3)).astype(np.float64)
    r = retrieval_metrics(x, labels, squared=squared, max_chunk_bytes=8 * 90 * chunk_rows)
    ref = brute_force(x, labels, squared)
    for key, value in ref.items():
        assert r[key] == pytest.approx(value, abs=1e-12), key
    assert r["n_queries"] == 87 and r["n_excluded"] == 3


def test_retrieval_errors():
    with pytest.raises(ValueError, match="at least one class with 2 or more"):
        retrieval_metrics(np.eye(3), [0, 1, 2])
    with pytest.raises(ValueError, match="one label per embedding"):
        retrieval_metrics(np.eye(3), [0, 1])
    with pytest.raises(ValueError, match="2-D"):
        retrieval_metrics(np.ones(3), [0, 0, 1])


# ---------------------------------------------------------------------------------------------------------------
# evaluate metric, offline

_METRIC_SCRIPT = """
import json, sys
import numpy as np
from facenet_hf.evaluation.metric import FaceVerification
from facenet_hf.evaluation.verification import report_to_json, verification_protocol
rng = np.random.default_rng(0)
y = np.tile(np.r_[np.ones(30), np.zeros(30)], 10).astype(bool)
folds = np.repeat(np.arange(1, 11), 60)
d = np.where(y, rng.normal(0.8, 0.3, 600), rng.normal(1.5, 0.3, 600))
metric = FaceVerification(cache_dir=sys.argv[1])
one = metric.compute(predictions=d, references=y.astype(int), folds=folds)
for i in range(0, 600, 128):
    metric.add_batch(predictions=d[i:i + 128], references=y[i:i + 128].astype(int))
batched = metric.compute(folds=folds, far_target=1e-2)
held_out = metric.compute(predictions=d.tolist(), references=y.astype(int).tolist(), folds=folds, eval_folds=[3])
print(json.dumps({
    "name": metric.name,
    "one": one,
    "batched": batched,
    "held_out": held_out,
    "ref": report_to_json(verification_protocol(d, y, folds)),
    "ref_batched": report_to_json(verification_protocol(d, y, folds, far_target=1e-2)),
}, allow_nan=False))
"""


def test_face_verification_metric_offline(tmp_path):
    pytest.importorskip("evaluate")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["HF_HOME"] = str(tmp_path / "hf_home")
    proc = subprocess.run(
        [sys.executable, "-c", _METRIC_SCRIPT, str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["name"] == "face_verification"
    assert out["one"] == out["ref"]
    assert out["batched"] == out["ref_batched"]
    assert (
        out["held_out"]["protocol"]
        == "held-out fold 3, threshold by 10-fold cross-validation within the fold"
    )
    assert all(isinstance(v, (int, float, str, list)) for v in out["one"].values())


# ---------------------------------------------------------------------------------------------------------------
# embedding files


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_embeddings_roundtrip(tmp_path, suffix):
    rng = np.random.default_rng(0)
    paths = [f"Person_{i}/Person_{i}_0001.jpg" for i in range(7)]
    emb = rng.normal(size=(7, 5))
    out = save_embeddings(tmp_path / "sub" / f"emb{suffix}", paths, emb)
    got_paths, got = load_embeddings(out)
    assert got_paths == paths
    assert got.dtype == np.float32 and got.shape == (7, 5)
    np.testing.assert_array_equal(got, emb.astype(np.float32))
    assert sorted(p.name for p in out.parent.iterdir()) == [f"emb{suffix}"]  # no temporary file left


def test_parquet_layout_and_missing_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    out = save_embeddings(tmp_path / "e.parquet", ["a.jpg", "b.jpg"], np.ones((2, 3)))
    table = pq.read_table(out)
    assert table.schema.field("path").type == pa.string()
    assert pa.types.is_list(table.schema.field("embedding").type)
    assert table.column("embedding").to_pylist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    pq.write_table(pa.table({"file": ["a.jpg"], "embedding": [[1.0, 2.0]]}), tmp_path / "bad.parquet")
    with pytest.raises(
        KeyError, match=r"bad\.parquet.*missing column\(s\) \['path'\].*found \['file', 'embedding'\]"
    ):
        load_embeddings(tmp_path / "bad.parquet")
    pq.write_table(
        pa.table({"path": ["a", "b"], "embedding": [[1.0, 2.0], [1.0]]}), tmp_path / "ragged.parquet"
    )
    with pytest.raises(ValueError, match="same length"):
        load_embeddings(tmp_path / "ragged.parquet")


def test_embedding_file_errors(tmp_path):
    np.savez(tmp_path / "bad.npz", names=np.array(["a"]), embeddings=np.ones((1, 2)))
    with pytest.raises(
        KeyError, match=r"bad\.npz.*missing array\(s\) \['paths'\].*found \['embeddings', 'names'\]"
    ):
        load_embeddings(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match=r"suffix '\.pt'.*\['\.npz', '\.parquet'\]"):
        save_embeddings(tmp_path / "e.pt", ["a"], np.ones((1, 2)))
    with pytest.raises(ValueError, match="2 paths but 1 embedding rows"):
        save_embeddings(tmp_path / "e.npz", ["a", "b"], np.ones((1, 2)))
    with pytest.raises(ValueError, match="unique"):
        save_embeddings(tmp_path / "e.npz", ["a", "a"], np.ones((2, 2)))
    with pytest.raises(FileNotFoundError, match=r"nothing\.npz"):
        load_embeddings(tmp_path / "nothing.npz")


def test_pair_distances():
    emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    paths = ["a", "b", "c"]
    d = pair_distances(paths, emb, ["a", "a", "c"], ["b", "c", "c"])
    np.testing.assert_allclose(d, [2.0, 0.16 + 0.64, 0.0])
    d_plain = pair_distances({"a": 0, "b": 1, "c": 2}, emb, ["a"], ["b"], squared=False)
    np.testing.assert_allclose(d_plain, [np.sqrt(2.0)])
    # no silent renormalisation, unless asked
    np.testing.assert_allclose(pair_distances(paths, 2 * emb, ["a"], ["b"]), [8.0])
    np.testing.assert_allclose(pair_distances(paths, 2 * emb, ["a"], ["b"], normalize=True), [2.0])


def test_pair_distances_missing_paths_listed():
    emb = np.eye(3)
    wanted = [f"x{i}" for i in range(8)]
    with pytest.raises(
        KeyError, match=r"8 pair path\(s\) have no embedding, e\.g\. \['x0', 'x1', 'x2', 'x3', 'x4'\]"
    ):
        pair_distances(["a", "b", "c"], emb, wanted, ["a"] * 8)
    with pytest.raises(ValueError, match="equal length"):
        pair_distances(["a", "b", "c"], emb, ["a"], ["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        pair_distances(["a", "a", "c"], emb, ["a"], ["c"])

"""`facenet-hf cluster` end to end on the bundled sample's images, and the clustering library under it: the
threshold rule (merge iff linkage distance <= the verification threshold) against brute-force linkage loops."""

from __future__ import annotations

import csv
import itertools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facenet_hf.apps.cluster import (
    NOISE,
    cluster_embeddings,
    contact_sheet,
    copy_clusters,
    model_threshold,
    relabel_by_size,
    threshold_graph,
    unit_embeddings,
    write_assignments,
)
from facenet_hf.cli import main as cli_main
from facenet_hf.evaluation import EmbeddingTable, write_table
from facenet_hf.model import FaceNet

THRESHOLD = (
    0.5  # squared Euclidean; the synthetic people below sit ~2 apart, their images ~0.01 from each other
)


def sample_people(sample: Path) -> dict[str, list[Path]]:
    """6 people of 5 images, 4 of 4, 4 of 2 and 6 of 1 from the sample (60 images)."""
    root = sample / "lfw-deepfunneled"
    by_count: dict[int, list[str]] = {}
    for d in sorted(root.iterdir()):
        by_count.setdefault(len(list(d.iterdir())), []).append(d.name)
    chosen = by_count[5][:6] + by_count[4][:4] + by_count[2][:4] + by_count[1][:6]
    return {name: sorted((root / name).iterdir()) for name in chosen}


def synthetic_table(sample: Path, *, dim: int = 32, noise: float = 0.02, seed: int = 0) -> EmbeddingTable:
    """Real image paths of the sample, embeddings = one random unit centre per person + small noise."""
    rng = np.random.default_rng(seed)
    paths, ids, rows = [], [], []
    for name, files in sample_people(sample).items():
        centre = rng.normal(size=dim)
        for f in files:
            v = centre / np.linalg.norm(centre) + noise * rng.normal(size=dim) / np.sqrt(dim)
            paths.append(str(f))
            ids.append(name)
            rows.append(v / np.linalg.norm(v))
    return EmbeddingTable(paths, np.asarray(rows, np.float32), ids)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def groups(keys, labels) -> set[frozenset]:
    out: dict = {}
    for k, lab in zip(keys, labels, strict=True):
        out.setdefault(lab, set()).add(k)
    return {frozenset(v) for v in out.values()}


@pytest.fixture(scope="module")
def table(lfw_sample) -> EmbeddingTable:
    return synthetic_table(lfw_sample)


@pytest.fixture(scope="module")
def table_file(table, tmp_path_factory) -> Path:
    return write_table(tmp_path_factory.mktemp("emb") / "faces.parquet", table)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model"
    FaceNet(backbone="resnet18", embedding_dim=32, image_size=32, threshold=THRESHOLD).eval().save_pretrained(
        path
    )
    return path


# -- the CLI ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["agglomerative", "chinese_whispers", "hdbscan"])
def test_cli_recovers_the_known_people(method, table, table_file, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["cluster", str(table_file), "--out", str(out), "--method", method, "--threshold", str(THRESHOLD)]
    assert cli_main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = read_csv(out / "assignments.csv")
    assert list(rows[0]) == ["path", "face_index", "cluster", "identity"]
    assert [r["path"] for r in rows] == table.paths and {r["face_index"] for r in rows} == {"-1"}
    assert [r["identity"] for r in rows] == table.identities
    labels = np.array([int(r["cluster"]) for r in rows])
    people = groups(table.paths, table.identities)
    if method == "hdbscan":  # a person seen once is no dense group: noise
        singles = {p for g in people if len(g) == 1 for p in g}
        assert {p for p, lab in zip(table.paths, labels, strict=True) if lab == NOISE} == singles
        kept = labels != NOISE
        assert groups(np.array(table.paths)[kept], labels[kept]) == {g for g in people if len(g) > 1}
        assert summary["noise"] == 6 and summary["threshold"] == THRESHOLD
    else:
        assert groups(table.paths, labels) == people
        assert summary["noise"] == 0 and summary["threshold"] == THRESHOLD
    # cluster 0 is the largest; the summary agrees with the CSV
    assert summary["largest_clusters"][0] == 5 and np.sum(labels == 0) == 5
    assert summary["clusters"] == len(set(labels) - {NOISE}) and summary["rows"] == 60
    m = summary["metrics"]
    assert m["pairwise_f1"] == m["bcubed_f1"] == 1.0 and m["nmi"] == pytest.approx(1.0)
    assert m["n_classes"] == 20 and m["labelled_rows"] == 60
    assert json.loads((out / "summary.json").read_text())["metrics"] == m
    # the same run in words
    assert cli_main([*argv, "--out", str(tmp_path / "words")]) == 0
    text = capsys.readouterr().out
    assert "60 faces -> " in text and "BCubed P/R/F1 1.000/1.000/1.000" in text


def test_cli_with_model_threshold_copies_and_contact_sheets(table, table_file, model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [
        "cluster",
        str(table_file),
        "--out",
        str(out),
        "--model",
        str(model_dir),
        "--copy",
        "--contact-sheets",
    ]
    assert cli_main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["threshold"] == THRESHOLD and summary["threshold_source"] == f"model {model_dir}"
    assert summary["distance"] == "squared_euclidean"
    by_person = {
        name: {Path(p).name for p, i in zip(table.paths, table.identities, strict=True) if i == name}
        for name in set(table.identities)
    }
    # a folder per cluster of >= 2 faces (--min-size 2), holding hard links to exactly one person's images
    folders = sorted(p for p in (out / "clusters").iterdir() if p.is_dir())
    assert [f.name for f in folders] == [f"cluster_{k:04d}" for k in range(14)]
    for folder in folders:
        names = {f.name for f in folder.iterdir()}
        assert names in by_person.values()
        first = next(folder.iterdir())
        assert first.stat().st_nlink >= 2
    assert summary["files"]["clusters"]["linked"] == 6 * 5 + 4 * 4 + 4 * 2
    assert summary["files"]["clusters"]["copied"] == 0 and summary["files"]["clusters"]["missing"] == 0
    # a contact sheet per cluster of >= 2: 8 columns of 112 px thumbnails + 4 px gaps
    sheets = sorted((out / "sheets").glob("*.png"))
    assert len(sheets) == 14 and summary["files"]["sheets"]["written"] == 14
    with Image.open(sheets[0]) as im:  # cluster 0: one person's 5 photos in a row
        assert im.format == "PNG" and im.width == 5 * 116 + 4
        px = np.asarray(im.convert("RGB"), dtype=np.float64)
    tile = px[im.height - 4 - 112 - 16 : im.height - 20, 4:116]
    assert tile.std() > 20  # a photo, not a blank tile

    # a second run into the same folder is refused, then allowed with --overwrite (old folders replaced)
    assert cli_main(argv) == 1
    assert "not empty" in capsys.readouterr().err
    (out / "clusters" / "cluster_0099").mkdir()
    assert cli_main([*argv, "--overwrite", "--json"]) == 0
    capsys.readouterr()
    assert not (out / "clusters" / "cluster_0099").exists()
    # ...but never into a folder someone else filled
    foreign = tmp_path / "foreign"
    (foreign / "clusters").mkdir(parents=True)
    (foreign / "clusters" / "holiday.jpg").write_bytes(b"mine")
    assert (
        cli_main(
            ["cluster", str(table_file), "--out", str(foreign), "--threshold", "0.5", "--copy", "--overwrite"]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert (
        "not written by facenet-hf cluster" in err
        and (foreign / "clusters" / "holiday.jpg").read_bytes() == b"mine"
    )


def test_cli_on_embeddings_of_a_real_model(lfw_sample, model_dir, tmp_path, capsys):
    """The path a user takes: a model embeds the photos, the table is clustered at the model's threshold."""
    from facenet_hf.evaluation.embed import embed_files

    files = [str(p) for ps in sample_people(lfw_sample).values() for p in ps]
    model = FaceNet.from_pretrained(str(model_dir))
    emb = embed_files(model, files, batch_size=64, progress=False)
    emb_file = write_table(tmp_path / "real.parquet", EmbeddingTable(files, emb))  # no identities: no metrics
    out = tmp_path / "out"
    assert cli_main(["cluster", str(emb_file), "--out", str(out), "--model", str(model_dir), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    rows = read_csv(out / "assignments.csv")
    assert list(rows[0]) == ["path", "face_index", "cluster"] and [r["path"] for r in rows] == files
    labels = np.array([int(r["cluster"]) for r in rows])
    sizes = np.bincount(labels)
    assert labels.min() == 0 and np.all(sizes > 0) and np.all(np.diff(sizes) <= 0)  # 0..k-1 by size
    assert summary["metrics"] is None and summary["clusters"] == sizes.size


def test_cli_bad_input_says_which_file(table, tmp_path, model_dir, capsys):
    def run(*argv: str) -> str:
        assert cli_main(["cluster", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("facenet-hf cluster: ") and len(err.splitlines()) == 1
        return err

    missing = tmp_path / "nope.parquet"
    assert str(missing) in run(str(missing), "--out", str(tmp_path / "o1"), "--threshold", "1")
    one = write_table(tmp_path / "one.parquet", table.select([0]))
    err = run(str(one), "--out", str(tmp_path / "o2"), "--threshold", "1")
    assert str(one) in err and "at least 2 embeddings, got 1" in err
    bad = table.select(range(10))
    bad.embeddings[3, 0] = np.nan
    nan = write_table(tmp_path / "nan.parquet", bad)
    err = run(str(nan), "--out", str(tmp_path / "o3"), "--threshold", "1")
    assert str(nan) in err and "NaN" in err and "rows [3]" in err
    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not a parquet file")
    assert str(junk) in run(str(junk), "--out", str(tmp_path / "o4"), "--threshold", "1")
    ok = write_table(tmp_path / "ok.parquet", table)
    assert "needs a threshold" in run(str(ok), "--out", str(tmp_path / "o5"))
    assert "positive" in run(str(ok), "--out", str(tmp_path / "o6"), "--threshold", "-1")
    bare = tmp_path / "bare"
    FaceNet(backbone="resnet18", embedding_dim=32, image_size=32).save_pretrained(bare)
    assert "no verification threshold" in run(str(ok), "--out", str(tmp_path / "o7"), "--model", str(bare))
    assert "--min-cluster-size must be >= 2" in run(
        str(ok), "--out", str(tmp_path / "o8"), "--method", "hdbscan", "--min-cluster-size", "1"
    )
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 9))  # nothing written on an error


def test_cli_help_has_an_example(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["cluster", "--help"])
    assert e.value.code == 0
    assert "examples:\n  facenet-hf embed" in capsys.readouterr().out


# -- the library ------------------------------------------------------------------------------------------------
def unit_pair(d2: float) -> np.ndarray:
    """Two unit vectors at squared Euclidean distance d2 (angle with 2 - 2 cos = d2)."""
    theta = np.arccos(1.0 - d2 / 2.0)
    return np.array([[1.0, 0.0, 0.0], [np.cos(theta), np.sin(theta), 0.0]])


@pytest.mark.parametrize("method", ["agglomerative", "chinese_whispers"])
@pytest.mark.parametrize("distance", ["squared_euclidean", "euclidean"])
def test_merge_iff_distance_within_the_threshold(method, distance):
    t2 = 0.8  # the pair's squared distance at the threshold
    thr = t2 if distance == "squared_euclidean" else np.sqrt(t2)
    for linkage in ("single", "average", "complete"):
        kw = {"method": method, "threshold": thr, "distance": distance, "linkage": linkage}
        assert cluster_embeddings(unit_pair(t2 * (1 - 1e-6)), **kw).tolist() == [0, 0]
        assert cluster_embeddings(unit_pair(t2 * (1 + 1e-6)), **kw).tolist() == [0, 1]
    # single linkage chains: a - b - c each within the threshold, a - c not
    a, b = unit_pair(0.7)
    theta = 2 * np.arccos(1 - 0.7 / 2)
    c = np.array([np.cos(theta), np.sin(theta), 0.0])
    assert np.sum((a - c) ** 2) > t2
    x = np.stack([a, b, c])
    assert cluster_embeddings(
        x, method=method, threshold=thr, distance=distance, linkage="single"
    ).tolist() == [0, 0, 0]


def brute_linkage(x: np.ndarray, threshold: float, linkage: str) -> list[int]:
    """Agglomerative clustering the slow way on squared Euclidean distances: merge the closest two groups while
    their linkage (min / mean / max of the member distances) is <= threshold."""
    d = np.sum((x[:, None] - x[None]) ** 2, axis=-1)
    agg = {"single": np.min, "average": np.mean, "complete": np.max}[linkage]
    clusters = [[i] for i in range(len(x))]
    while len(clusters) > 1:
        best, pair = np.inf, None
        for i, j in itertools.combinations(range(len(clusters)), 2):
            v = agg(d[np.ix_(clusters[i], clusters[j])])
            if v < best:
                best, pair = v, (i, j)
        if best > threshold:
            break
        i, j = pair
        clusters[i] += clusters.pop(j)
    labels = np.empty(len(x), int)
    for k, members in enumerate(clusters):
        labels[members] = k
    return labels.tolist()


@pytest.mark.parametrize("linkage", ["single", "average", "complete"])
def test_agglomerative_matches_brute_force_linkage_on_squared_distances(linkage):
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 6))
    x = unit_embeddings(centres[rng.integers(0, 5, 30)] + 0.6 * rng.normal(size=(30, 6)))
    for t in (0.3, 0.6, 1.0, 1.4):
        ours = cluster_embeddings(x, threshold=t, linkage=linkage)
        assert groups(range(30), ours) == groups(range(30), brute_linkage(x, t, linkage)), t


def test_threshold_graph_matches_brute_force():
    rng = np.random.default_rng(2)
    x = unit_embeddings(rng.normal(size=(50, 4)))
    indptr, indices, sims = threshold_graph(x, 0.4, block_rows=7)
    got = {(i, int(j)) for i in range(50) for j in indices[indptr[i] : indptr[i + 1]]}
    want = {(i, j) for i in range(50) for j in range(50) if i != j and 1 - x[i] @ x[j] <= 0.4}
    assert got == want
    assert np.allclose(
        sims, [x[i] @ x[j] for i in range(50) for j in indices[indptr[i] : indptr[i + 1]]], atol=1e-6
    )


def test_labels_numbered_by_size_and_inputs_checked():
    assert relabel_by_size([7, 3, 3, -1, 9, 9, 9, 7]).tolist() == [1, 2, 2, -1, 0, 0, 0, 1]
    assert relabel_by_size([-1, -1]).tolist() == [-1, -1]
    with pytest.raises(ValueError, match="at least 2 embeddings, got 1"):
        cluster_embeddings(np.ones((1, 4)), threshold=1.0)
    with pytest.raises(ValueError, match="all zeros"):
        cluster_embeddings(np.zeros((3, 4)), threshold=1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        cluster_embeddings(np.eye(3), method="kmeans", threshold=1.0)
    with pytest.raises(ValueError, match="linkage must be one of"):
        cluster_embeddings(np.eye(3), threshold=1.0, linkage="ward")
    with pytest.raises(ValueError, match="needs a threshold"):
        cluster_embeddings(np.eye(3))

    class Model:
        threshold, distance = 1.2, "euclidean"

    assert model_threshold(Model()) == (1.2, "euclidean")
    # the model's threshold when none is given: the 3 axes are sqrt(2) = 1.41 apart (Euclidean)
    assert cluster_embeddings(np.eye(3), model=Model()).tolist() == [0, 1, 2]
    Model.threshold = 1.5
    assert cluster_embeddings(np.eye(3), model=Model()).tolist() == [0, 0, 0]


def test_write_assignments_with_faces_and_no_identities(tmp_path):
    t = EmbeddingTable(["a.jpg", "a.jpg", "b.jpg"], np.eye(3), face_index=[0, 1, -1])
    path = write_assignments(tmp_path / "x.csv", t, [1, 0, -1])
    assert path.read_text().splitlines() == [
        "path,face_index,cluster",
        "a.jpg,0,1",
        "a.jpg,1,0",
        "b.jpg,-1,-1",
    ]
    with pytest.raises(ValueError, match="2 labels for a table of 3 rows"):
        write_assignments(tmp_path / "y.csv", t, [0, 1])


def test_copy_clusters_one_file_per_photo_and_name_clashes(tmp_path):
    src = tmp_path / "src"
    for sub in ("x", "y"):
        (src / sub).mkdir(parents=True)
        Image.new("RGB", (20, 20), (200, 0, 0)).save(src / sub / "img.jpg")
    # two faces of x/img.jpg in cluster 0 (one file), y/img.jpg in cluster 0 too (renamed), a missing file
    t = EmbeddingTable(
        ["x/img.jpg", "x/img.jpg", "y/img.jpg", "gone.jpg"], np.eye(4), face_index=[0, 1, -1, -1]
    )
    s = copy_clusters(tmp_path / "out", t, [0, 0, 0, NOISE], image_root=src, link=False)
    assert sorted(os.listdir(tmp_path / "out" / "cluster_0000")) == ["img.jpg", "img_1.jpg"]
    assert s.copied == 2 and s.linked == 0 and s.missing == [str(src / "gone.jpg")] and s.folders == 1
    with pytest.raises(FileExistsError, match="not empty"):
        copy_clusters(tmp_path / "out", t, [0, 0, 0, 0], image_root=src)


def test_contact_sheet_crops_face_boxes_and_marks_unreadable_images(tmp_path):
    img = Image.new("RGB", (200, 100), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 100, 100))  # left half red, right half blue
    img.save(tmp_path / "two.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    out = contact_sheet(
        tmp_path / "sheet.png",
        [str(tmp_path / "two.png"), str(tmp_path / "two.png"), str(tmp_path / "broken.jpg")],
        boxes=[[0, 0, 100, 100], [100, 0, 200, 100], [np.nan] * 4],
        thumb=64,
        margin=0.0,
    )
    px = np.asarray(Image.open(out).convert("RGB"), dtype=int)
    assert px.shape == (4 + 64 + 4, 3 * 68 + 4, 3)
    red, blue, grey = px[4:68, 4:68], px[4:68, 72:136], px[4:68, 140:204]
    assert (red[..., 0] > 200).mean() > 0.95 and (blue[..., 2] > 200).mean() > 0.95
    assert np.abs(grey - 160).max(axis=-1).__lt__(20).mean() > 0.8  # the grey "unreadable" tile
    with pytest.raises(ValueError, match="at least one image"):
        contact_sheet(tmp_path / "none.png", [])


def test_hdbscan_without_a_threshold_and_seeded_chinese_whispers():
    rng = np.random.default_rng(4)
    centres = unit_embeddings(rng.normal(size=(4, 16)))
    ids = np.repeat(np.arange(4), [12, 6, 3, 3])
    x = centres[ids] + 0.02 * rng.normal(size=(ids.size, 16))
    labels = cluster_embeddings(x, method="hdbscan", min_cluster_size=3)
    assert groups(range(ids.size), labels) == groups(range(ids.size), ids)
    assert labels[:12].tolist() == [0] * 12  # the largest cluster is 0
    few = cluster_embeddings(x[:2], method="hdbscan", min_cluster_size=3)
    assert few.tolist() == [NOISE, NOISE]  # fewer faces than a cluster needs: all noise
    a = cluster_embeddings(x, method="chinese_whispers", threshold=0.5, seed=1)
    assert a.tolist() == cluster_embeddings(x, method="chinese_whispers", threshold=0.5, seed=1).tolist()
    assert groups(range(ids.size), a) == groups(range(ids.size), ids)

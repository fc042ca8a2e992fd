"""Galleries and open-set identification end to end: `facenet-hf enrol` and `facenet-hf identify` on the bundled
LFW sample with a small FaceNet, the Python API, the search backends against brute force, and bad input."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from facenet_hf import FaceNet
from facenet_hf.apps.gallery import (
    Gallery,
    GalleryInfo,
    enrol,
    expected_fpir,
    identify_images,
    model_fingerprint,
    read_gallery_info,
    resolve_threshold,
)
from facenet_hf.cli import main as cli_main
from facenet_hf.evaluation import EmbeddingTable, identification_metrics, rank_identities, write_table
from facenet_hf.model import NoFaceError, fit_calibration, model_calibration

ENROLLED = [
    "Alan_Greenspan",
    "Carrie-Anne_Moss",
    "George_Clooney",
    "Julie_Gerberding",
    "Michelle_Kwan",
    "Monica_Bellucci",
    "Tiger_Woods",
    "Tommy_Franks",
]
STRANGERS = ["Abdullah", "Al_Sharpton", "Elton_John"]


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small random FaceNet (32-d, 32 px) with a stored threshold and a calibration (fitted on synthetic
    distances), both for flip 'off', so that enrolment embeds each image once."""
    torch.manual_seed(0)
    model = FaceNet(backbone="resnet18", embedding_dim=32, image_size=32, threshold_flip="off")
    rng = np.random.default_rng(0)
    d = np.concatenate([rng.uniform(0.0, 0.1, 300), rng.uniform(0.05, 0.4, 300)])
    same = np.r_[np.ones(300, bool), np.zeros(300, bool)]
    model.calibration = fit_calibration(d, same, distance="squared_euclidean", flip="off").to_dict()
    model.threshold = 0.05
    out = tmp_path_factory.mktemp("model") / "model"
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model(model_dir):
    return FaceNet.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def folders(lfw_sample, tmp_path_factory) -> dict[str, Path]:
    """``people/``: the first two images of 8 people; ``probes/``: their third image and one image of 3 people
    who are not enrolled (a people folder, so probes carry identities)."""
    root = tmp_path_factory.mktemp("faces")
    src = lfw_sample / "lfw-deepfunneled"
    for name in ENROLLED:
        files = sorted((src / name).glob("*.jpg"))
        (root / "people" / name).mkdir(parents=True)
        (root / "probes" / name).mkdir(parents=True)
        for f in files[:2]:
            shutil.copy(f, root / "people" / name / f.name)
        shutil.copy(files[2], root / "probes" / name / files[2].name)
    for name in STRANGERS:
        (root / "probes" / name).mkdir(parents=True)
        f = sorted((src / name).glob("*.jpg"))[0]
        shutil.copy(f, root / "probes" / name / f.name)
    return {"people": root / "people", "probes": root / "probes"}


@pytest.fixture(scope="module")
def gallery_file(model_dir, folders, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gallery") / "staff.parquet"
    assert cli_main(["enrol", str(path), str(folders["people"]), "--model", str(model_dir)]) == 0
    return path


def _json(capsys) -> dict:
    return json.loads(capsys.readouterr().out)


# -- end to end ---------------------------------------------------------------------------------------------------
def test_enrol_a_people_folder(model_dir, folders, tmp_path, capsys, model):
    path = tmp_path / "g.parquet"
    argv = ["enrol", str(path), str(folders["people"]), "--model", str(model_dir), "--json"]
    assert cli_main(argv) == 0
    summary = _json(capsys)
    assert summary["added"] == 16 and summary["skipped"] == 0 and summary["failures"] == []
    assert summary["new_people"] == ENROLLED and summary["people"] == 8 and summary["warnings"] == []
    info = read_gallery_info(path)
    assert info.dim == 32 and info.flip == "off" and info.distance == "squared_euclidean"
    assert info.model_id == str(model_dir.resolve()) and info.model_fingerprint == model_fingerprint(model)
    gallery = Gallery.load(path)
    assert gallery.people == ENROLLED and len(gallery) == 16
    # the vectors are the model's embeddings of the files
    expected = model.embed(gallery.paths, flip="off").numpy()
    np.testing.assert_allclose(gallery.vectors, expected, atol=1e-5)
    assert [Path(p).parent.name for p in gallery.paths] == gallery.identities


def test_identify_images_returns_the_enrolled_person_and_unknown(gallery_file, folders, capsys, model):
    enrolled = sorted((folders["people"] / "Tiger_Woods").glob("*.jpg"))[0]
    stranger = next((folders["probes"] / "Elton_John").glob("*.jpg"))
    argv = ["identify", str(gallery_file), str(enrolled), str(stranger), "--threshold", "1e-4", "--json"]
    assert cli_main(argv) == 0
    out = _json(capsys)
    assert out["threshold"] == 1e-4 and out["threshold_source"] == "given" and out["people"] == 8
    same, other = out["results"]
    # the probe is the gallery's own image: that person, at distance ~0, its path the nearest gallery image
    assert same["decision"] == "Tiger_Woods" and same["known"] and same["distance"] < 1e-5
    assert same["candidates"][0]["path"] == str(enrolled)
    # k = 5 distinct people, nearest first, each with P(same) from the calibration
    names = [c["identity"] for c in same["candidates"]]
    dists = [c["distance"] for c in same["candidates"]]
    assert len(names) == 5 == len(set(names)) and dists == sorted(dists)
    cal = model_calibration(model)
    assert [c["score"] for c in same["candidates"]] == pytest.approx(
        cal.probability(np.asarray(dists)).tolist()
    )
    # a person not enrolled: unknown (no identity), the nearest candidates still listed
    assert other["decision"] == "unknown" and other["identity"] is None and not other["known"]
    assert other["distance"] > 1e-4 and len(other["candidates"]) == 5
    # the distances are the model's: recompute one from the embeddings
    emb = model.embed([str(stranger)], flip="off").numpy()[0]
    g = Gallery.load(gallery_file)
    best = min(
        float(np.sum((emb - v) ** 2))
        for v, who in zip(g.vectors, g.identities, strict=True)
        if who == other["candidates"][0]["identity"]
    )
    assert other["candidates"][0]["distance"] == pytest.approx(best, abs=1e-5)


def test_identify_thresholds_from_the_model(gallery_file, folders, capsys, model):
    query = str(sorted((folders["people"] / "Monica_Bellucci").glob("*.jpg"))[1])
    assert cli_main(["identify", str(gallery_file), query, "--json"]) == 0
    out = _json(capsys)
    assert out["threshold"] == pytest.approx(0.05) and out["threshold_source"] == "stored"
    assert out["results"][0]["decision"] == "Monica_Bellucci"
    assert cli_main(["identify", str(gallery_file), query, "--far", "0.01", "--json"]) == 0
    out = _json(capsys)
    cal = model_calibration(model)
    assert (
        out["threshold"] == pytest.approx(cal.threshold_at_far(0.01))
        and out["threshold_source"] == "far=0.01"
    )
    assert out["expected_fpir"] == pytest.approx(1 - 0.99**8)
    assert resolve_threshold(model, far=0.01) == (pytest.approx(cal.threshold_at_far(0.01)), "far=0.01")
    # Euclidean galleries get the threshold converted (sqrt of the squared one)
    t, _ = resolve_threshold(model, distance="euclidean")
    assert t == pytest.approx(math.sqrt(0.05))


def test_identify_text_output(gallery_file, folders, capsys):
    query = str(sorted((folders["people"] / "Tommy_Franks").glob("*.jpg"))[0])
    stranger = str(next((folders["probes"] / "Abdullah").glob("*.jpg")))
    assert (
        cli_main(["identify", str(gallery_file), query, stranger, "--threshold", "1e-4", "--top-k", "2"]) == 0
    )
    text = capsys.readouterr().out.splitlines()
    assert text[0].startswith(f"{gallery_file}: 16 vectors of 8 people; squared_euclidean threshold 0.0001")
    assert text[1].startswith(f"{query}: Tommy_Franks (distance 0.0000 <= 0.0001)")
    assert text[2].startswith("  1. Tommy_Franks") and "P(same)" in text[2] and text[2].endswith(query)
    assert text[4].startswith(f"{stranger}: unknown (nearest ")
    assert len(text) == 7  # header + 2 x (answer + 2 candidates)


def test_evaluate_matches_the_metrics_on_a_brute_force_matrix(gallery_file, folders, capsys, model):
    argv = ["identify", str(gallery_file), str(folders["probes"]), "--top-k", "8", "--closed-set"]
    assert cli_main([*argv, "--evaluate", "--fpir", "0.34,1", "--json"]) == 0
    out = _json(capsys)
    ev = out["evaluation"]
    assert (ev["n_probes"], ev["n_mated"], ev["n_nonmated"], ev["n_gallery_identities"]) == (11, 8, 3, 8)
    # independently: embed the probes, a full probe x gallery matrix, the metrics on it
    g = Gallery.load(gallery_file)
    probes = sorted(str(p) for p in folders["probes"].rglob("*.jpg"))
    emb = model.embed(probes, flip="off").numpy().astype(np.float64)
    d = ((emb[:, None, :] - g.vectors[None].astype(np.float64)) ** 2).sum(-1)
    ref = identification_metrics(d, [Path(p).parent.name for p in probes], g.identities, fpir=(0.34, 1.0))
    assert ev["rank_1"] == pytest.approx(ref["rank_1"])
    assert ev["cmc"] == {str(r): pytest.approx(ref["cmc"][r]) for r in (1, 5)}  # ranks up to --top-k
    for got, want in zip(ev["dir_at_fpir"], ref["dir_at_fpir"], strict=True):
        assert got["dir"] == pytest.approx(want["dir"]) and got["fpir_achieved"] == pytest.approx(
            want["fpir_achieved"]
        )
        assert got["threshold"] == pytest.approx(want["threshold"], abs=1e-5)
    assert cli_main([*argv, "--evaluate"]) == 0
    text = capsys.readouterr().out
    assert "evaluation: 11 queries (8 of enrolled people, 3 not) against 8 people" in text
    assert "DIR@FPIR=0.01" in text and "rank-1" in text


def test_enrolment_is_append_only(model_dir, folders, lfw_sample, tmp_path, capsys):
    path = tmp_path / "g.parquet"
    assert cli_main(["enrol", str(path), str(folders["people"]), "--model", str(model_dir)]) == 0
    capsys.readouterr()
    before = Gallery.load(path)
    data = path.read_bytes()
    # the same folder again: nothing new, the file untouched
    assert cli_main(["enrol", str(path), str(folders["people"]), "--json"]) == 0  # the gallery's model
    assert _json(capsys)["added"] == 0 and path.read_bytes() == data
    # a new image of an enrolled person, and a new person (named with --identity)
    more = tmp_path / "more" / "Tiger_Woods"
    more.mkdir(parents=True)
    shutil.copy(next((folders["probes"] / "Tiger_Woods").glob("*.jpg")), more)
    newcomer = next((folders["probes"] / "Elton_John").glob("*.jpg"))
    assert cli_main(["enrol", str(path), str(more.parent), "--json"]) == 0
    summary = _json(capsys)
    assert summary["added"] == 1 and summary["more_images"] == ["Tiger_Woods"] and summary["new_people"] == []
    assert cli_main(["enrol", str(path), str(newcomer), "--identity", "Elton John", "--json"]) == 0
    assert _json(capsys)["new_people"] == ["Elton John"]
    after = Gallery.load(path)
    assert len(after) == 18 and after.enrolment.tolist() == [0] * 16 + [1, 2]
    # the old rows are exactly as they were, in the same order
    assert after.paths[:16] == before.paths and after.identities[:16] == before.identities
    np.testing.assert_array_equal(after.vectors[:16], before.vectors)
    assert [e["rows"] for e in after.log] == [16, 1, 1]
    # relabelling an enrolled image is refused, and the file is left as it was
    data = path.read_bytes()
    assert cli_main(["enrol", str(path), str(newcomer), "--identity", "Someone Else"]) == 1
    err = capsys.readouterr().err
    assert "already enrolled as another person" in err and "'Elton John'" in err
    assert path.read_bytes() == data


# -- the Python API --------------------------------------------------------------------------------------------------
def test_python_api_and_backends_agree(gallery_file, folders, model):
    g = Gallery.load(gallery_file)
    probes = sorted(str(p) for p in folders["probes"].rglob("*.jpg"))
    answers = identify_images(g, model, probes, k=3, threshold=1e-4)
    assert [a.query for a in answers] == probes
    assert all(not a.known and len(a.candidates) == 3 for a in answers)  # none is a gallery image
    closed = identify_images(g, model, probes, k=3, closed_set=True)
    assert all(a.known and a.identity == a.candidates[0].identity for a in closed)
    q = model.embed(probes, flip="off")
    exact = g.search(q, 8)
    flat = g.search(q, 8, backend="faiss")
    hnsw = g.search(q, 8, backend="faiss-hnsw")
    labels, dist = rank_identities(
        2 - 2 * q.numpy().astype(np.float64) @ g.vectors.T.astype(np.float64), g.identities
    )
    assert exact.identities == labels.tolist() == flat.identities == hnsw.identities
    np.testing.assert_allclose(exact.distances, dist, atol=1e-5)
    np.testing.assert_allclose(flat.distances, exact.distances, atol=1e-5)


@pytest.mark.parametrize("backend", ["exact", "faiss"])
def test_per_identity_aggregation_matches_brute_force(backend):
    rng = np.random.default_rng(0)
    # 40 people with 1-3 images, and one with 300 (the k nearest people may lie far down the rows)
    ids = [f"p{i}" for i in range(40) for _ in range(rng.integers(1, 4))] + ["crowd"] * 300
    vecs = _unit(rng, len(ids), 8)
    g = Gallery(GalleryInfo(dim=8))
    g.add(EmbeddingTable([f"img{i}.jpg" for i in range(len(ids))], vecs, ids))
    q = _unit(rng, 60, 8)
    q[:20] = vecs[-20:] + 0.01 * _unit(rng, 20, 8)  # queries next to the crowd
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    d = 2 - 2 * q.astype(np.float64) @ vecs.T.astype(np.float64)
    for k in (1, 5, 41, 100):
        labels, dist = rank_identities(d, ids, k=k)
        res = g.search(q, k, backend=backend, chunk_bytes=4096)  # 4 KiB: a few queries per block
        assert res.identities == labels.tolist()
        np.testing.assert_allclose(res.distances, np.maximum(dist, 0), atol=1e-5)
        best_rows = [
            [int(np.argmin(np.where(np.asarray(ids) == n, d[i], np.inf))) for n in row]
            for i, row in enumerate(labels)
        ]
        assert res.rows.tolist() == best_rows


def test_enrol_embeddings_tables_and_query_files(tmp_path, model, capsys):
    rng = np.random.default_rng(1)
    vecs = _unit(rng, 6, 32)
    table = EmbeddingTable(
        [f"/faces/{i}.jpg" for i in range(6)], vecs, ["ann", "ann", "bob", "bob", "cy", "cy"]
    )
    src = write_table(tmp_path / "people.parquet", table)
    path = tmp_path / "g.parquet"
    assert cli_main(["enrol", str(path), str(src), "--json"]) == 0  # no model needed for embeddings
    assert _json(capsys)["new_people"] == ["ann", "bob", "cy"]
    info = read_gallery_info(path)
    assert info.model_fingerprint is None and info.flip is None
    queries = write_table(tmp_path / "q.parquet", EmbeddingTable(["q0", "q1"], vecs[[2, 5]]))
    argv = ["identify", str(path), str(queries), "--threshold", "0.5", "--top-k", "2", "--json"]
    assert cli_main(argv) == 0
    out = _json(capsys)
    assert [r["decision"] for r in out["results"]] == ["bob", "cy"]
    assert [r["query"] for r in out["results"]] == ["q0", "q1"] and out["results"][0]["candidates"][0][
        "score"
    ] is None
    # without a threshold and without a model to take one from: says what to give
    assert cli_main(["identify", str(path), str(queries)]) == 1
    assert "give --threshold T, --model MODEL" in capsys.readouterr().err
    # the Python enrol with an in-memory table appends; the gallery round-trips
    summary = enrol(path, EmbeddingTable(["/faces/new.jpg"], _unit(rng, 1, 32), ["dee"]))
    assert (
        summary.added == 1
        and summary.people == 4
        and Gallery.load(path).people == ["ann", "bob", "cy", "dee"]
    )


def test_concurrent_enrolments_lose_no_rows(tmp_path):
    import threading

    path = tmp_path / "g.parquet"
    rng = np.random.default_rng(4)
    vecs = _unit(rng, 40, 8)

    def worker(w: int) -> None:
        for i in range(10):
            n = 10 * w + i
            enrol(path, EmbeddingTable([f"/w{w}/{i}.jpg"], vecs[n : n + 1], [f"person{n % 7}"]))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    g = Gallery.load(path)
    assert len(g) == 40 and sorted(g.enrolment.tolist()) == list(range(40))
    assert g.search(vecs[:3], 1).distances.max() < 1e-5  # every vector is there, unchanged
    assert g.search(np.zeros((0, 8), np.float32), 3).identities == []


# -- bad input -------------------------------------------------------------------------------------------------------
def test_a_one_person_gallery_enrols_but_cannot_be_evaluated(model_dir, folders, tmp_path, capsys):
    path = tmp_path / "solo.parquet"
    one = str(sorted((folders["people"] / "Tiger_Woods").glob("*.jpg"))[0])
    assert cli_main(["enrol", str(path), one, "--identity", "Tiger", "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "the gallery holds 1 vector of 1 person" in out
    assert "note: the gallery holds one person (Tiger)" in out and "need at least 2 people" in out
    # identify works (a 1:1 verification) ...
    assert cli_main(["identify", str(path), one, "--threshold", "1e-4", "--json"]) == 0
    assert _json(capsys)["results"][0]["decision"] == "Tiger"
    # ... but open-set evaluation needs 2 people or more
    argv = ["identify", str(path), str(folders["probes"]), "--closed-set", "--evaluate"]
    assert cli_main(argv) == 1
    assert "needs a gallery of at least 2 identities, got 1" in capsys.readouterr().err


def test_embeddings_of_the_wrong_dimension_name_the_file(gallery_file, tmp_path, capsys):
    rng = np.random.default_rng(2)
    bad = write_table(
        tmp_path / "dim16.parquet", EmbeddingTable(["a.jpg", "b.jpg"], _unit(rng, 2, 16), ["x", "y"])
    )
    copy = tmp_path / "g.parquet"
    shutil.copy(gallery_file, copy)
    assert cli_main(["enrol", str(copy), str(bad)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"facenet-hf enrol: {bad} holds 16-d embeddings but the gallery holds 32-d ones")
    assert "\n" not in err and "Traceback" not in err
    assert cli_main(["identify", str(copy), str(bad), "--threshold", "1"]) == 1
    assert f"{bad} holds 16-d embeddings but the gallery holds 32-d ones" in capsys.readouterr().err
    assert copy.read_bytes() == gallery_file.read_bytes()
    # not unit vectors
    loud = write_table(tmp_path / "loud.parquet", EmbeddingTable(["c.jpg"], 3 * _unit(rng, 1, 32), ["z"]))
    assert cli_main(["enrol", str(copy), str(loud)]) == 1
    assert "must be unit vectors" in capsys.readouterr().err


def test_unreadable_images_and_faceless_queries_are_named(
    gallery_file, folders, model_dir, model, tmp_path, capsys
):
    people = tmp_path / "people"
    (people / "Ann").mkdir(parents=True)
    broken = people / "Ann" / "broken.jpg"
    broken.write_bytes(b"not a jpeg at all")
    shutil.copy(sorted((folders["people"] / "Tiger_Woods").glob("*.jpg"))[0], people / "Ann" / "ok.jpg")
    path = tmp_path / "g.parquet"
    assert cli_main(["enrol", str(path), str(people), "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "enrolled 1 row(s)" in out and "1 image(s) failed" in out and f"not enrolled: {broken}: " in out
    # only broken images: nothing enrolled, an error naming the file
    only = tmp_path / "only" / "Bob"
    only.mkdir(parents=True)
    shutil.copy(broken, only / "broken.jpg")
    assert cli_main(["enrol", str(tmp_path / "g2.parquet"), str(only.parent), "--model", str(model_dir)]) == 1
    assert f"{only / 'broken.jpg'}" in capsys.readouterr().err
    # a broken query: named on stderr, exit 1, the good query still answered
    good = str(sorted((folders["people"] / "Tiger_Woods").glob("*.jpg"))[0])
    assert cli_main(["identify", str(gallery_file), good, str(broken), "--threshold", "1e-4", "--json"]) == 1
    captured = capsys.readouterr()
    assert f"facenet-hf identify: cannot use {broken}: " in captured.err
    assert [r["decision"] for r in json.loads(captured.out)["results"]] == ["Tiger_Woods"]
    # no face when detection is on
    blank = tmp_path / "blank.jpg"
    Image.new("RGB", (160, 160), (128, 128, 128)).save(blank)
    assert cli_main(["identify", str(gallery_file), str(blank), "--threshold", "1", "--detect"]) == 1
    err = capsys.readouterr().err
    assert f"cannot use {blank}: no face" in err and "--no-detect" in err
    with pytest.raises(NoFaceError, match="blank.jpg"):
        identify_images(Gallery.load(gallery_file), model, [str(blank)], threshold=1.0, detect=True)


def test_empty_folders_and_wrong_files(gallery_file, model_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["enrol", str(tmp_path / "g.parquet"), str(empty), "--model", str(model_dir)]) == 1
    assert f"{empty} holds no image" in capsys.readouterr().err
    assert cli_main(["identify", str(gallery_file), str(empty), "--threshold", "1"]) == 1
    assert f"{empty} holds no image" in capsys.readouterr().err
    assert not (tmp_path / "g.parquet").exists()
    # images without a model anywhere
    assert cli_main(["enrol", str(tmp_path / "g.parquet"), str(empty)]) == 1
    assert "need a model to embed them: pass --model MODEL" in capsys.readouterr().err
    assert cli_main(["enrol", str(tmp_path / "g.parquet"), str(tmp_path / "nowhere")]) == 1
    assert f"{tmp_path / 'nowhere'}: no such file or folder" in capsys.readouterr().err
    # an embeddings table is not a gallery; a gallery must be .parquet
    table = write_table(
        tmp_path / "t.parquet", EmbeddingTable(["a"], _unit(np.random.default_rng(0), 1, 32), ["a"])
    )
    assert cli_main(["identify", str(table), "x.jpg", "--threshold", "1"]) == 1
    assert f"{table} is not a facenet-hf gallery" in capsys.readouterr().err
    assert cli_main(["identify", str(tmp_path / "g.npz"), "x.jpg"]) == 1
    assert "a gallery file must end in .parquet" in capsys.readouterr().err
    assert cli_main(["identify", str(tmp_path / "missing.parquet"), "x.jpg"]) == 1
    assert "gallery file not found" in capsys.readouterr().err


def test_queries_from_another_model_are_refused(gallery_file, folders, tmp_path, capsys):
    torch.manual_seed(1)
    other = tmp_path / "other"
    FaceNet(
        backbone="resnet18", embedding_dim=32, image_size=32, threshold_flip="off", threshold=0.1
    ).save_pretrained(other)
    query = str(sorted((folders["people"] / "Tiger_Woods").glob("*.jpg"))[0])
    assert cli_main(["identify", str(gallery_file), query, "--model", str(other)]) == 1
    err = capsys.readouterr().err
    assert "the gallery was enrolled with another model" in err and "not comparable" in err
    assert cli_main(["enrol", str(gallery_file), query, "--identity", "X", "--model", str(other)]) == 1
    assert "another model" in capsys.readouterr().err
    # another flip mode is refused too
    assert cli_main(["identify", str(gallery_file), query, "--flip", "sum", "--threshold", "1"]) == 1
    assert "enrolled with flip 'off'" in capsys.readouterr().err


def test_help_has_examples(capsys):
    for command in ("enrol", "identify"):
        with pytest.raises(SystemExit) as e:
            cli_main([command, "--help"])
        assert e.value.code == 0
        assert "example" in capsys.readouterr().out


def test_small_gallery_basics():
    g = Gallery(GalleryInfo(dim=4))
    g.add(EmbeddingTable(["a", "b"], np.eye(4, dtype=np.float32)[:2], ["A", "B"]))
    assert g.search(np.eye(4, dtype=np.float32)[:1], 2).identities == [["A", "B"]]
    assert expected_fpir(1e-3, 1000) == pytest.approx(1 - 0.999**1000)
    with pytest.raises(ValueError, match="backend must be one of"):
        g.search(np.eye(4, dtype=np.float32)[:1], 2, backend="annoy")
    with pytest.raises(ValueError, match="queries holds 3-d embeddings but the gallery holds 4-d ones"):
        g.search(np.ones((1, 3), np.float32) / np.sqrt(3), 1)


def test_the_faiss_backends_say_how_to_install_faiss(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['faiss'] = None\n"  # as if faiss-cpu were not installed
        "import numpy as np\n"
        "from facenet_hf.apps.gallery import Gallery, GalleryInfo\n"
        "from facenet_hf.evaluation import EmbeddingTable\n"
        "g = Gallery(GalleryInfo(dim=2)); g.add(EmbeddingTable(['a', 'b'], np.eye(2, dtype=np.float32), ['A', 'B']))\n"
        "print(g.search(np.eye(2, dtype=np.float32), 1).identities)\n"
        "try:\n    g.search(np.eye(2, dtype=np.float32), 1, backend='faiss')\n"
        "except ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "[['A'], ['B']]" in out and "pip install 'facenet-hf[search]'" in out

"""`facenet-hf embed`: folders, people layouts, dataset sources and photos with faces into an embeddings table;
vectors equal to the model's own embed, resume after a kill equal to one uninterrupted run, failures listed."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from facenet_hf import FaceNet
from facenet_hf.apps.embed_folder import DatasetRow, collect_items, embed_sources
from facenet_hf.cli import main as cli_main
from facenet_hf.evaluation import read_table


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("embed") / "model"
    FaceNet(backbone="resnet18", embedding_dim=16, image_size=32, threshold=1.0).eval().save_pretrained(path)
    return path


@pytest.fixture
def people(lfw_sample, tmp_path):
    """Six people of the sample, two images each."""
    root = tmp_path / "people"
    several = [
        d for d in sorted((lfw_sample / "lfw-deepfunneled").iterdir()) if len(list(d.glob("*.jpg"))) >= 2
    ]
    for person in several[:6]:
        (root / person.name).mkdir(parents=True)
        for img in sorted(person.glob("*.jpg"))[:2]:
            shutil.copy(img, root / person.name / img.name)
    return root


def test_people_folder_gives_identities_and_the_models_own_vectors(model_dir, people, tmp_path, capsys):
    out = tmp_path / "emb.parquet"
    assert cli_main(["embed", str(model_dir), str(people), "--out", str(out), "--no-detect", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    table = read_table(out)
    files = sorted(people.rglob("*.jpg"))
    assert summary["rows"] == summary["embedded"] == len(table) == len(files) == 12
    assert sorted(table.paths) == sorted(str(f) for f in files)
    assert all(p.split("/")[-2] == ident for p, ident in zip(table.paths, table.identities, strict=True))
    assert table.face_index is None  # no detection: whole images
    model = FaceNet.from_pretrained(model_dir)
    ref = model.embed(table.paths[:3], detect=False).numpy()
    np.testing.assert_allclose(table.embeddings[:3], ref, atol=1e-5)


def test_killed_run_resumes_to_the_uninterrupted_table_and_new_files_are_added(model_dir, people, tmp_path):
    model = FaceNet.from_pretrained(model_dir)
    whole = embed_sources(
        model, [people], tmp_path / "whole.parquet", detect=False, chunk_size=5, progress=False
    )
    assert whole.rows == 12

    def kill(done: int) -> None:
        if done >= 5:
            raise KeyboardInterrupt

    out = tmp_path / "resumed.parquet"
    with pytest.raises(KeyboardInterrupt):
        embed_sources(model, [people], out, detect=False, chunk_size=5, progress=False, on_chunk=kill)
    assert not out.exists() and (tmp_path / "resumed.parquet.parts").is_dir()
    again = embed_sources(model, [people], out, detect=False, chunk_size=5, progress=False)
    assert again.skipped == 5 and again.embedded == 7 and again.rows == 12
    a, b = read_table(tmp_path / "whole.parquet"), read_table(out)
    order = np.argsort(b.paths)
    assert sorted(a.paths) == [b.paths[i] for i in order]
    np.testing.assert_allclose(a.embeddings[np.argsort(a.paths)], b.embeddings[order], atol=1e-6)
    assert not (tmp_path / "resumed.parquet.parts").exists()

    new = people / "Someone_New"
    new.mkdir()
    shutil.copy(sorted(people.rglob("*.jpg"))[0], new / "Someone_New_0001.jpg")
    more = embed_sources(model, [people], out, detect=False, progress=False)
    assert (more.embedded, more.skipped, more.rows) == (1, 12, 13)
    assert read_table(out).identities.count("Someone_New") == 1
    with pytest.raises(FileExistsError, match="resumed.parquet"):
        embed_sources(model, [people], out, detect=False, resume=False, progress=False)


def test_bad_files_are_listed_and_the_run_goes_on(model_dir, people, tmp_path, capsys):
    first, second = sorted(people.iterdir())[:2]
    bad = first / "truncated.jpg"
    bad.write_bytes(next(people.rglob("*.jpg")).read_bytes()[:300])
    notes = second / "notes.jpg"
    notes.write_text("hello")
    out = tmp_path / "emb.parquet"
    assert cli_main(["embed", str(model_dir), str(people), "--out", str(out), "--no-detect"]) == 0
    printed = capsys.readouterr().out
    assert "12 rows" in printed and "2 failed" in printed and "truncated.jpg" in printed
    with (tmp_path / "emb.failures.csv").open() as f:
        rows = {r["path"]: r["reason"] for r in csv.DictReader(f)}
    assert set(rows) == {str(bad), str(notes)} and all(rows.values())
    # the failures are not retried (nor re-listed) on the next run, unless asked
    assert cli_main(["embed", str(model_dir), str(people), "--out", str(out), "--no-detect", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["embedded"] == 0


def test_empty_folder_and_missing_source_say_so(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert (
        cli_main(["embed", str(model_dir), str(tmp_path / "empty"), "--out", str(tmp_path / "e.parquet")])
        == 1
    )
    assert f"{tmp_path / 'empty'} holds no image" in capsys.readouterr().err
    assert (
        cli_main(["embed", str(model_dir), str(tmp_path / "nope"), "--out", str(tmp_path / "e.parquet")]) == 1
    )
    assert "nope" in capsys.readouterr().err
    assert cli_main(["embed", str(model_dir), str(tmp_path), "--out", str(tmp_path / "e.csv")]) == 1
    assert "must end in .parquet" in capsys.readouterr().err


def test_parquet_dataset_source_with_image_bytes(model_dir, people, tmp_path):
    files = sorted(people.rglob("*.jpg"))[:4]
    images = [{"bytes": f.read_bytes(), "path": f.name} for f in files]
    pq.write_table(
        pa.table({"image": images, "label": [f.parent.name for f in files]}), tmp_path / "d.parquet"
    )
    model = FaceNet.from_pretrained(model_dir)
    summary = embed_sources(
        model, [tmp_path / "d.parquet"], tmp_path / "e.parquet", detect=False, progress=False
    )
    table = read_table(tmp_path / "e.parquet")
    assert summary.rows == 4 and table.identities == [f.parent.name for f in files]
    np.testing.assert_allclose(table.embeddings, model.embed(files, detect=False).numpy(), atol=1e-5)


@pytest.mark.slow
def test_detected_faces_get_an_index_and_a_box(lfw_sample, tmp_path):
    aligned = FaceNet(
        backbone="resnet18", embedding_dim=16, image_size=32, alignment={"kind": "five_point", "size": 112}
    ).eval()
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted((lfw_sample / "lfw-deepfunneled").rglob("*.jpg"))[:4]:
        shutil.copy(f, photos / f.name)
    out = tmp_path / "faces.parquet"
    summary = embed_sources(aligned, [photos], out, faces="largest", progress=False)
    table = read_table(out)
    assert summary.failed == 0 and len(table) == 4 and table.identities == [None] * 4
    assert table.face_index.min() >= 0
    # LFW images are 250 x 250 with the face in the middle
    centres = (table.boxes[:, :2] + table.boxes[:, 2:]) / 2
    assert np.all(np.abs(centres - 125) < 40)
    np.testing.assert_allclose(table.embeddings, aligned.embed(table.paths).numpy(), atol=1e-5)


def test_a_table_is_extended_only_by_the_model_and_flip_that_made_it(model_dir, people, tmp_path):
    model = FaceNet.from_pretrained(model_dir)
    out = tmp_path / "emb.parquet"
    first = sorted(people.rglob("*.jpg"))[0]
    summary = embed_sources(model, [people, first], out, detect=False, progress=False)
    assert summary.rows == 12  # the file named twice is embedded once
    with pytest.raises(ValueError, match="another model or flip mode"):
        embed_sources(model, [people], out, detect=False, flip="sum", progress=False)
    other = FaceNet(backbone="resnet18", embedding_dim=16, image_size=32).eval()
    with pytest.raises(ValueError, match="another model or flip mode"):
        embed_sources(other, [people], out, detect=False, progress=False)


def test_dataset_items_hold_row_references_not_image_bytes(model_dir, people, tmp_path):
    """A parquet / Hub source is read chunk by chunk: the collected items reference rows, their keys are the
    image column's paths, and the embeddings equal those of the same files on disk."""
    files = sorted(people.rglob("*.jpg"))[:5]
    images = [{"bytes": f.read_bytes(), "path": f"{f.parent.name}/{f.name}"} for f in files]
    pq.write_table(
        pa.table({"image": images, "label": [f.parent.name for f in files]}), tmp_path / "d.parquet"
    )
    items = collect_items([tmp_path / "d.parquet"])
    assert all(isinstance(i.image, DatasetRow) for i in items)
    assert sorted(i.key for i in items) == sorted(x["path"] for x in images)
    model = FaceNet.from_pretrained(model_dir)
    embed_sources(
        model, [tmp_path / "d.parquet"], tmp_path / "e.parquet", detect=False, chunk_size=2, progress=False
    )
    table = read_table(tmp_path / "e.parquet")
    by_key = dict(zip(table.paths, table.embeddings, strict=True))
    want = model.embed(files, detect=False).numpy()
    got = np.stack([by_key[f"{f.parent.name}/{f.name}"] for f in files])
    np.testing.assert_allclose(got, want, atol=1e-5)

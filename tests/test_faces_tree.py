"""``facenet-hf align SRC DST`` end to end on a messy folder: every file listed with its status and reason (no
face, several faces, tiny, greyscale, huge, corrupt), crops at the template, resume, shards, and a model that
records and uses its alignment."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facenet_hf.cli import main as cli_main
from facenet_hf.faces import AlignmentSpec, MTCNNDetector, umeyama
from facenet_hf.faces.tree import list_images, read_manifest

PEOPLE = ["Abdullah", "Al_Sharpton", "Alan_Greenspan"]


def _sample_faces(lfw_sample: Path) -> list[Path]:
    root = lfw_sample / "lfw-deepfunneled"
    return [p for name in PEOPLE for p in sorted((root / name).glob("*.jpg"))[:2]]


@pytest.fixture(scope="module")
def messy(lfw_sample, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A folder of good faces plus one file of each hard kind; returns it and {relative path: expected status}."""
    root = tmp_path_factory.mktemp("messy")
    expected = {}
    for src in _sample_faces(lfw_sample):
        (root / src.parent.name).mkdir(exist_ok=True)
        shutil.copy(src, root / src.parent.name / src.name)
        expected[f"{src.parent.name}/{src.name}"] = "ok"
    faces = [Image.open(p).convert("RGB") for p in _sample_faces(lfw_sample)]
    odd = root / "Odd"
    odd.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(np.full((250, 250, 3), 128, np.uint8)).save(odd / "grey_wall.jpg")
    expected["Odd/grey_wall.jpg"] = "no_face"
    pair = Image.new("RGB", (500, 250))
    pair.paste(faces[0], (0, 0))
    pair.paste(faces[2], (250, 0))
    pair.save(odd / "two_people.jpg")
    expected["Odd/two_people.jpg"] = "several_faces"
    Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(odd / "tiny.png")
    expected["Odd/tiny.png"] = "too_small"
    faces[4].convert("L").save(odd / "greyscale.jpg")
    expected["Odd/greyscale.jpg"] = "ok"
    huge = Image.fromarray(rng.integers(0, 255, (2400, 3000, 3), dtype=np.uint8))
    huge.paste(faces[1].resize((500, 500)), (1700, 900))
    huge.save(odd / "huge.jpg", quality=85)
    expected["Odd/huge.jpg"] = "ok"
    data = (root / PEOPLE[0] / sorted(expected)[0].split("/")[1]).read_bytes()
    (odd / "corrupt.jpg").write_bytes(data[: len(data) // 3])
    expected["Odd/corrupt.jpg"] = "error"
    (odd / "notes.txt").write_text("not an image")  # not listed at all
    return root, expected


@pytest.fixture(scope="module")
def aligned(messy, tmp_path_factory):
    root, _ = messy
    out = tmp_path_factory.mktemp("aligned") / "faces"
    args = [str(root), str(out), "--select", "central", "--quiet", "--json", "--batch-size", "4"]
    assert cli_main(["align", *args]) == 0
    return out, args


def _by_src(manifest: Path) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = {}
    for r in read_manifest(manifest):
        rows.setdefault(r["src"], []).append(r)
    return rows


def test_every_file_is_listed_with_its_status_and_reason(messy, aligned):
    root, expected = messy
    out, _ = aligned
    rows = _by_src(out / "manifest.csv")
    assert set(rows) == set(expected) == set(list_images(root))
    got = {src: r[0]["status"] for src, r in rows.items()}
    assert got == expected
    reasons = {src: r[0]["reason"] for src, r in rows.items()}
    assert "no face found" in reasons["Odd/grey_wall.jpg"]
    assert "2 faces found" in reasons["Odd/two_people.jpg"] and "central" in reasons["Odd/two_people.jpg"]
    assert "10x10" in reasons["Odd/tiny.png"]
    assert "truncated" in reasons["Odd/corrupt.jpg"] or "cannot" in reasons["Odd/corrupt.jpg"]
    assert json.loads((out / "alignment.json").read_text())["spec"] == AlignmentSpec().to_dict()


def test_crops_are_written_for_faces_only_and_sit_on_the_template(messy, aligned):
    _, expected = messy
    out, _ = aligned
    rows = _by_src(out / "manifest.csv")
    template = AlignmentSpec().landmarks_template()
    for src, status in expected.items():
        (row,) = rows[src]
        if status in ("ok", "several_faces"):
            crop = Image.open(out / row["dst"])
            assert crop.size == (112, 112) and row["dst"] == str(Path(src).with_suffix(".jpg"))
            pts = np.array(
                [
                    [float(row[f"{n}_{a}"]) for a in "xy"]
                    for n in ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
                ]
            )
            x1, y1, x2, y2 = (float(row[k]) for k in ("x1", "y1", "x2", "y2"))
            assert ((pts >= [x1 - 5, y1 - 5]) & (pts <= [x2 + 5, y2 + 5])).all(), src
            # the recorded landmarks, mapped by the fitted similarity, land near the template (a face's shape
            # differs from the mean one by a few px, never by a face width)
            m = umeyama(pts, template)
            mapped = pts @ m[:, :2].T + m[:, 2]
            assert np.abs(mapped - template).max() < 12, src
        else:
            assert row["dst"] == "" and not (out / Path(src).with_suffix(".jpg")).exists()
    # both faces of the two-people image are equally central: the kept one's crop must still be a face
    crop = Image.open(out / "Odd/two_people.jpg")
    assert MTCNNDetector(device="cpu").detect([crop.resize((224, 224))])[0]


def test_rerun_resumes_and_shards_split_the_work(messy, aligned, tmp_path, capsys):
    root, expected = messy
    _, args = aligned
    capsys.readouterr()
    assert cli_main(["align", *args]) == 0  # nothing left to do
    report = json.loads(capsys.readouterr().out)
    assert report["already_done"] == len(expected) and report["processed"] == 0
    # two shards of the same folder: disjoint, together everything, each with its own manifest
    sharded = tmp_path / "sharded"
    for i in (0, 1):
        assert cli_main(["align", str(root), str(sharded), "--shard", f"{i}/2", "--quiet", "--json"]) == 0
    a = {r["src"] for r in read_manifest(sharded / "manifest-0-of-2.csv")}
    b = {r["src"] for r in read_manifest(sharded / "manifest-1-of-2.csv")}
    assert not a & b and a | b == set(expected)


def test_a_killed_run_keeps_finished_rows_and_a_torn_line_is_redone(messy, aligned, tmp_path, capsys):
    root, expected = messy
    out, _ = aligned
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (out / "manifest.csv").read_text().splitlines()
    (partial / "manifest.csv").write_text("\n".join(lines[:4]) + "\n" + lines[4][:20])  # 3 rows + a torn one
    capsys.readouterr()
    assert cli_main(["align", str(root), str(partial), "--select", "central", "--quiet", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["already_done"] == 3 and report["processed"] == len(expected) - 3
    with (partial / "manifest.csv").open(newline="") as f:
        srcs = [r["src"] for r in csv.DictReader(f) if r.get("status")]
    assert sorted(set(srcs)) == sorted(expected)


def test_select_all_and_the_centre_crop_fallback(messy, tmp_path):
    root, _ = messy
    out = tmp_path / "all"
    args = ["align", str(root), str(out), "--select", "all", "--no-face", "center_crop", "--quiet"]
    assert cli_main(args) == 0
    rows = _by_src(out / "manifest.csv")
    two = rows["Odd/two_people.jpg"]
    assert [r["face_index"] for r in two] == ["0", "1"]
    assert {r["dst"] for r in two} == {"Odd/two_people.jpg", "Odd/two_people.face1.jpg"}
    (wall,) = rows["Odd/grey_wall.jpg"]
    assert wall["status"] == "fallback_center" and Image.open(out / wall["dst"]).size == (112, 112)


def test_bad_arguments_are_clear(messy, aligned, tmp_path, capsys):
    root, _ = messy
    out, _ = aligned
    assert cli_main(["align", str(root), str(root), "--quiet"]) == 2
    assert "dst must differ from src" in capsys.readouterr().err
    assert cli_main(["align", str(root), str(root / "aligned"), "--quiet"]) == 2
    assert "must not be inside src" in capsys.readouterr().err
    assert (
        cli_main(["align", str(root), str(out), "--size", "160", "--quiet"]) == 2
    )  # resume with another spec
    assert "already holds faces aligned as" in capsys.readouterr().err
    clash = tmp_path / "clash"
    clash.mkdir()
    Image.new("RGB", (64, 64)).save(clash / "a.jpg")
    Image.new("RGB", (64, 64)).save(clash / "a.png")
    assert cli_main(["align", str(clash), str(tmp_path / "clash_out"), "--quiet"]) == 2
    assert "a.jpg and a.png would both be written as a.jpg" in capsys.readouterr().err
    assert cli_main(["align", str(tmp_path / "nowhere"), str(tmp_path / "o"), "--quiet"]) == 2
    assert "is not a folder of images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["align", str(root), str(tmp_path / "o"), "--shard", "3/2"])
    assert "0 <= i < n" in capsys.readouterr().err


def test_the_lfw_template_makes_lfw_style_images(messy, tmp_path):
    root, _ = messy
    out = tmp_path / "lfw_style"
    assert (
        cli_main(["align", str(root), str(out), "--template", "lfw_deepfunneled", "--size", "250", "--quiet"])
        == 0
    )
    spec = json.loads((out / "alignment.json").read_text())["spec"]
    assert spec == AlignmentSpec(size=250, template="lfw_deepfunneled").to_dict()
    (row,) = _by_src(out / "manifest.csv")["Odd/huge.jpg"]
    crop = Image.open(out / row["dst"])
    assert crop.size == (250, 250)
    # the face found in the corner of the 3000 x 2400 photo now sits where LFW's faces sit: re-detected, its
    # eyes are within a few px of LFW's median eye positions
    (face,) = MTCNNDetector(device="cpu", min_score=0.9).detect([crop])[0][:1]
    from facenet_hf.faces import LFW_TEMPLATE_250

    assert np.abs(face.landmarks[:2] - LFW_TEMPLATE_250[:2]).max() < 8

"""`facenet-hf pack`: parquet shards that load as the same identities, files and bytes; split across workers,
resumed, pre-resized; and the VGGFace2 stand-in pipeline end to end: a VGGFace2-layout tree -> align in 2
shards -> pack in 2 workers -> a 2-process (gloo) training on the shards -> LFW scored as outside data."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import accelerate_launch_cmd, launch_env
from PIL import Image

from facenet_hf import FaceNet
from facenet_hf.cli import main as cli_main
from facenet_hf.data.lfw import read_pairs
from facenet_hf.data.pack import pack_source
from facenet_hf.data.sources import load_source

ROOT = Path(__file__).resolve().parent.parent


def _people(sample: Path, dst: Path, n_people: int = 6, per_person: int = 3) -> Path:
    """A VGGFace2-layout copy (n000001/0001_01.jpg) of sample people with 2+ images."""
    several = [d for d in sorted((sample / "lfw-deepfunneled").iterdir()) if len(list(d.glob("*.jpg"))) >= 2]
    for i, person in enumerate(several[:n_people], start=1):
        folder = dst / f"n{i:06d}"
        folder.mkdir(parents=True)
        for j, img in enumerate(sorted(person.glob("*.jpg"))[:per_person], start=1):
            shutil.copy(img, folder / f"{j:04d}_01.jpg")
    return dst


def test_packed_shards_load_as_the_same_identities_files_and_bytes(lfw_sample, tmp_path, capsys):
    src = lfw_sample / "lfw-deepfunneled"
    out = tmp_path / "packed"
    for i in (0, 1):  # two workers split the shards
        assert (
            cli_main(["pack", str(src), str(out), "--rows-per-shard", "50", "--shard", f"{i}/2", "--json"])
            == 0
        )
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    a, b = load_source(src), load_source(out)
    assert reports[0]["shards"] == len(list(out.glob("train-*.parquet"))) == -(-len(a) // 50)
    assert sorted(reports[0]["written"] + reports[1]["written"]) == sorted(
        p.name for p in out.glob("train-*")
    )
    assert a["path"] == b["path"] and a["identity"] == b["identity"] and a["label"] == b["label"]
    row = pq.read_table(sorted(out.glob("train-*.parquet"))[0]).slice(0, 1).to_pylist()[0]
    assert (
        row["image"]["bytes"] == (src / row["path"]).read_bytes()
        and row["label"] == row["path"].split("/")[0]
    )

    # resume: a lost shard is rewritten, the others are skipped
    lost = sorted(out.glob("train-*.parquet"))[3]
    lost.unlink()
    again = pack_source(src, out, rows_per_shard=50)
    assert again.written == [lost.name] and len(again.skipped) == reports[0]["shards"] - 1
    with pytest.raises(ValueError, match="another plan"):
        pack_source(src, out, rows_per_shard=60)


def test_resize_and_bad_files(lfw_sample, tmp_path, capsys):
    src = _people(lfw_sample, tmp_path / "src", n_people=3, per_person=2)
    bad = src / "n000002" / "0009_01.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    report = pack_source(src, tmp_path / "small", resize=64, quality=85)
    assert report.failed == 1 and report.rows == 7
    with (tmp_path / "small" / "pack_failures-0-of-1.csv").open() as f:
        assert [r["path"] for r in csv.DictReader(f)] == ["n000002/0009_01.jpg"]
    packed = load_source(tmp_path / "small")
    assert len(packed) == 6
    from facenet_hf.data.images import load_image

    assert all(min(load_image(img).size) == 64 for img in packed["image"])  # LFW's 250 px -> 64 px
    assert cli_main(["pack", str(tmp_path / "nope"), str(tmp_path / "x")]) == 1
    assert "nope" in capsys.readouterr().err
    assert cli_main(["pack", str(src), str(src)]) == 1
    assert "is the source" in capsys.readouterr().err


@pytest.mark.slow
def test_vggface2_stand_in_align_pack_train_two_processes_score_outside_data(lfw_sample, tmp_path):
    # 1. a VGGFace2-layout tree (LFW sample people renamed n000001..: nobody LFW scores by name)
    tree = _people(lfw_sample, tmp_path / "vggface2" / "train", n_people=6, per_person=3)
    # 2. align it in two shards, as two machines would
    aligned = tmp_path / "vggface2-112" / "train"
    for i in (0, 1):
        argv = ["align", str(tree), str(aligned), "--shard", f"{i}/2", "--select", "central"]
        assert cli_main([*argv, "--no-face", "center_crop"]) == 0
    n_files = len(list(tree.rglob("*.jpg")))
    assert len(list(aligned.rglob("*.jpg"))) == n_files and (aligned / "alignment.json").is_file()
    # 3. pack the aligned faces into parquet shards, two workers
    packed = tmp_path / "vggface2-112-parquet" / "train"
    for i in (0, 1):
        pack_source(aligned, packed, rows_per_shard=4, shard=(i, 2))
    assert (
        len(list(packed.glob("train-*.parquet"))) == -(-n_files // 4)
        and (packed / "alignment.json").is_file()
    )
    assert sorted(load_source(packed)["path"]) == sorted(load_source(aligned)["path"])
    # the scored LFW pairs (fold 1 of the sample), aligned the same way
    pairs = read_pairs(lfw_sample / "pairs.txt").select_folds([1])
    eval_src = tmp_path / "lfw-fold1"
    for p in sorted(set(pairs.paths()[0]) | set(pairs.paths()[1])):
        (eval_src / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(lfw_sample / "lfw-deepfunneled" / p, eval_src / p)
    eval_dir = tmp_path / "lfw-fold1-112"
    assert (
        cli_main(["align", str(eval_src), str(eval_dir), "--select", "central", "--no-face", "center_crop"])
        == 0
    )
    lines = (lfw_sample / "pairs.txt").read_text().splitlines()
    n_per_fold = int(lines[0].split()[1])
    (tmp_path / "pairs1.txt").write_text(
        "\n".join([f"1 {n_per_fold}", *lines[1 : 1 + 2 * n_per_fold]]) + "\n"
    )
    # 4. two processes (gloo) train on the shards with the VGGFace2 preset's code path, scaled down
    out = tmp_path / "run"
    cmd = [
        *accelerate_launch_cmd(2),
        str(ROOT / "recipes" / "train_r18_lfw.py"),
        "--config",
        str(ROOT / "configs" / "demo" / "lfw_sample.yaml"),
        f"--data.train_source={packed}",
        f"--data.lfw_dir={eval_dir}",
        f"--data.pairs={tmp_path / 'pairs1.txt'}",
        "--data.holdout_folds=[]",
        "--model.alignment=five_point",
        "--loss.global_mining=true",
        f"--output_dir={out}",
        "--model.image_size=32",
        "--model.embedding_dim=16",
        "--data.p=3",
        "--data.k=2",
        "--data.num_workers=0",
        "--train.max_steps=3",
        "--train.warmup_steps=0",
        "--train.mixed_precision=no",
        "--train.eval_batch_size=32",
        "--quiet",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # 5. LFW scored as outside data: every pair of the fold, by a five-point model that records its input
    report = json.loads((out / "eval" / "lfw_report.json").read_text())
    assert report["n_pairs"] == 2 * n_per_fold and report["folds"] == [1]
    model = FaceNet.from_pretrained(out / "model")
    assert model.alignment["kind"] == "five_point" and model.threshold is not None
    assert Image.open(next(aligned.rglob("*.jpg"))).size == (model.alignment["size"],) * 2

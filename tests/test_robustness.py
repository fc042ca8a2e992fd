"""Bad data, bad config, bad weights, interrupted and failing runs: clear errors, nothing lost, nothing unsafe.

The messy dataset mixes real LFW images (copied from ``data/lfw_sample``) with every kind of bad file; the
end-to-end runs go through the recipe's ``main(argv)``. See docs/robustness.md.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from accelerate import Accelerator
from conftest import ROOT, load_recipe, tiny_train_args
from PIL import Image

from facenet_hf import FaceNet
from facenet_hf.cli import main as cli_main
from facenet_hf.cli.train import parse_train_config, run_training, train_parser
from facenet_hf.config import ConfigError, load_config
from facenet_hf.data.images import BadImageError, load_image
from facenet_hf.data.lfw import PairsFormatError
from facenet_hf.data.prescan import (
    TooManyBadImagesError,
    drop_rows,
    prescan_dataset,
    scan_files,
    scan_images,
)
from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import SourceError, labels_of, load_source
from facenet_hf.training import Callback, checkpoint
from facenet_hf.training.build import build_data, build_model, check_image_size
from facenet_hf.training.checkpoint import CheckpointError

IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
# Training people of the bundled sample that appear in no pair (4-5 real LFW images each).
PEOPLE = [
    "Alan_Greenspan",
    "Alexander_Losyukov",
    "Antonio_Palocci",
    "Antony_Leung",
    "Ben_Howland",
    "Carrie-Anne_Moss",
    "Christine_Todd_Whitman",
    "Dennis_Hastert",
]


# ---------------------------------------------------------------------------------------------------------
# the messy dataset


def _png_claiming(width: int, height: int) -> bytes:
    """A real 16x16 PNG whose IHDR claims ``width x height`` (CRC fixed): a decompression bomb's header."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _messy(sample: Path, root: Path) -> tuple[dict[str, str], list[str]]:
    """Real LFW people in ``root/Name/Name_NNNN.jpg`` (2 photos each) plus bad and odd files.

    Returns ``({bad path: word its reason must contain}, [good odd-format paths])`` (absolute paths).
    """
    src = sample / "lfw-deepfunneled"
    for name in PEOPLE:  # two real photos each: few steps sample every file
        (root / name).mkdir(parents=True)
        for f in sorted((src / name).iterdir())[:2]:
            shutil.copy(f, root / name / f.name)

    def face(name: str) -> Image.Image:
        return Image.open(sorted((root / name).iterdir())[0]).convert("RGB")

    def path(name: str, n: int, ext: str) -> Path:
        return root / name / f"{name}_{n:04d}.{ext}"

    bad: dict[str, str] = {}
    good: list[str] = []
    # bad: one per kind
    p = path("Alan_Greenspan", 101, "jpg")
    p.write_bytes(b"")
    bad[str(p)] = "empty"
    real = sorted((root / "Alexander_Losyukov").iterdir())[0].read_bytes()
    p = path("Alexander_Losyukov", 101, "jpg")
    p.write_bytes(real[: len(real) // 2])
    bad[str(p)] = "truncated"
    p = path("Antonio_Palocci", 101, "jpg")
    p.write_text("<html><body>403 Forbidden</body></html>\n")
    bad[str(p)] = "not an image"
    p = path("Antony_Leung", 101, "png")
    face("Antony_Leung").resize((8, 8)).save(p)
    bad[str(p)] = "min_size"
    p = path("Ben_Howland", 101, "png")
    p.write_bytes(_png_claiming(20000, 20000))
    bad[str(p)] = "decompression bomb"
    if not IS_ROOT:  # root reads any file: the case cannot be made
        p = path("Carrie-Anne_Moss", 101, "jpg")
        face("Carrie-Anne_Moss").save(p)
        p.chmod(0)
        bad[str(p)] = "permission denied"
    # an identity with only bad files: it disappears, every later label moves down by one
    (root / "Aaa_Broken").mkdir()
    for n, data in ((1, b""), (2, b"not a jpeg at all")):
        p = path("Aaa_Broken", n, "jpg")
        p.write_bytes(data)
        bad[str(p)] = "empty" if not data else "not an image"
    # good: odd modes and an EXIF rotation, made from the person's own photo
    img = face("Alan_Greenspan")
    made = {
        path("Alan_Greenspan", 102, "png"): lambda p: img.convert("L").save(p),
        path("Alexander_Losyukov", 102, "jpg"): lambda p: face("Alexander_Losyukov").convert("CMYK").save(p),
        path("Antonio_Palocci", 102, "png"): lambda p: _rgba(face("Antonio_Palocci")).save(p),
        path("Antony_Leung", 102, "png"): lambda p: face("Antony_Leung").convert("P", palette=1).save(p),
        path("Ben_Howland", 102, "png"): lambda p: _grey16(face("Ben_Howland")).save(p),
        path("Carrie-Anne_Moss", 102, "jpg"): lambda p: _exif_rotated(face("Carrie-Anne_Moss"), p),
    }
    for p, make in made.items():
        make(p)
        good.append(str(p))
    return bad, good


def _rgba(img: Image.Image) -> Image.Image:
    out = img.convert("RGBA")
    alpha = np.full(img.size[::-1], 255, np.uint8)
    alpha[:20] = 0  # a transparent band on top
    out.putalpha(Image.fromarray(alpha, "L"))
    return out


def _grey16(img: Image.Image) -> Image.Image:
    return Image.fromarray(np.asarray(img.convert("L")).astype(np.uint16) * 257)


def _upright(img: Image.Image) -> Image.Image:
    return img.crop((25, 0, 225, 250))  # 200 wide x 250 high


def _exif_rotated(img: Image.Image, path: Path) -> None:
    """Stored turned 90 degrees (250 wide x 200 high) with EXIF orientation 6: viewed upright it is 200 x 250."""
    exif = Image.Exif()
    exif[0x0112] = 6
    _upright(img).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=95)


def _no_pairs(root: Path) -> list[str]:
    return [f"--data.lfw_dir={root}", "--data.pairs=null", "--data.holdout_folds=[]"]


def _tsv(out: Path) -> dict[str, str]:
    lines = (out / "bad_images.tsv").read_text().splitlines()
    assert lines[0] == "path\treason"
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 2 for r in rows)
    return dict(rows)


class BatchLog(Callback):
    """Every batch the training loop loads (image paths, failures) and every epoch start, in order."""

    def __init__(self) -> None:
        self.entries: list[tuple] = []

    def on_epoch_start(self, run) -> None:
        self.entries.append(("epoch", run.state.epoch))

    def on_batch(self, run, batch) -> None:
        self.entries.append(("batch", list(batch["path"]), list(batch["bad"])))

    def train(self, args: list[str]) -> int:
        """Train as the recipe does (same parser and config), with this log attached."""
        cfg, parsed = parse_train_config(args, train_parser())
        return run_training(cfg, parsed, callbacks=[self])


@pytest.fixture
def batch_log() -> BatchLog:
    return BatchLog()


def _by_epoch(log: BatchLog) -> dict[int, list[tuple[list[str], list]]]:
    out: dict[int, list] = {}
    epoch = -1
    for entry in log.entries:
        if entry[0] == "epoch":
            epoch = entry[1]
            out.setdefault(epoch, [])
        else:
            out[epoch].append(entry[1:])
    return out


# ---------------------------------------------------------------------------------------------------------
# 1. bad images: the pre-scan, end to end


def test_odd_but_good_files_load_as_rgb(lfw_sample, tmp_path):
    _, good = _messy(lfw_sample, tmp_path)
    for p in good:
        img = load_image(p)
        assert img.mode == "RGB" and min(img.size) >= 200
    rotated = load_image(good[-1])  # the EXIF rotation is applied
    upright = _upright(Image.open(sorted((tmp_path / "Carrie-Anne_Moss").iterdir())[0]).convert("RGB"))
    assert rotated.size == (200, 250)
    assert np.abs(np.asarray(rotated, float) - np.asarray(upright, float)).mean() < 8


@pytest.mark.slow
def test_messy_dataset_trains_with_decode_prescan_and_no_bad_file_in_any_batch(
    lfw_sample, tmp_path, batch_log
):
    root, out = tmp_path / "faces", tmp_path / "run"
    bad, good = _messy(lfw_sample, root)
    args = tiny_train_args(lfw_sample, out, *_no_pairs(root), "--data.prescan=decode", "--train.max_steps=6")
    assert batch_log.train([*args, "--data.bad_images=skip"]) == 0

    listed = _tsv(out)
    assert set(listed) == set(bad)
    for path, word in bad.items():
        assert word in listed[path].lower(), (path, listed[path])
    batches = [b for e in _by_epoch(batch_log).values() for b in e]
    assert len(batches) >= 6
    seen = {p for paths, _ in batches for p in paths}
    assert not seen & set(bad)  # no batch ever held a bad file ...
    assert all(fails == [] for _, fails in batches)  # ... nor failed to decode one
    assert set(good) <= seen  # the odd-format files were converted and trained on
    assert (out / "model" / "model.safetensors").is_file()


@pytest.mark.slow
def test_decode_failure_during_training_is_listed_and_not_sampled_again(lfw_sample, tmp_path, batch_log):
    # prescan=header (the default) cannot see a truncated JPEG: it fails while training (skip policy: left out of
    # the loss), is listed, and the sampler drops it from the next epoch on
    root, out = tmp_path / "faces", tmp_path / "run"
    bad, _ = _messy(lfw_sample, root)
    truncated = next(p for p, word in bad.items() if word == "truncated")
    args = tiny_train_args(lfw_sample, out, *_no_pairs(root))
    assert batch_log.train([*args, "--train.max_steps=8"]) == 0

    listed = _tsv(out)
    assert set(listed) == set(bad) and "truncated" in listed[truncated]
    epochs = _by_epoch(batch_log)
    last = max(epochs)
    assert last >= 3
    hit = [e for e, batches in sorted(epochs.items()) if any(truncated in paths for paths, _ in batches)]
    assert hit and hit[0] < last, "the truncated file was not drawn early: the test proves nothing"
    assert hit == [hit[0]]  # found once, never drawn again
    for batches in epochs.values():
        for paths, fails in batches:
            assert not (set(paths) & set(bad)) - {truncated}  # the pre-scan's finds: never in a batch
            assert [f[0] for f in fails] == [p for p in paths if p == truncated]
    # control: without the exclusion the sampler would have drawn it again in a later epoch
    ds, _ = build_data(load_config(None, [f"data.lfw_dir={root}", "data.holdout_folds=[]"]))
    row = [str(root / p) for p in ds["path"]].index(truncated)
    plain = PKBatchSampler(labels_of(ds), 4, 2, seed=0)
    assert any(row in plain.epoch_batches(e) for e in range(hit[0] + 1, last + 1))
    # the exclusion is saved in the checkpoint and restored on resume
    batch_log.entries.clear()
    assert batch_log.train([*args, "--resume=latest", "--train.max_steps=14"]) == 0
    resumed = [b for e in _by_epoch(batch_log).values() for b in e]
    assert len(resumed) >= 6 and not any(truncated in paths for paths, _ in resumed)


def test_prescan_error_policy_names_the_first_bad_file_before_anything_is_written(lfw_sample, tmp_path):
    root, out = tmp_path / "faces", tmp_path / "run"
    bad, _ = _messy(lfw_sample, root)
    recipe = load_recipe("train_r18_lfw")
    with pytest.raises(BadImageError) as err:
        recipe.main(tiny_train_args(lfw_sample, out, *_no_pairs(root), "--data.bad_images=error"))
    first = str(root / "Aaa_Broken" / "Aaa_Broken_0001.jpg")
    assert err.value.source == first and "empty file" in err.value.reason
    assert f"cannot use image {first}: empty file" in str(err.value)
    assert f"{len(bad) - 1} unusable file(s)" in str(err.value)  # all but the truncated JPEG (header scan)
    assert not (out / "config.yaml").exists() and not (out / "checkpoints").exists()


def test_too_many_bad_files_stop_with_a_summary(lfw_sample, tmp_path):
    root, out = tmp_path / "faces", tmp_path / "run"
    shutil.copytree(lfw_sample / "lfw-deepfunneled" / "Alan_Greenspan", root / "Alan_Greenspan")
    for name in ("Bad_One", "Bad_Two"):
        (root / name).mkdir()
        for n in range(1, 5):
            (root / name / f"{name}_{n:04d}.jpg").write_bytes(b"" if n % 2 else b"<html>")
    recipe = load_recipe("train_r18_lfw")
    with pytest.raises(TooManyBadImagesError) as err:
        recipe.main(tiny_train_args(lfw_sample, out, *_no_pairs(root)))
    msg = str(err.value)
    assert "8 of 13 training images (61.5%) are unusable" in msg and "data.max_bad_fraction=0.5" in msg
    assert "4 x empty file" in msg and "4 x not an image in a format PIL can read" in msg
    assert "Bad_One_0001.jpg" in msg
    assert not (out / "config.yaml").exists()


def test_build_data_drops_bad_rows_and_redensifies_labels(lfw_sample, tmp_path):
    root = tmp_path / "faces"
    bad, good = _messy(lfw_sample, root)
    truncated = next(p for p, word in bad.items() if word == "truncated")
    for mode, missed in (("header", {truncated}), ("decode", set())):
        cfg = load_config(None, [f"data.lfw_dir={root}", f"data.prescan={mode}", "data.holdout_folds=[]"])
        found: list = []
        ds, pairs = build_data(cfg, bad_images=found)
        assert pairs is None
        assert {p for p, _ in found} == set(bad) - missed
        paths = {str(root / p) for p in ds["path"]}
        assert not paths & (set(bad) - missed) and set(good) <= paths
        # Aaa_Broken vanished: labels are dense again and still follow the sorted names
        labels = labels_of(ds)
        assert set(labels.tolist()) == set(range(len(PEOPLE)))
        assert sorted(set(zip(ds["identity"], labels.tolist(), strict=True))) == [
            (name, i) for i, name in enumerate(PEOPLE)
        ]
    off = load_config(None, [f"data.lfw_dir={root}", "data.prescan=off", "data.holdout_folds=[]"])
    assert len(build_data(off)[0]) == len(load_source(root))


def test_scan_images_threads_serial_bytes_rows_and_drop_rows(lfw_sample, tmp_path):
    root = tmp_path / "faces"
    bad, _ = _messy(lfw_sample, root)
    ds = load_source(root)
    serial = scan_images(ds, decode=True, num_workers=0, progress=False)
    assert scan_images(ds, decode=True, num_workers=2, progress=False) == serial
    assert [r for r, _, _ in serial] == sorted(r for r, _, _ in serial)
    assert {p for _, p, _ in serial} == set(bad)
    rows = [r for r, _, _ in serial]
    assert all(ds[r]["image"]["path"] == p for r, p, _ in serial)
    header = scan_images(ds, decode=False, num_workers=2, progress=False)
    assert {p for _, p, _ in serial} - {p for _, p, _ in header} == {
        p for p, w in bad.items() if w == "truncated"
    }
    kept = drop_rows(ds, rows)
    assert len(kept) == len(ds) - len(rows) and labels_of(kept).max() == len(PEOPLE) - 1
    assert drop_rows(ds, []) is ds
    # images stored as bytes (parquet / Hub) without a path are named by their row
    inline = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"", "path": None}, {"bytes": b"<html>", "path": None}]},
        features=datasets.Features({"image": datasets.Image(decode=False)}),
    )
    assert [name for _, name, _ in scan_images(inline, decode=False, num_workers=0, progress=False)] == [
        "<bytes, row 0>",
        "<bytes, row 1>",
    ]
    assert scan_files([str(p) for p in bad][:2], decode=False)[0][0] == 0
    with pytest.raises(ValueError, match="num_workers"):
        scan_files([], decode=False, num_workers=-1)
    with pytest.raises(ValueError, match="prescan mode"):
        prescan_dataset(ds, mode="full", policy="skip", max_bad_fraction=0.5)


# ---------------------------------------------------------------------------------------------------------
# 1. bad datasets: a clear error before training, nothing written


def _case(name: str, tmp_path: Path, sample: Path) -> tuple[list[str], type, str]:
    """(extra argv, exception, pattern) of a broken dataset."""
    src = sample / "lfw-deepfunneled"
    faces = tmp_path / "faces"

    def people(names, n=None):
        for name in names:
            (faces / name).mkdir(parents=True)
            for f in sorted((src / name).iterdir())[:n]:
                shutil.copy(f, faces / name / f.name)

    def pairs(text: str) -> str:
        (tmp_path / "pairs.txt").write_text(text)
        return f"--data.pairs={tmp_path / 'pairs.txt'}"

    if name == "empty_folder":
        faces.mkdir()
        return _no_pairs(faces), SourceError, "has no identity subfolders with images"
    if name == "fewer_than_p_identities":
        people(PEOPLE[:3])
        return _no_pairs(faces), ValueError, r"p=4 identities per batch, but only 3 of 3 identities"
    if name == "fewer_than_k_images":
        people(PEOPLE[:4], n=2)
        extra = [*_no_pairs(faces), "--data.k=3", "--data.replacement=false"]
        return extra, ValueError, r"only 0 of 4 identities .*\(replacement=False needs >= k=3\)"
    if name == "pairs_name_missing_images":
        people(PEOPLE)
        text = "1\t1\nAlan_Greenspan\t1\t99\nAlan_Greenspan\t1\tAlexander_Losyukov\t98\n"
        extra = [f"--data.lfw_dir={faces}", pairs(text), "--data.holdout_folds=[1]"]
        return (
            extra,
            FileNotFoundError,
            r"2 images named by the evaluation pairs .* are missing under .*faces: "
            r"Alan_Greenspan/Alan_Greenspan_0099\.jpg, Alexander_Losyukov/Alexander_Losyukov_0098\.jpg",
        )
    if name == "unusable_pair_image":
        people(PEOPLE)
        (faces / "Alan_Greenspan" / "Alan_Greenspan_0001.jpg").write_text("oops")
        text = "1\t1\nAlan_Greenspan\t1\t2\nAlan_Greenspan\t1\tAlexander_Losyukov\t1\n"
        extra = [f"--data.lfw_dir={faces}", pairs(text), "--data.holdout_folds=[1]"]
        return extra, BadImageError, r"Alan_Greenspan_0001\.jpg: not an image.*an evaluation pair image"
    if name == "malformed_pairs_line":
        people(PEOPLE)
        extra = [f"--data.lfw_dir={faces}", pairs("1\t1\nAlan_Greenspan\t1\nA\t1\tB\t2\n")]
        return extra, PairsFormatError, r"line 2: expected a matched pair"
    if name == "parquet_missing_columns":
        img = (src / PEOPLE[0]).iterdir().__next__().read_bytes()
        datasets.Dataset.from_dict({"picture": [img] * 4, "who": ["a", "a", "b", "b"]}).to_parquet(
            str(tmp_path / "faces.parquet")
        )
        extra = [
            f"--data.train_source={tmp_path / 'faces.parquet'}",
            "--data.pairs=null",
            "--data.holdout_folds=[]",
        ]
        return (
            extra,
            SourceError,
            r"faces\.parquet' has no image column: its columns are \['picture', 'who'\]",
        )
    raise AssertionError(name)


@pytest.mark.parametrize(
    "name",
    [
        "empty_folder",
        "fewer_than_p_identities",
        "fewer_than_k_images",
        "pairs_name_missing_images",
        "unusable_pair_image",
        "malformed_pairs_line",
        "parquet_missing_columns",
    ],
)
def test_broken_datasets_fail_before_training(name, lfw_sample, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    extra, exc, pattern = _case(name, tmp_path, lfw_sample)
    out = tmp_path / "run"
    with pytest.raises(exc, match=pattern):
        load_recipe("train_r18_lfw").main(tiny_train_args(lfw_sample, out, *extra))
    assert not (
        out / "config.yaml"
    ).exists()  # nothing written: the same command works once the data is fixed
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


# ---------------------------------------------------------------------------------------------------------
# the sampler's exclusions


def test_sampler_exclude_is_deterministic_keeps_length_and_refuses_to_starve():
    labels = np.repeat(np.arange(6), 4)
    sampler = PKBatchSampler(labels, 3, 2, seed=1)
    n = len(sampler)
    gone = [0, 1, 2, 5, 9]
    sampler.exclude(gone)
    assert len(sampler) == n and sampler.excluded == gone
    assert sampler.num_usable_identities == 5  # identity 0 has 1 image left (< min_images=2)
    batches = sampler.epoch_batches(0)
    assert not set(batches.ravel().tolist()) & set(gone)
    lab = labels[batches].reshape(len(batches), 3, 2)
    assert (lab == lab[:, :, :1]).all()
    twin = PKBatchSampler(labels, 3, 2, seed=1)
    twin.exclude(list(reversed(gone)))
    assert np.array_equal(twin.epoch_batches(0), batches)  # restored from a checkpoint: same batches
    with pytest.raises(ValueError, match="p=3 identities per batch, but only 2"):
        sampler.exclude(list(range(4, 16)))
    assert sampler.excluded == gone and np.array_equal(sampler.epoch_batches(0), batches)  # unchanged
    with pytest.raises(ValueError, match="indices must be in 0..23"):
        sampler.exclude([24])


# ---------------------------------------------------------------------------------------------------------
# 4. runs: Ctrl-C, a failing checkpoint write, an unwritable output_dir


@pytest.mark.slow
def test_sigint_saves_a_resumable_checkpoint_and_exits_130(lfw_sample, tmp_path):
    out = tmp_path / "run"
    args = tiny_train_args(
        lfw_sample, out, *_no_pairs(lfw_sample / "lfw-deepfunneled"), "--train.max_steps=100000"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "recipes" / "train_r18_lfw.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("interrupted: checkpoint ") and last.endswith(
        "continue with resume=latest (same output_dir)"
    )
    (ckpt,) = checkpoint.list_checkpoints(out / "checkpoints")
    assert str(ckpt) in last
    manifest = checkpoint.verify(ckpt)
    step = int(ckpt.name.split("_")[1])
    assert step >= 2 and manifest["step"] == step
    # resume: the same command with resume=latest continues from that step
    recipe = load_recipe("train_r18_lfw")
    assert recipe.main([*args, "--resume=latest", f"--train.max_steps={step + 2}"]) == 0
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps[-2:] == [step + 1, step + 2]
    assert (out / "model" / "model.safetensors").is_file()


def _failing_save_state(monkeypatch, at_call: int) -> None:
    real = Accelerator.save_state
    calls = {"n": 0}

    def save_state(self, output_dir=None, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:  # half a file, then the disk is full
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(output_dir) / "optimizer.bin"))
        return real(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)


def _failing_finalize(monkeypatch, at_call: int) -> None:
    real = checkpoint.finalize
    calls = {"n": 0}

    def finalize(tmp, step, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            (Path(tmp) / checkpoint.MANIFEST).write_text('{"files": {')  # half a manifest
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(tmp) / checkpoint.MANIFEST))
        return real(tmp, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "finalize", finalize)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["save_state", "finalize"])
def test_checkpoint_write_failure_is_clear_and_keeps_the_previous_one(
    fault, lfw_sample, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    args = tiny_train_args(
        lfw_sample, out, *_no_pairs(lfw_sample / "lfw-deepfunneled"), "--train.checkpoint_every_steps=2"
    )
    (_failing_save_state if fault == "save_state" else _failing_finalize)(monkeypatch, at_call=2)
    recipe = load_recipe("train_r18_lfw")
    with pytest.raises(CheckpointError) as err:
        recipe.main(args)
    msg = str(err.value)
    root = out / "checkpoints"
    assert f"could not write checkpoint {root / 'step_00000004'} (step 4)" in msg
    assert (
        "No space left on device" in msg
        and f"the last complete one, {root / 'step_00000002'}, is intact" in msg
    )
    assert isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == errno.ENOSPC
    assert sorted(p.name for p in root.iterdir()) == ["step_00000002"]  # no half-written folder, no .tmp-*
    checkpoint.verify(root / "step_00000002")
    monkeypatch.undo()
    assert recipe.main([*args, "--resume=latest"]) == 0
    assert (out / "model" / "model.safetensors").is_file()
    assert [p.name for p in checkpoint.list_checkpoints(root)][-1] == "step_00000004"


def test_unwritable_output_dir_is_a_clear_error(lfw_sample, tmp_path, monkeypatch):
    parent = tmp_path / "locked"
    parent.mkdir()
    out = parent / "run"
    if IS_ROOT:  # root writes anywhere: make mkdir fail as it would for a user without the permission
        real_mkdir = Path.mkdir

        def mkdir(self, *args, **kwargs):
            if self == out:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real_mkdir(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", mkdir)
    else:
        parent.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=rf"cannot write into output_dir {out}: Permission denied"):
            load_recipe("train_r18_lfw").main(tiny_train_args(lfw_sample, out))
    finally:
        parent.chmod(0o700)
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# 3. weights: the CLI refuses a pickle-only model folder without unpickling it


class _TouchOnUnpickle:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_cli_evaluate_refuses_pickle_only_weights(lfw_sample, tmp_path, capsys):
    folder = tmp_path / "model"
    FaceNet(backbone="resnet18", embedding_dim=8, image_size=32).save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    argv = ["evaluate", str(folder), "--lfw-dir", str(lfw_sample / "lfw-deepfunneled")]
    assert cli_main([*argv, "--pairs", str(lfw_sample / "pairs.txt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"facenet-hf evaluate: cannot load model {folder}: ") and len(err.splitlines()) == 1
    assert "only safetensors weights are loaded" in err and "pytorch_model.bin" in err
    assert not marker.exists() and not (folder / "eval").exists()


# ---------------------------------------------------------------------------------------------------------
# 5. config: an image size the backbone cannot take


def test_image_size_the_backbone_cannot_take_is_refused(lfw_sample):
    base = [
        f"data.lfw_dir={lfw_sample / 'lfw-deepfunneled'}",
        "data.holdout_folds=[]",
        "model.embedding_dim=8",
    ]
    cfg = load_config(None, [*base, "model.backbone=vit_tiny_patch16_224", "model.image_size=112"])
    with pytest.raises(
        ConfigError,
        match=r"model.image_size=112 does not fit backbone 'vit_tiny_patch16_224': "
        r"it takes only 224x224 images; set model.image_size=224",
    ):
        build_model(cfg)
    assert build_model(load_config(None, [*base, "model.image_size=32"])).image_size == 32  # a CNN takes it
    # a backbone without the static flag: found by a dry forward pass, and the working size is named
    model = FaceNet(backbone="vit_tiny_patch16_224", embedding_dim=8, image_size=112)
    model.backbone.patch_embed.strict_img_size = False
    with pytest.raises(ConfigError, match=r"image_size=112 does not fit .* but works at 224x224"):
        check_image_size(model, cfg)
    assert model.training  # the check leaves the mode as it found it

"""Outside data: an image folder with a labels file (CelebA's format, CSV / TSV), several training sources with
disjoint label spaces (LFW's people + CelebA), per-source augmentations, the LFW+CelebA and CelebA presets."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SAMPLE, load_recipe, tiny_train_args
from PIL import Image

from facenet_hf.config import ConfigError, load_config
from facenet_hf.data.lfw import SplitOverlapError, read_pairs
from facenet_hf.data.sampler import PKBatchSampler
from facenet_hf.data.sources import (
    SOURCE_COLUMN,
    SourceError,
    combine_sources,
    labels_of,
    load_source,
)
from facenet_hf.data.transforms import BatchTransform, build_transform, collate_batch
from facenet_hf.training.build import build_data

LFW = ["data.lfw_dir=" + str(SAMPLE / "lfw-deepfunneled"), "data.pairs=" + str(SAMPLE / "pairs.txt")]
# (file, identity) of a CelebA-like fixture: identities are numbers, 1 to 4 images each, files in one folder
CELEB = [
    ("000001.jpg", "2880"),
    ("000002.jpg", "2937"),
    ("000003.jpg", "2880"),
    ("000004.jpg", "10"),
    ("000005.jpg", "2937"),
    ("000006.jpg", "10"),
    ("000007.jpg", "2880"),
    ("000008.jpg", "77"),
    ("000009.jpg", "10"),
    ("000010.jpg", "2880"),
]


def _jpeg(seed: int, size: tuple[int, int] = (18, 22)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def _celeb(root: Path, lines: list[tuple[str, str]] = CELEB, *, name: str = "identity_CelebA.txt") -> Path:
    """``root/img/<files>`` and ``root/<name>`` in CelebA's format; returns the labels file."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    for i, (file, _) in enumerate(lines):
        (root / "img" / file).write_bytes(_jpeg(i))
    labels = root / name
    labels.write_text("".join(f"{f} {ident}\n" for f, ident in lines))
    return labels


# ------------------------------------------------------------------------------------------------ labels files


def test_celeba_format(tmp_path):
    labels = _celeb(tmp_path)
    ds = load_source(tmp_path / "img", labels_file=labels)
    assert ds.column_names == ["image", "label", "identity", "path"] and len(ds) == 10
    assert ds["path"] == [f for f, _ in CELEB]  # the file names as written, in the file's order
    assert ds["identity"] == [i for _, i in CELEB]
    # labels dense 0..3, numeric order of the identities (10 < 77 < 2880 < 2937, not string order)
    by_name = dict(zip(ds["identity"], ds["label"], strict=True))
    assert by_name == {"10": 0, "77": 1, "2880": 2, "2937": 3}
    assert ds[0]["image"] == {"bytes": None, "path": str(tmp_path / "img" / "000001.jpg")}


def test_csv_and_tsv_with_named_columns(tmp_path):
    _celeb(tmp_path)
    rows = [(f, f"person_{i}") for f, i in CELEB]
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("Path,Identity,extra\n" + "".join(f"{f},{i},x\n" for f, i in rows))
    ds = load_source(tmp_path / "img", labels_file=csv_file)  # columns found by header name, any case
    assert ds["identity"][:2] == ["person_2880", "person_2937"] and len(set(ds["label"])) == 4
    assert sorted(set(ds["identity"])) == [
        ds.filter(lambda r, k=k: r["label"] == k)[0]["identity"] for k in range(4)
    ]
    tsv_file = tmp_path / "labels.tsv"
    tsv_file.write_text("who\tpicture\n" + "".join(f"{i}\t{f}\n" for f, i in rows))
    with pytest.raises(
        SourceError, match=r"no path column in its header \['who', 'picture'\].*image_column="
    ):
        load_source(tmp_path / "img", labels_file=tsv_file)
    ds2 = load_source(tmp_path / "img", labels_file=tsv_file, image_column="picture", label_column="who")
    assert ds2["identity"] == ds["identity"] and ds2["label"] == ds["label"]
    with pytest.raises(SourceError, match=r"has no column 'face' \(image_column\); its header has"):
        load_source(tmp_path / "img", labels_file=tsv_file, image_column="face", label_column="who")


def test_subfolders_and_absolute_paths(tmp_path):
    (tmp_path / "img" / "a").mkdir(parents=True)
    (tmp_path / "img" / "a" / "x.jpg").write_bytes(_jpeg(1))
    (tmp_path / "elsewhere.png").write_bytes(_jpeg(2))
    labels = tmp_path / "l.txt"
    labels.write_text(f"a/x.jpg 1\n\n{tmp_path / 'elsewhere.png'}\t2\n")  # a blank line, a tab
    ds = load_source(tmp_path / "img", labels_file=labels)
    assert [r["path"] for r in ds["image"]] == [
        str(tmp_path / "img/a/x.jpg"),
        str(tmp_path / "elsewhere.png"),
    ]


@pytest.mark.parametrize(
    ("text", "suffix", "message"),
    [
        ("000001.jpg 2880\n000002.jpg 2937 extra\n", ".txt", r"l\.txt', line 2: expected 2 fields"),
        (
            "image_id identity\n000001.jpg 2880\n",
            ".txt",
            r"line 1: 'image_id' is not an image file name.*header",
        ),
        (
            "\n000001.jpg 2880\n\n000001.jpg 2937\n",
            ".txt",
            r"line 4: image '000001.jpg' is listed again \(first on line 2\)",
        ),
        (
            "000001.jpg 2880\nnope.jpg 1\nnope2.jpg 1\n",
            ".txt",
            r"line 2: image 'nope.jpg' does not exist under .*img \(2 of the 3",
        ),
        ("", ".txt", r"lists no images"),
        (
            "path,identity\n000001.jpg,2880\n000002.jpg\n",
            ".csv",
            r"l\.csv', line 3: 1 fields, but the header",
        ),
        ("path,identity\n000001.jpg,\n", ".csv", r"line 2: column 'identity' is empty"),
        ("", ".csv", r"is empty: expected a header row"),
        ("path,path2\n000001.jpg,x\n", ".csv", r"no identity column in its header"),
    ],
)
def test_bad_labels_files_name_the_line_and_file(tmp_path, text, suffix, message):
    _celeb(tmp_path)
    labels = tmp_path / f"l{suffix}"
    labels.write_text(text)
    with pytest.raises(SourceError, match=message):
        load_source(tmp_path / "img", labels_file=labels)


def test_missing_labels_file_or_folder(tmp_path):
    labels = _celeb(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"labels file '.*nope\.txt' does not exist"):
        load_source(tmp_path / "img", labels_file=tmp_path / "nope.txt")
    with pytest.raises(FileNotFoundError, match=r"no such image folder"):
        load_source(tmp_path / "nope", labels_file=labels)
    (tmp_path / "bin.txt").write_bytes(b"000001.jpg 1\n\xff\xfe 2\n")
    with pytest.raises(SourceError, match=r"bin\.txt', line 2: not UTF-8"):
        load_source(tmp_path / "img", labels_file=tmp_path / "bin.txt")


def test_config_keys_for_labels_files():
    cfg = load_config(
        None, [*LFW, "data.train_source=/c/img", "data.labels_file=/c/l.txt", "data.holdout_folds=[]"]
    )
    assert (cfg.data.train_source, cfg.data.labels_file) == ("/c/img", "/c/l.txt")
    with pytest.raises(ConfigError, match=r"data.labels_file needs data.train_source"):
        load_config(None, [*LFW, "data.labels_file=/c/l.txt"])


def test_a_labels_file_source_trains_as_outside_data(tmp_path):
    labels = _celeb(tmp_path)
    cfg = load_config(
        None,
        [
            *LFW,
            f"data.train_source={tmp_path / 'img'}",
            f"data.labels_file={labels}",
            "data.holdout_folds=[]",
        ],
    )
    ds, pairs = build_data(cfg)
    assert len(ds) == 10 and pairs.folds == list(range(1, 11))


# ------------------------------------------------------------------------------------------ several sources


def _extra(path: Path, labels: Path | None = None, name: str | None = "celeb", **more) -> str:
    entry = {"path": str(path), **({"labels_file": str(labels)} if labels else {}), **more}
    if name:
        entry["name"] = name
    return "data.extra_sources=" + json.dumps([entry])


def test_extra_source_label_spaces_are_disjoint_and_the_sampler_draws_from_both(tmp_path):
    labels = _celeb(tmp_path)
    cfg = load_config(None, [*LFW, _extra(tmp_path / "img", labels)])
    ds, pairs = build_data(cfg)
    lfw, _ = build_data(load_config(None, LFW))
    n_lfw = int(labels_of(lfw).max()) + 1
    src = np.array(ds[SOURCE_COLUMN])
    lab = labels_of(ds)
    assert (src == "").sum() == len(lfw) and (src == "celeb").sum() == 10
    assert lab[src == ""].max() == n_lfw - 1 and sorted(set(lab[src == "celeb"])) == list(
        range(n_lfw, n_lfw + 4)
    )
    ident = np.array(ds["identity"])
    assert sorted(set(ident[src == "celeb"])) == ["celeb:10", "celeb:2880", "celeb:2937", "celeb:77"]
    assert set(ident[src == ""]) == set(lfw["identity"])  # the first source keeps its names
    assert not set(ident[src == ""]) & pairs.people()
    # one identity = one label, across the whole dataset
    assert (
        len({(i, int(x)) for i, x in zip(ident, lab, strict=True)})
        == len(set(ident))
        == len(set(lab.tolist()))
    )
    sampler = PKBatchSampler(lab, 4, 2, seed=0)
    drawn = np.concatenate([sampler.epoch_batches(e).ravel() for e in range(3)])
    assert {"", "celeb"} <= set(src[drawn])
    # CelebA's singleton (77) has one image: never sampled with min_images=2, but still a class
    assert n_lfw + 1 not in set(lab[drawn])


def test_combine_sources_offsets_and_prefixes(tmp_path):
    labels = _celeb(tmp_path)
    a = load_source(tmp_path / "img", labels_file=labels)
    both = combine_sources([(None, a), ("x", a)])
    assert labels_of(both).tolist() == labels_of(a).tolist() + (labels_of(a) + 4).tolist()
    assert both["identity"][10] == "x:2880" and both[SOURCE_COLUMN][:1] == [""]
    with pytest.raises(ValueError, match="unique"):
        combine_sources([("x", a), ("x", a)])


def _lfw_people_folder(root: Path, people: list[str]) -> Path:
    """An image folder of LFW sample people (copied), as a user's own folder of LFW people would be."""
    for name in people:
        shutil.copytree(SAMPLE / "lfw-deepfunneled" / name, root / name)
    return root


def test_an_extra_source_with_a_held_out_person_is_refused(tmp_path):
    held_out = sorted(read_pairs(SAMPLE / "pairs.txt").people(10))[0]  # a person of fold 10's pairs
    folder = _lfw_people_folder(tmp_path / "mine", [held_out, "Abdullah_Gul"])
    with pytest.raises(
        SplitOverlapError, match=rf"data.extra_sources\[0\] \('mine', .*\): 1 people .*{held_out}.*no person"
    ):
        build_data(load_config(None, [*LFW, _extra(folder, name=None)]))
    # LFW training people (outside fold 10) are allowed in holdout mode: kept apart as 'mine:<name>', with a warning
    ok = _lfw_people_folder(tmp_path / "ok", ["Abdullah_Gul"])
    ds, _ = build_data(load_config(None, [*LFW, _extra(ok, name=None)]))
    assert "mine:Abdullah_Gul" not in ds["identity"] and "ok:Abdullah_Gul" in ds["identity"]
    # outside-data mode: every LFW pair person is refused, whichever fold
    fold3 = sorted(read_pairs(SAMPLE / "pairs.txt").people(3))[0]
    other = _lfw_people_folder(tmp_path / "other", [fold3])
    cfg = load_config(
        None,
        [
            *LFW,
            "data.holdout_folds=[]",
            f"data.train_source={tmp_path / 'img'}",
            "data.labels_file=" + str(_celeb(tmp_path)),
            _extra(other),
        ],
    )
    with pytest.raises(SplitOverlapError, match=rf"data.extra_sources\[0\] \('celeb'.*{fold3}"):
        build_data(cfg)


def test_extra_source_config_errors():
    with pytest.raises(ConfigError, match=r"data.extra_sources\[0\].path must be set"):
        load_config(None, [*LFW, "data.extra_sources=[{name: x}]"])
    with pytest.raises(
        ConfigError, match=r"unknown config key 'data.extra_sources\[0\].labels'; did you mean"
    ):
        load_config(None, [*LFW, "data.extra_sources=[{path: /a, labels: /b}]"])
    with pytest.raises(ConfigError, match=r"data.extra_sources\[1\]: source name 'img' is also"):
        load_config(None, [*LFW, "data.extra_sources=[{path: /a/img}, {path: /b/img}]"])
    with pytest.raises(ConfigError, match=r"data.extra_sources\[0\].name: 'a:b' is not a valid source name"):
        load_config(None, [*LFW, "data.extra_sources=[{path: /a, name: 'a:b'}]"])
    with pytest.raises(ConfigError, match=r"data.extra_sources\[0\]: expected a mapping"):
        load_config(None, [*LFW, "data.extra_sources=[/a]"])


def test_config_with_extra_sources_round_trips(tmp_path):
    from facenet_hf.config import save_config

    cfg = load_config(None, [*LFW, "data.extra_sources=[{path: /a/img, labels_file: /a/l.txt, name: c}]"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again.data.extra_sources == cfg.data.extra_sources and again.data.extra_sources[0].name == "c"


def test_each_source_gets_its_own_transforms(tmp_path):
    labels = _celeb(tmp_path)
    a = load_source(SAMPLE / "lfw-deepfunneled").select(range(3))
    b = load_source(tmp_path / "img", labels_file=labels).select(range(3))
    ds = combine_sources([(None, a), ("celeb", b)])
    kw = {"image_size": 16, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    lfw_tf = build_transform([{"face_crop": {"fraction": 0.6}}, {"resize": {}}], **kw)
    celeb_tf = build_transform([{"face_crop": {"fraction": 1.0}}, {"resize": {}}], **kw)
    batch_tf = BatchTransform(lfw_tf, source_transforms={"celeb": celeb_tf})
    got = collate_batch(ds.with_transform(batch_tf)[list(range(6))])["pixel_values"]
    from facenet_hf.data.images import load_image

    want = [(lfw_tf if i < 3 else celeb_tf)(load_image(ds[i]["image"])) for i in range(6)]
    torch.testing.assert_close(got, torch.stack(want), atol=1e-6, rtol=0)
    assert not torch.allclose(got[3], lfw_tf(load_image(ds[3]["image"])))


@pytest.mark.slow
def test_training_on_lfw_and_an_extra_source(tmp_path):
    labels = _celeb(tmp_path)
    out = tmp_path / "run"
    transforms = [{"face_affine": {"fraction": 0.85, "flip": 0.5}}]
    extra = _extra(tmp_path / "img", labels, train_transforms=transforms)
    args = tiny_train_args(
        SAMPLE, out, "--model.backbone=test_resnet", "--loss.objective=triplet+arcface", f"--{extra}"
    )
    assert load_recipe("train_r18_lfw").main(args) == 0
    from facenet_hf import FaceNet

    assert FaceNet.from_pretrained(out / "model").embedding_dim == 32
    saved = load_config(out / "config.yaml")
    assert saved.data.extra_sources[0].train_transforms == transforms


# ------------------------------------------------------------------------------------------------- presets


def test_the_celeba_presets_validate_and_match_the_30_minute_budget():
    base = load_config(ROOT / "configs/lfw/r18_lfw_112_cpu30m.yaml")
    both = load_config(ROOT / "configs/lfw/r18_lfw_celeba_112_cpu30m.yaml")
    alone = load_config(ROOT / "configs/celeba/r18_celeba_112_cpu30m.yaml")
    for cfg in (both, alone):
        assert (cfg.train.max_steps, cfg.data.p, cfg.data.k, cfg.model.image_size) == (
            base.train.max_steps,
            base.data.p,
            base.data.k,
            base.model.image_size,
        )
        assert (cfg.data.lfw_dir, cfg.data.pairs) == (base.data.lfw_dir, base.data.pairs)
    (celeba,) = both.data.extra_sources
    assert (celeba.name, celeba.path, celeba.labels_file) == (
        "celeba",
        "data/celeba10k/img_align_celeba",
        "data/celeba10k/identity_CelebA.txt",
    )
    assert both.data.holdout_folds == [10] and both.data.train_source is None
    assert alone.data.holdout_folds == [] and alone.data.train_source == celeba.path
    assert alone.data.labels_file == celeba.labels_file and alone.data.extra_sources == []


def test_every_preset_validates():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert {"r18_lfw_celeba_112_cpu30m.yaml", "r18_celeba_112_cpu30m.yaml"} <= {f.name for f in files}
    for f in files:
        load_config(f, ["train.mixed_precision=no"])  # fp16 presets need a GPU


# ------------------------------------------------------------------------------------------ the real CelebA


def test_real_celeba(full_celeba):
    ds = load_source(full_celeba / "img_align_celeba", labels_file=full_celeba / "identity_CelebA.txt")
    labels = labels_of(ds)
    counts = np.bincount(labels)
    assert len(ds) == 9684 and counts.size == 5263 and int((counts >= 2).sum()) == 2761
    both = combine_sources([(None, load_source(SAMPLE / "lfw-deepfunneled")), ("celeba", ds)])
    src = np.array(both[SOURCE_COLUMN])
    assert (src == "celeba").sum() == 9684 and labels_of(both)[src == "celeba"].min() == 210
    sampler = PKBatchSampler(labels_of(both), 16, 4, seed=0)
    drawn = sampler.epoch_batches(0).ravel()
    assert {"", "celeba"} <= set(src[drawn])  # both sources, in proportion to their usable images

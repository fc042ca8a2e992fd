"""Data sources: image folders, parquet (file / glob / folder), Hub ids (offline stand-ins), column mapping, errors."""

from __future__ import annotations

import io
import time
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import ClassLabel, Dataset, Features, Value
from datasets import Image as ImageFeature
from PIL import Image

from facenet_hf.data import sources
from facenet_hf.data.sources import SOURCE_FEATURES, SourceError, arrow_column, labels_of, load_source

REAL_LOAD_DATASET = datasets.load_dataset


def _jpeg(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


PEOPLE = {"Zoe_Zed": 3, "alice": 1, "Bob_Brown": 2}  # sorted: Bob_Brown, Zoe_Zed, alice


def _folder(root: Path) -> Path:
    for name, n in PEOPLE.items():
        (root / name).mkdir(parents=True)
        for i in range(1, n + 1):
            (root / name / f"{name}_{i:04d}.jpg").write_bytes(_jpeg(i))
    return root


def _rows() -> list[dict]:
    """(identity, file name, jpeg bytes) rows of PEOPLE, in an unsorted order."""
    rows = [
        {"name": name, "file": f"{name}_{i:04d}.jpg", "bytes": _jpeg(10 * j + i)}
        for j, (name, n) in enumerate(PEOPLE.items())
        for i in range(1, n + 1)
    ]
    return rows[::-1]


def _check_schema(ds: Dataset) -> None:
    assert ds.features == SOURCE_FEATURES
    assert ds.column_names == ["image", "label", "identity", "path"]
    labels = labels_of(ds)
    assert labels.dtype == np.int64
    names = sorted(set(ds["identity"]))
    assert labels.tolist() == [names.index(n) for n in ds["identity"]]  # dense, ordered by name


# ----------------------------------------------------------------------------------------------- folder


def test_folder_source_layout_labels_and_paths(tmp_path):
    root = _folder(tmp_path / "faces")
    ds = load_source(root)
    _check_schema(ds)
    assert len(ds) == 6
    assert ds["identity"] == ["Bob_Brown"] * 2 + ["Zoe_Zed"] * 3 + ["alice"]
    assert labels_of(ds).tolist() == [0, 0, 1, 1, 1, 2]
    assert ds["path"][0] == "Bob_Brown/Bob_Brown_0001.jpg"
    row = ds[0]["image"]
    assert row["bytes"] is None and Path(row["path"]).is_absolute()
    assert Path(row["path"]).read_bytes() == (root / ds["path"][0]).read_bytes()
    assert Image.open(row["path"]).size == (8, 8)
    assert load_source(str(root))["path"] == ds["path"]  # str and Path alike


def test_folder_source_skips_hidden_and_non_images_and_keeps_all_extensions(tmp_path):
    root = _folder(tmp_path / "faces")
    (root / ".cache").mkdir()
    (root / ".cache" / "x.jpg").write_bytes(b"x")
    (root / "Bob_Brown" / ".hidden.jpg").write_bytes(b"x")
    (root / "Bob_Brown" / "notes.txt").write_text("x")
    (root / "Bob_Brown" / "upper.JPEG").write_bytes(_jpeg(5))
    (root / "Bob_Brown" / "pic.webp").write_bytes(b"x")
    (root / "Bob_Brown" / "pic.png").write_bytes(b"x")
    (root / "Empty_Person").mkdir()
    (root / "README.md").write_text("not a folder")
    ds = load_source(root)
    bob = [p for p in ds["path"] if p.startswith("Bob_Brown/")]
    assert bob == [
        "Bob_Brown/Bob_Brown_0001.jpg",
        "Bob_Brown/Bob_Brown_0002.jpg",
        "Bob_Brown/pic.png",
        "Bob_Brown/pic.webp",
        "Bob_Brown/upper.JPEG",
    ]
    assert set(ds["identity"]) == set(PEOPLE)  # no label for the empty folder: labels stay dense
    assert labels_of(ds).max() == len(PEOPLE) - 1


def test_bundled_lfw_sample_as_folder(lfw_sample):
    ds = load_source(lfw_sample / "lfw-deepfunneled")
    _check_schema(ds)
    assert 300 <= len(ds) <= 450
    assert all(p.split("/")[1].startswith(p.split("/")[0] + "_") for p in ds["path"])


def test_folder_errors_name_the_folder_and_layout(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match=r"empty.*no identity subfolders.*<root>/<Identity>/<image>"):
        load_source(empty)
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(_jpeg(1))
    with pytest.raises(SourceError, match="flat"):
        load_source(flat)
    _folder(tmp_path / "lfw" / "lfw-deepfunneled")
    with pytest.raises(SourceError, match=r"did you mean .*lfw-deepfunneled"):
        load_source(tmp_path / "lfw")


def test_missing_paths_and_wrong_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_source(tmp_path / "no_such_dir")
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet"):
        load_source(str(tmp_path / "missing.parquet"))
    with pytest.raises(FileNotFoundError, match="glob"):
        load_source(str(tmp_path / "*.parquet"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(SourceError, match=r"x\.csv.*not a \.parquet file"):
        load_source(tmp_path / "x.csv")


def test_labels_of_follows_select_and_shuffle(lfw_sample):
    ds = load_source(lfw_sample / "lfw-deepfunneled")
    sub = ds.shuffle(seed=0).select(range(0, len(ds), 3))
    assert labels_of(sub).tolist() == list(sub["label"])
    assert arrow_column(sub, "identity").to_pylist() == list(sub["identity"])
    with pytest.raises(KeyError, match="label"):
        labels_of(sub.remove_columns("label"))


@pytest.mark.slow
def test_folder_table_for_3m_files_is_fast():
    """The Dataset for a VGGFace2-sized folder (3.3 M files, 9,131 people) builds in seconds, labels in ms."""
    n_ids, per = 9131, 362
    names = [f"n{i:06d}" for i in range(n_ids)]
    rel = [f"{n}/{j:04d}_01.jpg" for n in names for j in range(per)]
    t0 = time.perf_counter()
    ds = sources.folder_dataset(Path("/data/vggface2/train"), names, rel, [per] * n_ids)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = labels_of(ds)
    read = time.perf_counter() - t0
    assert len(ds) == n_ids * per and labels[-1] == n_ids - 1
    assert ds[per]["path"] == "n000001/0000_01.jpg"
    assert built < 20 and read < 1, (built, read)


# ---------------------------------------------------------------------------------------------- parquet


def _parquet_ds(image_col="image", label_col="label", *, classlabel=True) -> Dataset:
    rows = _rows()
    names = sorted(PEOPLE)
    label_feature = ClassLabel(names=names) if classlabel else Value("string")
    return Dataset.from_dict(
        {
            image_col: [{"bytes": r["bytes"], "path": r["file"]} for r in rows],
            label_col: [names.index(r["name"]) if classlabel else r["name"] for r in rows],
        },
        features=Features({image_col: ImageFeature(), label_col: label_feature}),
    )


def test_parquet_file_glob_and_folder(tmp_path):
    ds = _parquet_ds()
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.select(range(3)).to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00002.parquet"))
    ds.select(range(3, 6)).to_parquet(str(tmp_path / "pq" / "data" / "train-00001-of-00002.parquet"))
    cache = tmp_path / "cache"
    one = load_source(tmp_path / "pq" / "data" / "train-00000-of-00002.parquet", cache_dir=cache)
    assert len(one) == 3
    for src in (str(tmp_path / "pq" / "data" / "*.parquet"), tmp_path / "pq"):
        out = load_source(src, cache_dir=cache)
        _check_schema(out)
        assert len(out) == 6
        assert sorted(out["identity"]) == sorted(r["name"] for r in _rows())
        assert sorted(out["path"]) == sorted(r["file"] for r in _rows())
        first = out[0]
        assert isinstance(first["image"]["bytes"], bytes)
        assert Image.open(io.BytesIO(first["image"]["bytes"])).size == (8, 8)
        assert out.cache_files, "the image bytes should stay in the memory-mapped Arrow cache"
        assert first["identity"] == next(r["name"] for r in _rows() if r["file"] == first["path"])


def test_parquet_column_mapping_options_and_string_labels(tmp_path):
    path = tmp_path / "faces.parquet"
    _parquet_ds("picture", "who", classlabel=False).to_parquet(str(path))
    with pytest.raises(SourceError, match=r"no image column.*\['picture', 'who'\].*'img'.*image_column="):
        load_source(path, cache_dir=tmp_path / "c")
    with pytest.raises(SourceError, match=r"no label column.*\['picture', 'who'\].*'person'.*label_column="):
        load_source(path, image_column="picture", cache_dir=tmp_path / "c")
    with pytest.raises(SourceError, match=r"no column 'photo' \(image_column\).*\['picture', 'who'\]"):
        load_source(path, image_column="photo", cache_dir=tmp_path / "c")
    out = load_source(path, image_column="picture", label_column="who", cache_dir=tmp_path / "c")
    _check_schema(out)
    assert dict(zip(out["path"], out["identity"], strict=True))["alice_0001.jpg"] == "alice"
    # a string column can also be given as the name column alone
    same = load_source(path, image_column="picture", name_column="who", cache_dir=tmp_path / "c")
    assert same["label"] == out["label"] and same["identity"] == out["identity"]


def test_parquet_candidate_names_binary_and_path_images(tmp_path):
    rows = _rows()
    Dataset.from_dict({"img": [r["bytes"] for r in rows], "person": [r["name"] for r in rows]}).to_parquet(
        str(tmp_path / "bin.parquet")
    )
    out = load_source(tmp_path / "bin.parquet", cache_dir=tmp_path / "c")
    _check_schema(out)
    assert out["path"] == [""] * len(rows)
    assert out[0]["image"]["bytes"] == rows[0]["bytes"]
    files = []
    for r in rows:
        (tmp_path / r["file"]).write_bytes(r["bytes"])
        files.append(str(tmp_path / r["file"]))
    Dataset.from_dict({"face": files, "name": [r["name"] for r in rows]}).to_parquet(
        str(tmp_path / "p.parquet")
    )
    out = load_source(tmp_path / "p.parquet", cache_dir=tmp_path / "c")
    assert out["path"] == files and out[0]["image"] == {"bytes": None, "path": files[0]}
    # a {bytes, path} struct written without Hugging Face metadata
    struct = pa.StructArray.from_arrays(
        [pa.array([r["bytes"] for r in rows]), pa.array([r["file"] for r in rows])], names=["bytes", "path"]
    )
    pq.write_table(pa.table({"jpg": struct, "class": [r["name"] for r in rows]}), tmp_path / "s.parquet")
    out = load_source(tmp_path / "s.parquet", cache_dir=tmp_path / "c")
    _check_schema(out)
    assert out[0]["image"] == {"bytes": rows[0]["bytes"], "path": rows[0]["file"]}


def test_integer_labels_with_and_without_names(tmp_path):
    rows = _rows()
    ids = {"Zoe_Zed": 7, "alice": 30, "Bob_Brown": 100}
    Dataset.from_dict(
        {
            "image": [{"bytes": r["bytes"], "path": None} for r in rows],
            "id": [ids[r["name"]] for r in rows],
            "full_name": [r["name"] for r in rows],
        },
        features=Features({"image": ImageFeature(), "id": Value("int32"), "full_name": Value("string")}),
    ).to_parquet(str(tmp_path / "ints.parquet"))
    bare = load_source(tmp_path / "ints.parquet", cache_dir=tmp_path / "c")
    assert bare.features == SOURCE_FEATURES
    # bare integers: named str(value), ordered by value, densified
    assert sorted(set(zip(bare["label"], bare["identity"], strict=True))) == [(0, "7"), (1, "30"), (2, "100")]
    assert bare["path"] == [""] * len(rows)
    named = load_source(tmp_path / "ints.parquet", name_column="full_name", cache_dir=tmp_path / "c")
    _check_schema(named)
    assert set(named["identity"]) == set(PEOPLE)


def test_label_errors(tmp_path):
    rows = _rows()
    img = [{"bytes": r["bytes"], "path": None} for r in rows]
    feats = {"image": ImageFeature()}
    Dataset.from_dict(
        {"image": img, "label": [1, 1, 2, 2, 3, 3], "name": ["a", "b", "c", "c", "d", "d"]},
        features=Features({**feats, "label": Value("int64"), "name": Value("string")}),
    ).to_parquet(str(tmp_path / "clash.parquet"))
    with pytest.raises(
        SourceError, match=r"do not name the same identities one-to-one.*\(1, 'a'\), \(1, 'b'\)"
    ):
        load_source(tmp_path / "clash.parquet", name_column="name", cache_dir=tmp_path / "c")
    Dataset.from_dict(
        {"image": img, "label": [1, None, 2, 2, 3, 3]}, features=Features({**feats, "label": Value("int64")})
    ).to_parquet(str(tmp_path / "null.parquet"))
    with pytest.raises(SourceError, match=r"null\.parquet.*'label' has 1 empty values"):
        load_source(tmp_path / "null.parquet", cache_dir=tmp_path / "c")
    Dataset.from_dict(
        {"image": img, "label": [0.5] * 6}, features=Features({**feats, "label": Value("float32")})
    ).to_parquet(str(tmp_path / "float.parquet"))
    with pytest.raises(SourceError, match=r"float\.parquet.*'label' has type .*float32.*expected integers"):
        load_source(tmp_path / "float.parquet", cache_dir=tmp_path / "c")
    Dataset.from_dict(
        {"image": [1] * 6, "label": [0] * 6},
        features=Features({"image": Value("int64"), "label": Value("int64")}),
    ).to_parquet(str(tmp_path / "badimg.parquet"))
    with pytest.raises(
        SourceError, match=r"image column 'image' has type .*int64.*expected an Image feature"
    ):
        load_source(tmp_path / "badimg.parquet", cache_dir=tmp_path / "c")


# ---------------------------------------------------------------------------------------- Hub (offline)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """Stand-ins for Hub datasets, served offline.

    Only the final call target ``datasets.load_dataset`` is monkeypatched: for the ids below it loads a local
    folder with the real ``datasets.load_dataset`` (so the Hub code path of ``load_source``, its column mapping
    and label remapping run unchanged); every call is recorded.
    """
    rows = _rows()
    # 1) an imagefolder with metadata.csv and non-standard column names (like Hub LFW image folders)
    folder = tmp_path / "hub_imagefolder"
    (folder / "train").mkdir(parents=True)
    lines = ["file_name,celebrity,photo_id"]
    for i, r in enumerate(rows):
        (folder / "train" / r["file"]).write_bytes(r["bytes"])
        lines.append(f"{r['file']},{r['name']},{i}")
    (folder / "train" / "metadata.csv").write_text("\n".join(lines) + "\n")
    # 2) a parquet dataset with a ClassLabel under candidate names (img, labels) and a test split
    pq = tmp_path / "hub_parquet" / "data"
    pq.mkdir(parents=True)
    _parquet_ds("img", "labels").to_parquet(str(pq / "train-00000-of-00001.parquet"))
    _parquet_ds("img", "labels").select(range(2)).to_parquet(str(pq / "test-00000-of-00001.parquet"))
    stand_ins = {"someone/lfw-imagefolder": folder, "someone/faces-parquet": pq.parent}
    calls = []

    def load_dataset(path, *args, **kwargs):
        calls.append((path, dict(kwargs)))
        if path in stand_ins:
            kwargs["cache_dir"] = str(tmp_path / "cache")
            return REAL_LOAD_DATASET(str(stand_ins[path]), *args, **kwargs)
        return REAL_LOAD_DATASET(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_hub_imagefolder_with_metadata(fake_hub):
    with pytest.raises(
        SourceError, match=r"someone/lfw-imagefolder.*no label column.*'celebrity'.*label_column="
    ):
        load_source("someone/lfw-imagefolder")
    out = load_source("someone/lfw-imagefolder", label_column="celebrity")
    assert fake_hub[-1] == ("someone/lfw-imagefolder", {"split": "train", "cache_dir": None})
    _check_schema(out)
    assert sorted(out["identity"]) == sorted(r["name"] for r in _rows())
    for row in out:  # the local file path is kept, and matches the identity
        assert Path(row["path"]).name.startswith(row["identity"] + "_") and Path(row["path"]).is_file()
        assert row["image"]["path"] == row["path"]


def test_hub_parquet_classlabel_and_split(fake_hub):
    out = load_source("someone/faces-parquet")
    _check_schema(out)
    assert len(out) == 6 and set(out["identity"]) == set(PEOPLE)
    test = load_source("someone/faces-parquet", split="test")
    assert fake_hub[-1][1]["split"] == "test" and len(test) == 2
    names = sorted(set(test["identity"]))
    assert test["label"] == [names.index(n) for n in test["identity"]]  # re-densified per split


def test_hub_unavailable_offline_is_a_clear_error():
    with pytest.raises(
        SourceError, match=r"'nobody-xyz/no-such-dataset' as Hugging Face Hub dataset.*Hub dataset id"
    ):
        load_source("nobody-xyz/no-such-dataset")
    with pytest.raises(FileNotFoundError, match="not a Hub dataset id"):
        load_source("not/a/hub/id")

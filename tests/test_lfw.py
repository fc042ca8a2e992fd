"""LFW pairs parsing (View 1, View 2, small samples), folds, identity-disjoint splits, the bundled sample."""

from __future__ import annotations

import filecmp
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from facenet_hf.data.lfw import (
    LFWPairs,
    PairsFormatError,
    SplitOverlapError,
    check_disjoint,
    find_image_root,
    identity_disjoint_split,
    missing_pair_images,
    pair_identities,
    read_pairs,
)
from facenet_hf.data.sources import labels_of, load_source

ROOT = Path(__file__).resolve().parent.parent


def _write(tmp_path: Path, text: str, name: str = "pairs.txt") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TWO_FOLDS = """2\t2
Ann\t1\t2
Bob\t1\t3
Ann\t1\tCid\t1
Bob\t2\tDan\t4
Eve\t1\t2
Fay\t2\t3
Eve\t1\tGus\t1
Hal\t1\tFay\t1
"""


# ------------------------------------------------------------------------------------------------ parsing


def test_read_small_view2_file(tmp_path):
    pairs = read_pairs(_write(tmp_path, TWO_FOLDS))
    assert len(pairs) == 8 and pairs.folds == [1, 2]
    assert pairs.fold.tolist() == [1, 1, 1, 1, 2, 2, 2, 2]
    assert pairs.is_same.tolist() == [True, True, False, False] * 2
    assert pairs.is_same.dtype == bool and pairs.idx1.dtype == np.int64
    assert pairs.name1[2] == "Ann" and pairs.name2[2] == "Cid" and pairs.idx2[3] == 4
    p1, p2 = pairs.paths()
    assert p1[0] == "Ann/Ann_0001.jpg" and p2[0] == "Ann/Ann_0002.jpg" and p2[3] == "Dan/Dan_0004.jpg"
    assert pairs.people(1) == {"Ann", "Bob", "Cid", "Dan"} == pair_identities(pairs, [1])
    assert pairs.people() == pairs.people([1, 2])
    two = pairs.select_folds(2)
    assert len(two) == 4 and two.folds == [2] and two.people() == {"Eve", "Fay", "Gus", "Hal"}
    with pytest.raises(ValueError, match=r"folds \[3\] are not in the pairs; valid folds are \[1, 2\]"):
        pairs.select_folds([2, 3])


def test_read_view1_file_and_spaces(tmp_path):
    text = "2\nAnn 1 2\nBob  1  3\nAnn\t1\tCid\t1\nBob 2 Dan 4\n\n"
    pairs = read_pairs(_write(tmp_path, text, "pairsDevTest.txt"))
    assert len(pairs) == 4 and pairs.folds == [1]
    assert pairs.is_same.tolist() == [True, True, False, False]


@pytest.mark.parametrize(
    ("text", "line", "match"),
    [
        ("", None, "empty"),
        ("ten 300\n", 1, "bad header"),
        ("1 2 3\nAnn 1 2\n", 1, "bad header"),
        ("0 5\n", 1, "positive"),
        (
            TWO_FOLDS.replace("Bob\t1\t3", "Bob\t1\tEd\t3"),
            3,
            r"expected a matched pair .*fold 1, matched pair 2",
        ),
        (
            TWO_FOLDS.replace("Hal\t1\tFay\t1", "Hal\t1\t1"),
            9,
            r"expected a mismatched pair .*fold 2, mismatched",
        ),
        (TWO_FOLDS.replace("Eve\t1\t2", "Eve\t1\tx"), 6, "image numbers must be positive integers"),
        (TWO_FOLDS.replace("Eve\t1\t2", "Eve\t0\t2"), 6, "image numbers must be positive integers"),
        (TWO_FOLDS.replace("Eve\t1\t2", "7\t1\t2"), 6, "a name is a number"),
    ],
)
def test_malformed_lines_name_file_line_and_format(tmp_path, text, line, match):
    path = _write(tmp_path, text)
    with pytest.raises(PairsFormatError, match=match) as err:
        read_pairs(path)
    msg = str(err.value)
    assert str(path) in msg and "NameA<TAB>i<TAB>NameB<TAB>j" in msg
    if line is not None:
        assert f"line {line}:" in msg and repr(text.splitlines()[line - 1]) in msg


def test_wrong_count_against_header(tmp_path):
    short = _write(tmp_path, TWO_FOLDS.rsplit("\n", 2)[0] + "\n")
    with pytest.raises(PairsFormatError, match=r"2 fold\(s\) x 2 x 2 = 8 pairs, but the file has 7"):
        read_pairs(short)
    long = _write(tmp_path, TWO_FOLDS + "Ann\t2\t3\n", "long.txt")
    with pytest.raises(PairsFormatError, match="has 9 pair lines"):
        read_pairs(long)
    with pytest.raises(FileNotFoundError, match=r"nope\.txt"):
        read_pairs(tmp_path / "nope.txt")


def test_lfwpairs_checks_lengths():
    with pytest.raises(ValueError, match="one length"):
        LFWPairs(["a"], [1], ["a"], [2], [True, False], [1])


# ----------------------------------------------------------------------------------- the bundled sample


def test_bundled_sample_pairs_and_images(lfw_sample):
    pairs = read_pairs(lfw_sample / "pairs.txt")
    assert (lfw_sample / "pairs.txt").read_text().startswith("10\t6\n")
    assert len(pairs) == 120 and pairs.folds == list(range(1, 11))
    for f in pairs.folds:
        fold = pairs.select_folds(f)
        assert fold.is_same.sum() == 6 and (~fold.is_same).sum() == 6
    people = [pairs.people(f) for f in pairs.folds]
    assert all(not (a & b) for i, a in enumerate(people) for b in people[i + 1 :]), "folds share people"
    root = lfw_sample / "lfw-deepfunneled"
    assert find_image_root(lfw_sample) == root and find_image_root(root) == root
    assert missing_pair_images(root, pairs) == []
    assert missing_pair_images(lfw_sample, pairs)  # wrong root: everything missing
    assert (lfw_sample / "README.md").is_file()


def test_bundled_sample_size_and_training_people(lfw_sample):
    files = [p for p in (lfw_sample / "lfw-deepfunneled").rglob("*") if p.is_file()]
    assert 350 <= len(files) <= 450 and all(p.suffix == ".jpg" for p in files)
    assert sum(p.stat().st_size for p in lfw_sample.rglob("*") if p.is_file()) < 6_000_000
    pairs = read_pairs(lfw_sample / "pairs.txt")
    counts: dict[str, int] = {}
    for p in files:
        counts[p.parent.name] = counts.get(p.parent.name, 0) + 1
    extra = {n: c for n, c in counts.items() if n not in pairs.people()}
    assert len(extra) >= 20 and all(c >= 4 for c in extra.values())


def test_identity_disjoint_split_on_sample(lfw_sample):
    ds = load_source(lfw_sample / "lfw-deepfunneled")
    pairs = read_pairs(lfw_sample / "pairs.txt")
    train, held = identity_disjoint_split(ds, pairs, 10)
    assert held.folds == [10] and len(held) == 12
    assert held.name1.tolist() == pairs.select_folds(10).name1.tolist()
    names = set(train["identity"])
    assert not names & pairs.people(10)
    assert names == set(ds["identity"]) - pairs.people(10)
    assert len(train) == sum(n not in pairs.people(10) for n in ds["identity"])
    # labels re-densified, still ordered by name; other columns kept as they were
    labels = labels_of(train)
    order = sorted(names)
    assert labels.tolist() == [order.index(n) for n in train["identity"]]
    assert train.column_names == ds.column_names and train.features == ds.features
    row = train[0]
    assert row["image"]["bytes"] is None and row["image"]["path"].endswith(row["path"])
    check_disjoint(train, held)  # no error
    # several folds at once
    train2, held2 = identity_disjoint_split(ds, pairs, [9, 10])
    assert held2.folds == [9, 10] and not set(train2["identity"]) & pairs.people([9, 10])
    assert labels_of(train2).max() == len(set(train2["identity"])) - 1
    with pytest.raises(ValueError, match=r"folds \[11\] are not in the pairs"):
        identity_disjoint_split(ds, pairs, 11)


def test_split_refusal_names_people(lfw_sample, tmp_path):
    ds = load_source(lfw_sample / "lfw-deepfunneled")
    pairs = read_pairs(lfw_sample / "pairs.txt")
    with pytest.raises(SplitOverlapError, match=r"^\d+ people are both training identities") as err:
        check_disjoint(ds, pairs)  # training on everyone, scoring all folds: refused
    assert isinstance(err.value, ValueError)
    overlap = sorted(set(ds["identity"]) & pairs.people())
    assert str(err.value).startswith(f"{len(overlap)} people")
    assert ", ".join(overlap[:10]) + ", ..." in str(err.value)
    assert overlap[10] not in str(err.value)
    with pytest.raises(SplitOverlapError, match=r"^1 people.*: Ann;"):
        check_disjoint({"Ann", "Zed"}, read_pairs(_write(tmp_path, TWO_FOLDS)))


# ------------------------------------------------------------------------------------------ the full LFW


@pytest.mark.lfw
def test_full_lfw_pairs(full_lfw):
    pairs = read_pairs(full_lfw / "pairs.txt")
    assert len(pairs) == 6000 and pairs.folds == list(range(1, 11))
    assert pairs.is_same.sum() == 3000
    assert all(len(pairs.select_folds(f)) == 600 for f in pairs.folds)
    people = [pairs.people(f) for f in pairs.folds]
    assert all(not (a & b) for i, a in enumerate(people) for b in people[i + 1 :]), "folds share people"
    p1, p2 = pairs.paths()
    assert len(set(p1) | set(p2)) == 7701
    root = find_image_root(full_lfw)
    assert missing_pair_images(root, pairs) == []


@pytest.mark.lfw
def test_full_lfw_identity_disjoint_split(full_lfw):
    ds = load_source(find_image_root(full_lfw))
    assert len(ds) == 13233 and len(set(ds["identity"])) == 5749
    pairs = read_pairs(full_lfw / "pairs.txt")
    train, held = identity_disjoint_split(ds, pairs, 10)
    labels = labels_of(train)
    counts = np.bincount(labels)
    assert len(held) == 600
    assert (counts >= 2).sum() == 1505 and counts[counts >= 2].sum() == 7829  # figures from the LFW README
    assert (counts >= 4).sum() == 557


@pytest.mark.lfw
def test_make_lfw_sample_reproduces_bundled_sample(full_lfw, lfw_sample, tmp_path):
    spec = importlib.util.spec_from_file_location("make_lfw_sample", ROOT / "scripts" / "make_lfw_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "sample"
    assert module.main(["--lfw-dir", str(full_lfw), "--out", str(out)]) == 0
    made = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    bundled = sorted(p.relative_to(lfw_sample).as_posix() for p in lfw_sample.rglob("*") if p.is_file())
    assert made == bundled
    _, mismatch, errors = filecmp.cmpfiles(out, lfw_sample, made, shallow=False)
    assert not mismatch and not errors
    with pytest.raises(FileExistsError, match="--overwrite"):
        module.main(["--lfw-dir", str(full_lfw), "--out", str(out)])

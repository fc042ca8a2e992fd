"""``data.exclude_identities_file``: listed identities are dropped from every training source before sampling
(never in a batch), ``source:name`` targets one extra source, bad files and lines are refused by name and line,
and a name no source holds is a warning, not an error."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import SAMPLE, tiny_train_args

from facenet_hf.cli.train import parse_train_config, run_training, train_parser
from facenet_hf.config import ConfigError, load_config, read_exclusion_file
from facenet_hf.data.lfw import SplitOverlapError, read_pairs
from facenet_hf.data.sources import SOURCE_COLUMN, labels_of
from facenet_hf.training import Callback
from facenet_hf.training.build import build_data

LFW = ["data.lfw_dir=" + str(SAMPLE / "lfw-deepfunneled"), "data.pairs=" + str(SAMPLE / "pairs.txt")]
BUILD_LOG = "facenet_hf.training.build"


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


def _training_people(min_images: int = 2) -> list[str]:
    """The sample's training people outside fold 10 with at least ``min_images`` images, sorted."""
    ds, _ = build_data(load_config(None, LFW))
    counts = np.bincount(labels_of(ds))
    names = np.array(ds["identity"])
    labels = labels_of(ds)
    return sorted({str(names[labels == i][0]) for i in np.flatnonzero(counts >= min_images)})


class Identities(Callback):
    """The identity (the image's folder) of every image of every training batch."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def on_batch(self, run, batch) -> None:
        self.seen.extend(Path(p).parent.name for p in batch["path"])


def test_excluded_people_are_never_in_a_training_batch(tmp_path, caplog):
    people = _training_people()
    kept = people[:5]  # everyone else who could be sampled is listed: batches may hold these five only
    dropped = people[5:]
    lines = ["# people to leave out of training", "", *(f"{n}  # listed" for n in dropped)]
    exclude = _write(tmp_path / "exclude.txt", "\n".join(lines) + "\n")
    recorder = Identities()
    args = tiny_train_args(
        SAMPLE, tmp_path / "run", f"--data.exclude_identities_file={exclude}", "--train.max_steps=6"
    )
    cfg, parsed = parse_train_config(args, train_parser())
    with caplog.at_level(logging.INFO, logger=BUILD_LOG):
        assert run_training(cfg, parsed, callbacks=[recorder]) == 0
    assert len(recorder.seen) == 6 * 4 * 2
    assert set(recorder.seen) <= set(kept)
    assert not set(recorder.seen) & set(dropped)
    logged = [r.getMessage() for r in caplog.records if r.name == BUILD_LOG]
    assert any(f"dropped {len(dropped)} identities" in m and str(exclude) in m for m in logged)
    assert not any("match no identity" in m for m in logged)
    saved = load_config(tmp_path / "run" / "config.yaml")
    assert saved.data.exclude_identities_file == str(exclude)


def test_counts_and_labels_after_dropping(tmp_path, caplog):
    full, _ = build_data(load_config(None, LFW))
    people = _training_people()
    names = np.array(full["identity"])
    drop = people[:3]
    exclude = _write(tmp_path / "x.txt", "\n".join(drop) + "\n" + drop[0] + "\n")  # a repeat counts once
    with caplog.at_level(logging.INFO, logger=BUILD_LOG):
        ds, _ = build_data(load_config(None, [*LFW, f"data.exclude_identities_file={exclude}"]))
    images = int(np.isin(names, drop).sum())
    assert len(ds) == len(full) - images
    assert not set(ds["identity"]) & set(drop)
    labels = labels_of(ds)
    assert sorted(set(labels.tolist())) == list(range(len(set(full["identity"])) - 3))  # dense again
    assert any(f"dropped 3 identities ({images} images)" in r.getMessage() for r in caplog.records)


def test_unknown_names_are_a_warning_naming_them(tmp_path, caplog):
    person = _training_people()[0]
    exclude = _write(tmp_path / "x.txt", f"{person}\nNo_Such_Person\nn000123\n")
    with caplog.at_level(logging.INFO, logger=BUILD_LOG):
        ds, _ = build_data(load_config(None, [*LFW, f"data.exclude_identities_file={exclude}"]))
    assert person not in set(ds["identity"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 listed names match no identity" in warnings[0]
    assert "'No_Such_Person' (line 2)" in warnings[0] and "'n000123' (line 3)" in warnings[0]
    assert person not in warnings[0]


def test_an_empty_list_trains_on_everything_with_a_warning(tmp_path, caplog):
    exclude = _write(tmp_path / "x.txt", "# nothing listed yet\n\n   \n")
    full, _ = build_data(load_config(None, LFW))
    with caplog.at_level(logging.INFO, logger=BUILD_LOG):
        ds, _ = build_data(load_config(None, [*LFW, f"data.exclude_identities_file={exclude}"]))
    assert len(ds) == len(full)
    assert any("lists no identities" in r.getMessage() for r in caplog.records)


def _people_folder(root: Path, people: list[str]) -> Path:
    for name in people:
        shutil.copytree(SAMPLE / "lfw-deepfunneled" / name, root / name)
    return root


def test_a_prefix_targets_one_extra_source_and_a_plain_name_every_source(tmp_path):
    a, b, c = _training_people()[:3]
    mine = _people_folder(tmp_path / "mine", [a, b, c])
    exclude = _write(tmp_path / "x.txt", f"mine:{a}\n{b}\n")
    extra = "data.extra_sources=" + json.dumps([{"path": str(mine), "name": "mine"}])
    ds, _ = build_data(load_config(None, [*LFW, extra, f"data.exclude_identities_file={exclude}"]))
    ident = np.array(ds["identity"])
    src = np.array(ds[SOURCE_COLUMN])
    assert set(ident[src == "mine"]) == {f"mine:{c}"}  # a: targeted; b: plain, dropped here too
    first = set(ident[src == ""])
    assert a in first and b not in first and c in first  # mine:a leaves the first source's a alone
    with pytest.raises(ConfigError, match=r"line 1: 'mine:' has an empty source or name"):
        read_exclusion_file(_write(tmp_path / "y.txt", "mine:\n"), ["mine"])


def test_outside_data_with_an_lfw_person_trains_once_the_person_is_listed(tmp_path):
    """The VGGFace2 case in small: a training source holding a person of the scored pairs is refused
    (holdout_folds: []); listing that person drops them, and every LFW fold is scored."""
    everyone = read_pairs(SAMPLE / "pairs.txt").people()
    pair_person = sorted(read_pairs(SAMPLE / "pairs.txt").people(3))[0]
    others = [n for n in _training_people() if n not in everyone][:4]
    folder = _people_folder(tmp_path / "faces", [pair_person, *others])
    base = [*LFW, f"data.train_source={folder}", "data.holdout_folds=[]"]
    with pytest.raises(SplitOverlapError, match=pair_person):
        build_data(load_config(None, base))
    exclude = _write(tmp_path / "overlap.txt", f"# LFW people in this source\n{pair_person}\n")
    ds, pairs = build_data(load_config(None, [*base, f"data.exclude_identities_file={exclude}"]))
    assert pair_person not in set(ds["identity"]) and len(set(ds["identity"])) == 4
    assert pairs.folds == list(range(1, 11))


def test_a_missing_file_is_refused_by_name(tmp_path):
    missing = tmp_path / "nope.txt"
    cfg = load_config(None, [*LFW, f"data.exclude_identities_file={missing}"])  # the config text is valid
    with pytest.raises(ConfigError, match=r"data.exclude_identities_file: '.*nope\.txt' does not exist"):
        build_data(cfg)
    with pytest.raises(ConfigError, match=r"is a folder"):
        build_data(load_config(None, [*LFW, f"data.exclude_identities_file={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"data.exclude_identities_file: an empty path"):
        load_config(None, [*LFW, "data.exclude_identities_file=' '"])


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("n000001\n# ok\nn000002, 14th_Dalai_Lama, 136, 0, m\n", 3, "is not one identity name"),
        ("Aaron Eckhart\n", 1, "is not one identity name"),
        ('n000001\n"n000002"\n', 2, "is not one identity name"),
        ("n000001\n\n:n000002\n", 3, "has an empty source or name"),
        (b"n000001\n\xff\xfe\n", 2, "not UTF-8 text"),
    ],
)
def test_bad_lines_are_refused_with_file_and_line(tmp_path, text, line, what):
    exclude = _write(tmp_path / "bad.txt", text)
    cfg = load_config(None, [*LFW, f"data.exclude_identities_file={exclude}"])
    with pytest.raises(ConfigError, match=rf"'.*bad\.txt', line {line}: .*{what}"):
        build_data(cfg)


def test_dropping_every_identity_of_a_source_is_an_error(tmp_path):
    people = sorted(p.name for p in (SAMPLE / "lfw-deepfunneled").iterdir() if p.is_dir())
    exclude = _write(tmp_path / "all.txt", "\n".join(people) + "\n")
    with pytest.raises(ConfigError, match=r"drops every identity of the first source"):
        build_data(load_config(None, [*LFW, f"data.exclude_identities_file={exclude}"]))


def test_read_exclusion_file_keeps_the_first_line_of_each_name(tmp_path):
    f = _write(tmp_path / "x.txt", "\ufeffa  # comment\nb\na\ncel:7\nother:8\n")
    ex = read_exclusion_file(f, ["cel"])
    assert ex.lines == {(None, "a"): 1, (None, "b"): 2, ("cel", "7"): 4, (None, "other:8"): 5}
    assert ex.names_for(None) == {"a", "b", "other:8"}
    assert ex.names_for("cel") == {"a", "b", "other:8", "7"}
    assert len(ex) == 4

"""Config: file < overrides precedence, typo errors with suggestions, type and range errors, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from facenet_hf.cli.common import overrides_from_argv
from facenet_hf.config import Config, ConfigError, all_keys, load_config, save_config

ROOT = Path(__file__).resolve().parent.parent
BASE = ["data.lfw_dir=/x", "data.pairs=/x/pairs.txt"]


def test_every_shipped_config_loads():
    files = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(files) >= 4
    for f in files:
        cfg = load_config(f, ["train.mixed_precision=no"])  # fp16 presets need a GPU
        assert isinstance(cfg, Config)


def test_the_vggface2_presets_are_one_block_per_gpu_with_global_mining():
    from facenet_hf.config import read_exclusion_file

    g1 = load_config(ROOT / "configs/vggface2/r50_vggface2_112_g1.yaml")
    g8 = load_config(ROOT / "configs/vggface2/r50_vggface2_112_g8.yaml")
    for cfg in (g1, g8):
        assert (cfg.model.backbone, cfg.model.image_size, cfg.model.alignment) == (
            "resnet50",
            112,
            "five_point",
        )
        assert cfg.train.mixed_precision == "bf16" and cfg.data.holdout_folds == []
        assert cfg.data.train_source == "data/vggface2-112/train" and cfg.data.pairs
        assert cfg.data.exclude_identities_file == "configs/vggface2/lfw_overlap_example.txt"
    assert (g1.data.p, g1.data.k) == (g8.data.p, g8.data.k) == (32, 4)  # the same block on every GPU
    assert not g1.loss.global_mining and g8.loss.global_mining
    assert g8.train.lr == pytest.approx(g1.train.lr * (8 * 128 / 128) ** 0.5, rel=1e-3)  # square-root rule
    template = read_exclusion_file(ROOT / g1.data.exclude_identities_file)
    assert len(template) == 0  # a template: the real overlap list is the user's to make (docs/scaling.md)


def test_seed_recipe_preset_matches_its_name():
    cfg = load_config(ROOT / "configs/lfw/r18_lfw_224_e2_adam_g1.yaml", ["train.mixed_precision=no"])
    assert (cfg.model.backbone, cfg.model.image_size, cfg.train.epochs) == ("resnet18", 224, 2)
    assert (cfg.train.optimizer, cfg.train.lr, cfg.data.p, cfg.data.k) == ("adam", 1e-4, 8, 8)
    assert cfg.loss.margin == 0.2


def test_yaml_no_and_off_stay_strings(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  mixed_precision: no\n  eval_flip: off\ndata:\n  lfw_dir: /a\n  pairs: /p\n")
    cfg = load_config(f)
    assert cfg.train.mixed_precision == "no" and cfg.train.eval_flip == "off"


def test_override_precedence_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        yaml.safe_dump({"train": {"lr": 0.5, "epochs": 3}, "data": {"lfw_dir": "/a", "pairs": "/p"}})
    )
    cfg = load_config(f, ["train.lr=1e-3", "data.holdout_folds=[9,10]", "train.max_steps=null"])
    assert cfg.train.lr == pytest.approx(1e-3) and cfg.train.epochs == 3
    assert cfg.data.holdout_folds == [9, 10] and cfg.train.max_steps is None


def test_typo_names_nearest_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*did you mean 'train\.lr'"):
        load_config(None, [*BASE, "train.lrr=0.1"])
    with pytest.raises(ConfigError, match=r"did you mean 'loss\.mining'"):
        load_config(None, [*BASE, "loss.minning=semihard"])


def test_typo_in_file_names_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  epoch: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*train\.epoch.*did you mean 'train\.epochs'"):
        load_config(f)


@pytest.mark.parametrize(
    "item, pattern",
    [
        ("loss.mining=semi_hard", r"loss\.mining: 'semi_hard' is not one of .*did you mean 'semihard'"),
        ("data.p=1", r"data\.p: 1 is out of range; it must be >= 2"),
        ("data.k=1", r"data\.k: 1 is out of range"),
        ("loss.margin=0", r"loss\.margin: 0.0 is out of range; it must be > 0"),
        ("train.epochs=two", r"train\.epochs: expected an integer, got 'two'"),
        ("train.channels_last=maybe", r"expected true/false"),
        ("data.prescan=full", r"data\.prescan: 'full' is not one of \['off', 'header', 'decode'\]"),
        ("data.max_bad_fraction=1.5", r"data\.max_bad_fraction: 1.5 is out of range; it must be in \[0, 1\]"),
        ("data.max_bad_fraction=-0.1", r"data\.max_bad_fraction: -0.1 is out of range"),
    ],
)
def test_bad_values_name_key_and_valid_range(item, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [*BASE, item])


def test_missing_data_and_holdout_without_pairs():
    with pytest.raises(ConfigError, match="train_source or data.lfw_dir"):
        load_config(None, [])
    with pytest.raises(ConfigError, match="holdout_folds needs data.pairs"):
        load_config(None, ["data.lfw_dir=/x"])
    with pytest.raises(ConfigError, match=r"data\.pairs needs data\.lfw_dir"):
        load_config(None, ["data.train_source=/x", "data.pairs=/p.txt"])
    # YAML reads a bare off as false: it still means prescan "off"
    assert load_config(None, [*BASE, "data.prescan=off"]).data.prescan == "off"


def test_fp16_config_is_valid_anywhere_and_refused_by_train_without_a_gpu(tmp_path):
    import torch

    from facenet_hf.training import train

    # a config file means the same on every machine: the GPU question is asked where the run is built
    cfg = load_config(None, [*BASE, "train.mixed_precision=fp16", f"output_dir={tmp_path / 'run'}"])
    assert cfg.train.mixed_precision == "fp16"
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: fp16 trains")
    with pytest.raises(ConfigError, match="fp16.*needs a CUDA GPU.*bf16"):
        train(cfg)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, [*BASE, "train.lr=3e-4", "data.p=4"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_argv_overrides_forms():
    assert overrides_from_argv(["--train.lr", "1e-3", "--data.p=8", "loss.margin=0.3"]) == [
        "train.lr=1e-3",
        "data.p=8",
        "loss.margin=0.3",
    ]
    with pytest.raises(ConfigError, match="needs a value"):
        overrides_from_argv(["--train.lr"])


def test_all_keys_cover_sections():
    keys = all_keys()
    assert "train.lr" in keys and "data.p" in keys and "loss.mining" in keys and "output_dir" in keys

"""FaceNet: unit embeddings, save/load round trip (safetensors, strict keys), config carried with weights."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from facenet_hf import FaceNet
from facenet_hf.model import CONFIG_FIELDS, InvalidConfigError, validate_config


def _tiny(**kw) -> FaceNet:
    torch.manual_seed(0)
    return FaceNet(backbone="resnet18", embedding_dim=32, image_size=32, **kw).eval()


def test_embeddings_are_unit_float32():
    model = _tiny()
    emb = model(torch.randn(3, 3, 32, 32))
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_bf16_autocast_still_gives_float32_unit_vectors():
    model = _tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        emb = model(torch.randn(2, 3, 32, 32))
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2), atol=1e-5, rtol=0)


def test_round_trip_same_embeddings_and_config(tmp_path):
    model = _tiny(threshold=0.9, eval_transforms=[{"center_crop": {"size": 150}}])
    x = torch.randn(2, 3, 32, 32)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["threshold"] == 0.9 and cfg["embedding_dim"] == 32 and cfg["image_size"] == 32
    loaded = FaceNet.from_pretrained(tmp_path)
    assert loaded.threshold == 0.9 and loaded.eval_transforms == [{"center_crop": {"size": 150}}]
    assert not loaded.training
    assert torch.equal(model(x), loaded(x))


def test_missing_key_is_an_error(tmp_path):
    _tiny().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["head.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"missing keys \['head.weight'\]"):
        FaceNet.from_pretrained(tmp_path)


def test_renamed_key_is_an_error(tmp_path):
    _tiny().save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state["head.weights"] = state.pop("head.weight")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match=r"unexpected keys \['head.weights'\]"):
        FaceNet.from_pretrained(tmp_path)


def test_pickle_only_folder_is_refused(tmp_path):
    model = _tiny()
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="only safetensors"):
        FaceNet.from_pretrained(tmp_path)


def test_backbone_weights_from_local_file(tmp_path):
    src = _tiny()
    save_file(
        {k: v.contiguous() for k, v in src.backbone.state_dict().items()}, str(tmp_path / "bb.safetensors")
    )
    dst = FaceNet(backbone="resnet18", embedding_dim=32, image_size=32)
    dst.load_backbone_weights(tmp_path / "bb.safetensors")
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(v, dst.backbone.state_dict()[k])
    with pytest.raises(ValueError, match="must be a .safetensors"):
        dst.load_backbone_weights(tmp_path / "bb.pth")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="distance must be one of"):
        FaceNet(distance="cosine")


# -- config.json validation on load ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("margin", 0.2, r"field 'margin' is unknown; a FaceNet config holds only backbone"),
        ("embedding_dims", 32, r"field 'embedding_dims' is unknown \(did you mean 'embedding_dim'\?\)"),
        ("embedding_dim", 0, r"field 'embedding_dim' must be an integer in \[1, 65536\], got 0"),
        ("embedding_dim", 70000, r"'embedding_dim' must be an integer in \[1, 65536\], got 70000"),
        ("embedding_dim", 32.0, r"'embedding_dim' must be an integer"),
        ("image_size", 8, r"field 'image_size' must be an integer in \[16, 4096\], got 8"),
        ("image_size", 5000, r"'image_size' must be an integer in \[16, 4096\]"),
        ("mean", [0.5, 0.5], r"field 'mean' must be 3 finite numbers"),
        ("std", [0.5, 0.0, 0.5], r"field 'std' must be 3 finite numbers .*all > 0"),
        ("threshold", -0.1, r"field 'threshold' must be null or a number in \[0, 4\]"),
        ("threshold", 9.0, r"field 'threshold' must be null or a number in \[0, 4\]"),
        ("distance", "cosine", r"field 'distance' must be one of \['squared_euclidean', 'euclidean'\]"),
        ("dropout", 1.5, r"field 'dropout' must be a number in \[0, 1\)"),
        ("head_bn", "yes", r"field 'head_bn' must be true or false"),
        (
            "backbone",
            "hf-hub:timm/resnet18.a1_in1k",
            r"field 'backbone' must be the name of a timm architecture",
        ),
        ("backbone", "no_such_net", r"field 'backbone' must be the name of a timm architecture"),
        (
            "eval_transforms",
            [{"sharpen": {}}],
            r"field 'eval_transforms' does not build: .*unknown step 'sharpen'",
        ),
    ],
)
def test_bad_config_json_is_refused_naming_the_field(tmp_path, field, value, message):
    _tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg[field] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidConfigError, match=message) as info:
        FaceNet.from_pretrained(tmp_path)
    assert info.value.field == field and str(tmp_path) in str(info.value)


def test_missing_config_or_bad_keyword_is_refused(tmp_path):
    _tiny().save_pretrained(tmp_path)
    with pytest.raises(InvalidConfigError, match=r"from_pretrained keyword arguments: field 'threshold'"):
        FaceNet.from_pretrained(tmp_path, threshold=-1.0)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        FaceNet.from_pretrained(tmp_path)


def test_validate_config_accepts_what_save_pretrained_writes(tmp_path):
    model = _tiny(threshold=1.2, eval_transforms=[{"face_crop": {"fraction": 0.7}}, "resize"])
    # the validator knows every field save_pretrained writes (alignment only for a five-point model,
    # calibration only once calibrated)
    assert set(CONFIG_FIELDS) == set(model.config) | {"alignment", "calibration"}
    aligned = _tiny(alignment={"kind": "five_point", "size": 112})
    assert set(CONFIG_FIELDS) == set(aligned.config) | {"calibration"}
    validate_config(aligned.config)
    validate_config(model.config)
    validate_config(json.loads(json.dumps(model.config)))
    with pytest.raises(InvalidConfigError, match=r"field 'backbone' is missing"):
        validate_config({"embedding_dim": 8})
    with pytest.raises(InvalidConfigError, match=r"must be a JSON object"):
        validate_config([1, 2])


# -- inference helpers -----------------------------------------------------------------------------------
def _images(n: int, size: int = 40) -> list[Image.Image]:
    gen = torch.Generator().manual_seed(3)
    return [
        Image.fromarray((torch.rand(size, size, 3, generator=gen) * 255).to(torch.uint8).numpy())
        for _ in range(n)
    ]


def test_preprocess_and_embed_follow_the_stored_eval_transform(tmp_path):
    model = _tiny(eval_transforms=[{"center_crop": {"size": 36}}])
    images = _images(5)
    x = model.preprocess(images)
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    with torch.no_grad():
        direct = model(x)
    emb = model.embed(images, batch_size=2)
    torch.testing.assert_close(emb, direct, rtol=0, atol=1e-6)
    assert emb.shape == (5, 32) and not emb.requires_grad
    assert model.embed(images, flip="concat").shape == (5, 64)
    images[0].save(tmp_path / "a.png")
    torch.testing.assert_close(model.embed([tmp_path / "a.png"]), emb[:1], rtol=0, atol=1e-6)
    assert model.embed([]).shape == (0, 32)
    model.train()
    model.embed(images[:2])
    assert model.training  # the mode is restored
    with pytest.raises(ValueError, match="flip must be one of"):
        model.embed(images, flip="mirror")


def test_verify_uses_the_stored_threshold_and_distance():
    a, b = _images(2)
    model = _tiny()
    with pytest.raises(ValueError, match=r"no calibrated verification threshold.*facenet-hf calibrate"):
        model.verify(a, b)
    model.threshold = 4.0
    same, d = model.verify(a, a)
    assert same and d == pytest.approx(0.0, abs=1e-9)
    emb = model.embed([a, b], flip="sum").double()
    expected = float(((emb[0] - emb[1]) ** 2).sum())
    assert model.verify(a, b) == (expected <= 4.0, pytest.approx(expected))
    model.threshold, model.distance = expected / 2, "euclidean"
    same, d = model.verify(a, b)
    assert d == pytest.approx(expected**0.5) and same == (expected**0.5 <= expected / 2)


@pytest.mark.parametrize("backbone", ["mobilenetv3_small_100", "efficientnet_b0", "convnext_atto"])
def test_other_timm_backbones_embed(backbone):
    # mobilenetv3 pools to head_hidden_size (1024), not num_features: the head must be sized from the real width
    model = FaceNet(backbone=backbone, embedding_dim=16, image_size=64).eval()
    emb = model(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))

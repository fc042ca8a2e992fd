"""FaceNet: unit embeddings, save/load round trip (safetensors, strict keys), config carried with weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from facenet_hf import FaceNet


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
    save_file({k: v.contiguous() for k, v in src.backbone.state_dict().items()}, str(tmp_path / "bb.safetensors"))
    dst = FaceNet(backbone="resnet18", embedding_dim=32, image_size=32)
    dst.load_backbone_weights(tmp_path / "bb.safetensors")
    for k, v in src.backbone.state_dict().items():
        assert torch.equal(v, dst.backbone.state_dict()[k])
    with pytest.raises(ValueError, match="must be a .safetensors"):
        dst.load_backbone_weights(tmp_path / "bb.pth")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="distance must be one of"):
        FaceNet(distance="cosine")

"""A model knows what it was trained on: ``alignment`` in its config.json, and ``embed`` / ``verify`` on raw photos
detect and align the same way (equal to embedding the aligned crop), or say clearly that there is no face."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from facenet_hf import FaceNet
from facenet_hf.config import load_config
from facenet_hf.faces import LFW_FRAMING_SPEC, AlignmentSpec, FaceAligner, MTCNNDetector
from facenet_hf.model import InvalidConfigError, validate_config
from facenet_hf.model.inference import NoFaceError
from facenet_hf.training.build import build_model

SPEC = AlignmentSpec(size=112).to_dict()


def _model(alignment=SPEC) -> FaceNet:
    torch.manual_seed(0)
    return FaceNet("test_resnet", embedding_dim=16, image_size=32, alignment=alignment).eval()


@pytest.fixture(scope="module")
def photo(lfw_sample) -> Image.Image:
    """A face somewhere on a bigger noisy canvas, turned by 15 degrees: what a user's photo looks like."""
    face = Image.open(lfw_sample / "lfw-deepfunneled" / "Abdullah" / "Abdullah_0002.jpg").convert("RGB")
    canvas = Image.fromarray(np.random.default_rng(1).integers(0, 255, (420, 560, 3), dtype=np.uint8))
    canvas.paste(face.rotate(15, resample=Image.BILINEAR), (260, 120))
    return canvas


def test_alignment_round_trips_through_config_json(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["alignment"] == SPEC
    assert FaceNet.from_pretrained(tmp_path / "m").alignment == SPEC
    with pytest.raises(InvalidConfigError, match="alignment.*unknown alignment key"):
        validate_config({**config, "alignment": {"kind": "five_point", "sise": 112}})
    with pytest.raises(InvalidConfigError, match="alignment.*size"):
        validate_config({**config, "alignment": {"kind": "five_point", "size": 4}})


def test_the_config_decides_the_models_alignment():
    base = ["data.lfw_dir=/x", "data.pairs=/p", "model.backbone=test_resnet", "model.image_size=32"]
    assert build_model(load_config(None, base)).alignment is None  # LFW-style crops, as before
    cfg = load_config(
        None, [*base, "model.alignment=five_point", "model.align_size=160", "model.align_margin=0.1"]
    )
    assert build_model(cfg).alignment == AlignmentSpec(size=160, margin=0.1).to_dict()


def test_embed_on_a_raw_photo_equals_embedding_its_aligned_crop(photo):
    model = _model()
    crop = FaceAligner(MTCNNDetector(device="cpu", min_score=0.9), AlignmentSpec(size=112)).align([photo])[0]
    assert crop.status == "ok"
    raw = model.embed(photo)  # detected and aligned, as the model was trained
    aligned = model.embed(crop.crops[0], detect=False)  # already aligned: used as given
    torch.testing.assert_close(raw, aligned)
    assert not torch.allclose(
        raw, model.embed(photo, detect=False), atol=1e-3
    )  # the background is not a face


def test_no_face_is_an_error_naming_the_image(tmp_path):
    wall = tmp_path / "wall.jpg"
    Image.fromarray(np.full((300, 300, 3), 90, np.uint8)).save(wall)
    model = _model()
    with pytest.raises(NoFaceError, match=r"no face to embed in .*wall\.jpg: no face found.*detect=False"):
        model.embed([wall])
    model.threshold = 1.0
    with pytest.raises(NoFaceError):
        model.verify(wall, wall)
    assert model.embed([wall], detect=False).shape == (1, 16)  # told it is a crop: embedded as given


def test_an_lfw_crop_model_can_take_photos_through_the_lfw_template(photo, lfw_sample):
    model = _model(alignment=None)
    original = lfw_sample / "lfw-deepfunneled" / "Abdullah" / "Abdullah_0002.jpg"
    assert model.embed(photo).shape == (1, 16)  # detect=None: an LFW-crop model uses images as given
    via_template = model.embed(photo, detect=True)  # the photo warped to LFW's deep-funneled framing
    crop = (
        FaceAligner(MTCNNDetector(device="cpu", min_score=0.9), LFW_FRAMING_SPEC).align([photo])[0].crops[0]
    )
    assert crop.size == (250, 250)
    torch.testing.assert_close(via_template, model.embed(crop))
    # and that framing is close to the real deep-funneled image: the same face lands in the same place
    got, want = np.asarray(crop, np.float32), np.asarray(Image.open(original).convert("RGB"), np.float32)
    centre = slice(80, 170)
    assert np.abs(got[centre, centre] - want[centre, centre]).mean() < 40


def test_training_and_scoring_refuse_faces_that_are_not_what_the_model_expects(lfw_sample, tmp_path):
    from facenet_hf.config import ConfigError
    from facenet_hf.data.lfw import read_pairs
    from facenet_hf.evaluation.lfw_eval import evaluate_lfw
    from facenet_hf.training.build import build_data

    raw = lfw_sample / "lfw-deepfunneled"
    five = ["model.alignment=five_point", f"data.lfw_dir={raw}", f"data.pairs={lfw_sample / 'pairs.txt'}"]
    with pytest.raises(ConfigError, match="no alignment.json: it was not made by `facenet-hf align`"):
        build_data(load_config(None, five))
    pairs = read_pairs(lfw_sample / "pairs.txt").select_folds([1])
    with pytest.raises(ValueError, match="expects five-point-aligned faces .* has no alignment.json"):
        evaluate_lfw(_model(), raw, pairs, progress=False)
    aligned = tmp_path / "aligned"
    aligned.mkdir()
    (aligned / "alignment.json").write_text(json.dumps({"spec": SPEC}))
    with pytest.raises(ValueError, match="holds faces aligned as .* but the model expects LFW deep-funneled"):
        evaluate_lfw(_model(alignment=None), aligned, pairs, progress=False)

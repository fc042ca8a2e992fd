"""Tests for facenet_hf.data.transforms: steps, ordering, normalisation, errors, BatchTransform, DataLoader path."""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms.v2 import functional as TF

from facenet_hf.data.images import BadImageError
from facenet_hf.data.transforms import (
    DEFAULT_EVAL_STEPS,
    DEFAULT_TRAIN_STEPS,
    FIXED_MEAN,
    FIXED_STD,
    STEPS,
    BatchTransform,
    StepContext,
    build_transform,
    canonical_steps,
    collate_batch,
)

SAMPLE_DIR = Path(__file__).resolve().parent.parent / "data" / "lfw_sample" / "lfw-deepfunneled"
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
S = 64


def _face(w: int = 250, h: int = 250, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _build(steps, size: int = S, **kw):
    return build_transform(steps, image_size=size, mean=MEAN, std=STD, **kw)


# one spec per registered step (default parameters plus a few non-default ones)
STEP_CASES = {
    "resize": [{"resize": {}}, {"resize": {"size": 80, "keep_aspect": True, "interpolation": "bicubic"}}],
    "center_crop": ["center_crop", {"center_crop": {"size": 150}}, {"center_crop": {"size": [120, 100]}}],
    "face_crop": ["face_crop", {"face_crop": {"fraction": 0.5}}],
    "random_resized_crop": [
        "random_resized_crop",
        {"random_resized_crop": {"scale": [0.5, 1.0], "size": 48}},
    ],
    "random_crop": ["random_crop", {"random_crop": {"padding": 4, "size": 200, "padding_mode": "reflect"}}],
    "hflip": ["hflip", {"hflip": {"p": 1.0}}],
    "rotate": ["rotate", {"rotate": {"degrees": [-5, 5], "fill": [0, 128, 255]}}],
    "face_affine": [
        "face_affine",
        {"face_affine": {"degrees": [-5, 20], "scale": [0.5, 1.0], "flip": 1.0, "fill": [0, 128, 255]}},
        {"face_affine": {"size": 48, "interpolation": "bicubic", "fraction": 1.0}},
    ],
    "color_jitter": ["color_jitter", {"color_jitter": {"hue": 0.05, "p": 0.5}}],
    "grayscale": [{"grayscale": {"p": 1.0}}],
    "auto_augment": [
        "auto_augment",
        {"auto_augment": {"method": "autoaugment", "policy": "svhn"}},
        {"auto_augment": {"method": "trivialaugment"}},
        {"auto_augment": {"num_ops": 1, "magnitude": 5}},
    ],
    "square_pad": ["square_pad", {"square_pad": {"padding_mode": "edge"}}],
    "gaussian_blur": ["gaussian_blur", {"gaussian_blur": {"kernel_size": 3, "sigma": 1.0, "p": 1.0}}],
    "random_erasing": ["random_erasing", {"random_erasing": {"p": 1.0, "value": 0.5}}],
    "normalize": ["normalize", {"normalize": {"mode": "fixed"}}],
    "to_tensor": ["to_tensor"],
}


def test_every_registered_step_is_tested() -> None:
    assert set(STEP_CASES) == set(STEPS)


@pytest.mark.parametrize("spec", [s for specs in STEP_CASES.values() for s in specs], ids=repr)
@pytest.mark.parametrize("size", [(250, 250), (180, 120)])
def test_each_step_output_shape_and_dtype(spec, size) -> None:
    t = _build([spec])
    x = t(_face(*size))
    assert x.shape == (3, S, S) and x.dtype == torch.float32 and x.is_contiguous()
    assert torch.isfinite(x).all()


def test_image_steps_on_pil_sizes() -> None:
    ctx = StepContext(image_size=S, mean=tuple(MEAN), std=tuple(STD))
    img = _face(250, 250)
    assert STEPS["center_crop"](ctx, size=150)(img).size == (150, 150)
    assert STEPS["face_crop"](ctx, fraction=0.6)(img).size == (150, 150)
    assert STEPS["face_crop"](ctx, fraction=0.6)(_face(200, 100)).size == (60, 60)
    assert STEPS["resize"](ctx)(_face(200, 100)).size == (S, S)
    assert STEPS["resize"](ctx, keep_aspect=True)(_face(200, 100)).size == (2 * S, S)
    assert STEPS["square_pad"](ctx)(_face(200, 100)).size == (200, 200)
    assert STEPS["random_resized_crop"](ctx)(img).size == (S, S)
    assert STEPS["random_crop"](ctx, padding=6)(img).size == (250, 250)
    assert STEPS["random_crop"](ctx, size=60)(_face(40, 40)).size == (60, 60)
    rot = STEPS["rotate"](ctx)(img)
    assert isinstance(rot, Image.Image) and rot.size == (250, 250)


def test_face_crop_is_centred_and_hflip_flips() -> None:
    arr = np.zeros((250, 250, 3), dtype=np.uint8)
    arr[50:200, 50:200] = 255  # the central 60% is white
    crop = STEPS["face_crop"](StepContext(S, tuple(MEAN), tuple(STD)), fraction=0.6)(Image.fromarray(arr))
    assert np.asarray(crop).min() == 255
    img = _face(64, 64)
    x = _build([{"hflip": {"p": 1.0}}])(img)
    y = _build([])(img)
    assert torch.equal(x, y.flip(-1))


def test_final_resize_is_appended() -> None:
    img = _face(250, 200)
    for steps in ([], [{"resize": {"size": 50}}], [{"resize": {"keep_aspect": True}}], ["face_crop"]):
        assert _build(steps, size=40)(img).shape == (3, 40, 40)
    t = _build([{"center_crop": {"size": 40}}], size=40)
    assert list(t.image_ops[-1](_face(40, 40)).size) == [40, 40]  # no-op when already at size


def test_tensor_input_and_non_rgb_pil() -> None:
    img = _face(80, 80)
    t = _build(DEFAULT_EVAL_STEPS)
    as_tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    assert torch.allclose(t(img), t(as_tensor), atol=2e-2)
    assert t(img.convert("L")).shape == (3, S, S)


def test_determinism_under_manual_seed() -> None:
    steps = [
        *DEFAULT_TRAIN_STEPS,
        "random_crop",
        {"grayscale": {"p": 0.5}},
        {"gaussian_blur": {"p": 0.5}},
        {"auto_augment": {}},
        {"random_erasing": {"p": 0.5}},
    ]
    t = _build(steps)
    imgs = [_face(250, 250, seed=i) for i in range(4)]

    def run(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        return torch.stack([t(im) for im in imgs])

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


def test_pipeline_with_every_step_pickles() -> None:
    # DataLoader workers started with "spawn" (macOS, Windows) pickle the batch transform
    every = [specs[-1] for specs in STEP_CASES.values()]
    bt = BatchTransform(_build(every), bad_image_policy="error")
    again = pickle.loads(pickle.dumps(bt))
    torch.manual_seed(3)
    a = bt(_batch(2))["pixel_values"]
    torch.manual_seed(3)
    assert torch.equal(again(_batch(2))["pixel_values"], a)


def test_eval_pipeline_is_deterministic_without_seed() -> None:
    t = _build(DEFAULT_EVAL_STEPS)
    img = _face()
    assert torch.equal(t(img), t(img))


def test_fixed_and_backbone_normalisation_values() -> None:
    white, black = Image.new("RGB", (S, S), (255, 255, 255)), Image.new("RGB", (S, S), (0, 0, 0))
    grey = Image.new("RGB", (S, S), (51, 102, 204))
    fixed = _build([{"normalize": {"mode": "fixed"}}])
    assert torch.allclose(fixed(white), torch.full((3, S, S), (255 - 127.5) / 128))
    assert torch.allclose(fixed(black), torch.full((3, S, S), -127.5 / 128))
    assert torch.allclose(fixed(grey)[:, 0, 0], (torch.tensor([51.0, 102.0, 204.0]) - 127.5) / 128)
    expected = (torch.tensor([51.0, 102.0, 204.0]) / 255 - torch.tensor(MEAN)) / torch.tensor(STD)
    for steps in ([], ["normalize"], [{"normalize": {"mode": "backbone"}}]):
        assert torch.allclose(_build(steps)(grey)[:, 0, 0], expected, atol=1e-6)
    # the normalization argument decides when there is no normalize step (or it has no mode)
    for steps in ([], ["normalize"]):
        assert torch.allclose(_build(steps, normalization="fixed")(grey), fixed(grey))
    via_stats = build_transform([], image_size=S, mean=FIXED_MEAN, std=FIXED_STD)
    assert torch.allclose(via_stats(grey), fixed(grey), atol=1e-6)


def test_tensor_steps_run_after_normalisation_whatever_the_order() -> None:
    img = Image.new("RGB", (S, S), (255, 255, 255))
    erase = {"random_erasing": {"p": 1.0, "value": -7.0, "scale": [0.2, 0.3]}}
    for steps in ([erase, "normalize", "hflip"], ["hflip", "normalize", erase], [erase, "to_tensor"]):
        x = _build(steps)(img)
        # -7 is not a reachable normalised value: the erased block was written after normalisation
        assert (x == -7.0).any() and (x != -7.0).any()
        assert torch.allclose(x[x != -7.0], _build([])(img)[x != -7.0])
    t = _build([erase, "hflip"])
    assert [type(op).__name__ for op in t.tensor_ops] == ["RandomErasing"]
    assert "RandomErasing" not in [type(op).__name__ for op in t.image_ops]


def test_presets_are_serialisable_and_not_mutated() -> None:
    for preset in (DEFAULT_TRAIN_STEPS, DEFAULT_EVAL_STEPS):
        before = json.dumps(preset)
        assert canonical_steps(preset) == json.loads(before)
        t = _build(preset, size=112)
        assert t(_face()).shape == (3, 112, 112)
        assert json.dumps(preset) == before
        assert json.loads(json.dumps(t.steps)) == t.steps
    names = [next(iter(s)) for s in DEFAULT_TRAIN_STEPS]
    assert names == ["face_affine", "color_jitter"]
    assert [next(iter(s)) for s in DEFAULT_EVAL_STEPS] == ["face_crop", "resize"]


def test_accepted_spec_forms_are_equivalent() -> None:
    forms = ["hflip", {"hflip": None}, {"hflip": {}}, {"name": "hflip"}]
    assert all(canonical_steps([f]) == [{"hflip": {}}] for f in forms)
    assert canonical_steps([{"name": "rotate", "degrees": 5}]) == [{"rotate": {"degrees": 5}}]
    got = canonical_steps([{"random_resized_crop": {"scale": (0.7, 1.0)}}])
    assert got == [{"random_resized_crop": {"scale": [0.7, 1.0]}}]


def test_unknown_step_message() -> None:
    with pytest.raises(ValueError) as info:
        _build(["hflip", "hfilp"])
    msg = str(info.value)
    assert "'hfilp'" in msg and "steps[1]" in msg and "did you mean 'hflip'" in msg
    assert "valid steps:" in msg and "random_resized_crop" in msg and "normalize" in msg


@pytest.mark.parametrize(
    ("spec", "fragments"),
    [
        ({"rotate": {"degree": 5}}, ["'rotate'", "'degree'", "did you mean 'degrees'", "valid parameters"]),
        ({"hflip": {"p": 1.5}}, ["'hflip'", "p must be in [0.0, 1.0]", "1.5"]),
        ({"hflip": {"p": "often"}}, ["'hflip'", "p must be a number", "'often'"]),
        ({"resize": {"interpolation": "bicubc"}}, ["'resize'", "'bicubc'", "did you mean 'bicubic'"]),
        ({"random_resized_crop": {"scale": [1.0, 0.5]}}, ["'random_resized_crop'", "min <= max"]),
        ({"random_resized_crop": {"scale": 0.8}}, ["scale must be a pair"]),
        ({"gaussian_blur": {"kernel_size": 4}}, ["'gaussian_blur'", "kernel_size must be odd"]),
        ({"normalize": {"mode": "imagenet"}}, ["'normalize'", "'backbone'", "'fixed'"]),
        ({"auto_augment": {"method": "trivialaugment", "magnitude": 3}}, ["magnitude does not apply"]),
        ({"face_crop": {"fraction": 0}}, ["fraction must be in (0, 1]"]),
        ({"resize": {"size": True}}, ["size must be an integer"]),
        ({"hflip": 0.5}, ["'hflip'", "parameters must be a mapping"]),
        ({"hflip": {}, "rotate": {}}, ["one key"]),
        (3, ["expected a step name or a mapping"]),
    ],
    ids=repr,
)
def test_bad_arguments_name_the_step_and_value(spec, fragments) -> None:
    with pytest.raises(ValueError) as info:
        _build([spec])
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_bad_build_arguments() -> None:
    with pytest.raises(ValueError, match="image_size"):
        build_transform([], image_size=0, mean=MEAN, std=STD)
    with pytest.raises(ValueError, match="std must be positive"):
        build_transform([], image_size=S, mean=MEAN, std=[0.2, 0.0, 0.2])
    with pytest.raises(ValueError, match="mean must be 3 numbers"):
        build_transform([], image_size=S, mean=[0.5, 0.5], std=STD)
    with pytest.raises(ValueError, match="normalization"):
        build_transform([], image_size=S, mean=MEAN, std=STD, normalization="imagenet")
    with pytest.raises(ValueError, match="twice"):
        _build(["normalize", "normalize"])
    with pytest.raises(ValueError, match="list of step specs"):
        _build("hflip")


# --- BatchTransform ------------------------------------------------------------------------------------------


def _jpeg_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _batch(n: int = 4, bad_at: tuple[int, ...] = ()) -> dict:
    images = [
        {"bytes": _jpeg_bytes(_face(100, 100, seed=i)), "path": f"P{i}/P{i}_0001.jpg"} for i in range(n)
    ]
    for i in bad_at:
        images[i] = {"bytes": b"<html>oops</html>", "path": f"P{i}/broken.jpg"}
    return {"image": images, "label": list(range(n))}


def test_batch_transform_output() -> None:
    bt = BatchTransform(_build(DEFAULT_EVAL_STEPS))
    out = bt(_batch(4))
    assert out["pixel_values"].shape == (4, 3, S, S) and out["pixel_values"].dtype == torch.float32
    assert out["labels"].dtype == torch.int64 and out["labels"].tolist() == [0, 1, 2, 3]
    assert out["valid"].dtype == torch.bool and out["valid"].all()
    assert out["bad"] == [None] * 4 and bt.bad == []
    # PIL rows (a decoded datasets Image column) work too
    pil = {"image": [_face(90, 90, seed=i) for i in range(3)], "label": [5, 5, 6]}
    assert bt(pil)["pixel_values"].shape == (3, 3, S, S)


def test_batch_transform_skip_policy() -> None:
    bt = BatchTransform(_build(DEFAULT_EVAL_STEPS), bad_image_policy="skip")
    out = bt(_batch(4, bad_at=(2,)))
    assert out["pixel_values"].shape == (4, 3, S, S)
    assert out["valid"].tolist() == [True, True, False, True]
    assert torch.count_nonzero(out["pixel_values"][2]) == 0
    assert out["labels"].tolist() == [0, 1, 2, 3]
    assert out["bad"][2][0] == "P2/broken.jpg" and "not an image" in out["bad"][2][1]
    assert [b is None for b in out["bad"]] == [True, True, False, True]
    assert bt.bad == [out["bad"][2]]
    # a batch of only bad images still has the right shape
    out = bt(_batch(2, bad_at=(0, 1)))
    assert out["pixel_values"].shape == (2, 3, S, S) and not out["valid"].any()
    assert len(bt.bad) == 3


def test_batch_transform_error_policy() -> None:
    bt = BatchTransform(_build(DEFAULT_EVAL_STEPS), bad_image_policy="error")
    with pytest.raises(BadImageError) as info:
        bt(_batch(3, bad_at=(1,)))
    assert info.value.source == "P1/broken.jpg" and "not an image" in info.value.reason
    assert "P1/broken.jpg" in str(info.value)


def test_batch_transform_arguments() -> None:
    t = _build(DEFAULT_EVAL_STEPS)
    with pytest.raises(ValueError, match=r"bad_image_policy.*'skip'"):
        BatchTransform(t, bad_image_policy="ignore")
    with pytest.raises(KeyError, match="img"):
        BatchTransform(t, image_key="img")(_batch(2))
    out = BatchTransform(t, label_key=None)({"image": _batch(2)["image"]})
    assert out["labels"].tolist() == [-1, -1]
    with pytest.raises(ValueError, match="image_size="):
        BatchTransform(lambda im: torch.zeros(3, 8, 8))(_batch(1, bad_at=(0,)))


def test_batch_transform_private_seed() -> None:
    t = _build(DEFAULT_TRAIN_STEPS)
    batch = _batch(3)

    def run(global_seed: int, seed: int) -> torch.Tensor:
        torch.manual_seed(global_seed)
        bt = BatchTransform(t, seed=seed)
        first = bt(batch)["pixel_values"]
        bt.set_epoch(1)
        return torch.cat([first, bt(batch)["pixel_values"]])

    a = run(0, seed=7)
    assert torch.equal(a, run(123, seed=7))  # the global RNG does not matter
    assert not torch.equal(a[:3], a[3:])  # another epoch augments the same batch differently
    bt = BatchTransform(t, seed=7)
    assert torch.equal(bt(batch)["pixel_values"], a[:3])  # same (seed, epoch, batch): same images
    assert not torch.equal(a, run(0, seed=8))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    BatchTransform(t, seed=1)(batch)
    assert torch.equal(torch.rand(3), expected)  # the global RNG is left untouched
    with pytest.raises(ValueError, match="seed"):
        BatchTransform(t, seed="1")


def test_collate_batch_forms() -> None:
    bt = BatchTransform(_build(DEFAULT_EVAL_STEPS))
    out = bt(_batch(3, bad_at=(0,)))
    rows = [{k: v[i] for k, v in out.items()} for i in range(3)]  # what Dataset.__getitems__ does
    got = collate_batch(rows)
    assert torch.equal(got["pixel_values"], out["pixel_values"])
    assert torch.equal(got["labels"], out["labels"]) and torch.equal(got["valid"], out["valid"])
    assert got["bad"] == [out["bad"][0]]
    assert collate_batch(out)["bad"] == [out["bad"][0]]


# --- the DataLoader path: Dataset.with_transform + batch_sampler + collate_batch -------------------------------


def _real_jpegs(tmp_path: Path, n: int = 8) -> list[Path]:
    """A few real JPEG faces (copies from the bundled LFW sample) written to tmp_path."""
    files = sorted(SAMPLE_DIR.glob("*/*.jpg"))[:n]
    assert len(files) == n, f"the bundled LFW sample has {len(files)} images, {n} needed"
    out = []
    for i, src in enumerate(files):
        dst = tmp_path / f"img_{i}.jpg"
        shutil.copyfile(src, dst)
        out.append(dst)
    return out


def _dataset(tmp_path: Path) -> datasets.Dataset:
    paths = _real_jpegs(tmp_path)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(paths[0].read_bytes()[:300])  # truncated
    paths[5] = broken
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    rows = {"image": [{"bytes": None, "path": str(p)} for p in paths], "label": [i // 2 for i in range(8)]}
    return datasets.Dataset.from_dict(rows, features=features)


class _Counting(BatchTransform):
    calls = 0

    def __call__(self, batch):
        type(self).calls += 1
        return super().__call__(batch)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataloader_path_end_to_end(tmp_path: Path, num_workers: int) -> None:
    ds = _dataset(tmp_path)
    bt = _Counting(_build(DEFAULT_TRAIN_STEPS))
    _Counting.calls = 0
    batches = [[0, 1, 2, 3], [4, 5, 6, 7]]
    dl = DataLoader(
        ds.with_transform(bt), batch_sampler=batches, collate_fn=collate_batch, num_workers=num_workers
    )
    got = list(dl)
    assert len(got) == 2
    for b, idx in zip(got, batches, strict=True):
        assert set(b) == {"pixel_values", "labels", "valid", "bad", "path"}
        assert b["pixel_values"].shape == (4, 3, S, S) and b["pixel_values"].dtype == torch.float32
        assert b["labels"].tolist() == [i // 2 for i in idx]
        assert isinstance(b["bad"], list)
    assert got[0]["valid"].all() and got[0]["bad"] == []
    assert got[1]["valid"].tolist() == [True, False, True, True]
    ((path, reason),) = got[1]["bad"]
    assert path.endswith("broken.jpg") and "truncated" in reason
    if num_workers == 0:
        assert _Counting.calls == 2  # the transform runs once per batch, not once per row
        assert bt.bad == [(path, reason)]
    # with a private seed the augmented batches repeat exactly, run after run
    seeded = [
        DataLoader(
            ds.with_transform(BatchTransform(bt.transform, seed=3)),
            batch_sampler=batches,
            collate_fn=collate_batch,
            num_workers=num_workers,
        )
        for _ in range(2)
    ]
    torch.manual_seed(1)
    first = [b["pixel_values"] for b in seeded[0]]
    torch.manual_seed(2)
    second = [b["pixel_values"] for b in seeded[1]]
    assert all(torch.equal(x, y) for x, y in zip(first, second, strict=True))


def test_dataloader_error_policy_with_workers_raises_bad_image_error(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    bt = BatchTransform(_build(DEFAULT_EVAL_STEPS), bad_image_policy="error")
    dl = DataLoader(ds.with_transform(bt), batch_sampler=[[4, 5]], collate_fn=collate_batch, num_workers=1)
    batches = iter(dl)
    try:
        with pytest.raises(BadImageError) as info:
            next(batches)
    finally:
        batches._shutdown_workers()  # now, not when garbage-collected (a 5 s join timeout in a later test)
    assert info.value.source.endswith("broken.jpg") and "truncated" in info.value.reason


def test_single_row_access() -> None:
    features = datasets.Features({"image": datasets.Image(decode=False), "label": datasets.Value("int64")})
    ds = datasets.Dataset.from_dict(_batch(2), features=features).with_transform(
        BatchTransform(_build(DEFAULT_EVAL_STEPS))
    )
    row = ds[1]
    assert row["pixel_values"].shape == (3, S, S) and int(row["labels"]) == 1 and bool(row["valid"])


def _affine(**params):
    ctx = StepContext(S, tuple(MEAN), tuple(STD))
    return STEPS["face_affine"](ctx, **params)


def test_face_affine_without_randomness_is_the_face_crop() -> None:
    img = _face(250, 250)
    still = {"degrees": 0, "scale": [1.0, 1.0], "ratio": [1.0, 1.0], "interpolation": "nearest"}
    crop = np.asarray(img)[50:200, 50:200]
    assert np.array_equal(np.asarray(_affine(size=150, flip=0.0, **still)(img)), crop)
    assert np.array_equal(np.asarray(_affine(size=150, flip=1.0, **still)(img)), crop[:, ::-1])
    # a non-square image: the square is centred on the short side
    wide = _face(200, 100)
    assert np.array_equal(
        np.asarray(_affine(size=60, flip=0.0, **still)(wide)), np.asarray(wide)[20:80, 70:130]
    )


def test_face_affine_rotates_about_the_window_centre() -> None:
    img = _face(64, 64)
    quarter = _affine(
        size=64, fraction=1.0, degrees=[90, 90], scale=[1, 1], ratio=[1, 1], flip=0.0, interpolation="nearest"
    )(img)
    turned = np.asarray(quarter)
    # source = R(90) @ output: output pixel (x, y) reads source (-y, x) about the centre, i.e. numpy rot90 k=1
    assert np.array_equal(turned, np.rot90(np.asarray(img), k=1)) or np.array_equal(
        turned, np.rot90(np.asarray(img), k=-1)
    )
    assert not np.array_equal(turned, np.asarray(img))


def test_face_affine_defaults_never_show_the_fill_on_lfw_sized_images() -> None:
    white = Image.new("RGB", (250, 250), (255, 255, 255))
    t = _affine(degrees=10, fill=0)
    torch.manual_seed(0)
    for _ in range(200):
        assert np.asarray(t(white)).min() == 255
    # extreme parameters do reach outside the image: the fill shows
    wild = _affine(fraction=1.0, degrees=[45, 45], scale=[1, 1], fill=0)
    assert np.asarray(wild(white)).min() == 0


def test_face_affine_window_statistics() -> None:
    t = _affine(degrees=10, scale=[0.8, 1.0], ratio=[0.9, 1.1], flip=0.5)
    rng = np.random.default_rng(0)
    sides, flips, angles = [], [], []
    for _ in range(2000):
        a, b, c, d, e, f = t.coefficients(250, 250, rng.random(6).tolist())
        sx, sy = np.hypot(a, d) * S, np.hypot(b, e) * S  # window width and height in source pixels
        sides.append(sx * sy)
        flips.append(a * e - b * d < 0)
        angles.append(np.degrees(np.arctan2(-b, e)))
        # the window centre stays inside the 150 px face square, and the window inside the square
        cx, cy = a * S / 2 + b * S / 2 + c, d * S / 2 + e * S / 2 + f
        assert abs(cx - 125) <= (150 - sx) / 2 + 1e-6 and abs(cy - 125) <= (150 - sy) / 2 + 1e-6
    area = np.array(sides) / 150**2
    assert area.min() >= 0.8 * 0.999 and area.max() <= 1.0 + 1e-9 and 0.87 < area.mean() < 0.93
    assert 0.45 < np.mean(flips) < 0.55
    assert -10 - 1e-9 <= min(angles) < -9 and 9 < max(angles) <= 10 + 1e-9


def test_face_affine_tensor_input_matches_pil() -> None:
    img = _face(100, 100)
    t = _affine()
    torch.manual_seed(5)
    a = np.asarray(t(img))
    torch.manual_seed(5)
    b = t(torch.from_numpy(np.array(img)).permute(2, 0, 1))
    assert b.dtype == torch.uint8 and np.array_equal(b.permute(1, 2, 0).numpy(), a)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"degrees": 200}, "degrees must be in"),
        ({"scale": [0.0, 1.0]}, "scale must be within (0, 1]"),
        ({"ratio": [0, 1]}, "ratio must be positive"),
        ({"flip": 2}, "flip must be in"),
        ({"fraction": 0}, "fraction must be in (0, 1]"),
        ({"interpolation": "lanczos"}, "interpolation must be one of"),
    ],
)
def test_face_affine_bad_parameters(params, expected) -> None:
    with pytest.raises(ValueError, match=re.escape(expected)) as info:
        _build([{"face_affine": params}])
    assert "'face_affine'" in str(info.value)


@pytest.mark.parametrize("op", [0, 1, 2])
def test_color_jitter_matches_torchvision_formulas(op) -> None:
    from facenet_hf.data.transforms.ops import ColorJitter

    factors = [0.0, 0.0, 0.0]
    factors[op] = 0.6
    jitter = ColorJitter(*factors)
    x = np.asarray(_face(112, 112, seed=op))
    torch.manual_seed(11)
    got = np.asarray(jitter(Image.fromarray(x))).astype(int)
    torch.manual_seed(11)
    torch.randperm(3)
    lo, hi = jitter.ranges[op]
    f = lo + (hi - lo) * torch.rand(3).tolist()[op]
    ref_fn = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation][op]
    ref = ref_fn(torch.from_numpy(x.copy()).permute(2, 0, 1), f).permute(1, 2, 0).numpy().astype(int)
    assert np.abs(got - ref).max() <= 1
    assert not np.array_equal(got, x)


def test_color_jitter_with_hue_uses_torchvision() -> None:
    t = _build([{"color_jitter": {"hue": 0.1}}])
    assert type(t.image_ops[0]).__name__ == "ColorJitter"
    assert type(_build(["color_jitter"]).image_ops[0]).__name__ == "ColorJitter"


def test_collate_reuses_the_stacked_batch_instead_of_copying_it() -> None:
    t = _build(DEFAULT_EVAL_STEPS)
    batch = BatchTransform(t)(_batch(4))
    rows = [{k: v[i] for k, v in batch.items()} for i in range(4)]  # what Dataset.__getitems__ does
    out = collate_batch(rows)
    assert _same_memory(out["pixel_values"], batch["pixel_values"])  # no copy
    assert torch.equal(out["labels"], batch["labels"])
    # rows that are not, in order, the whole of one tensor are stacked as usual
    shuffled = collate_batch([rows[1], rows[0], rows[2], rows[3]])
    assert torch.equal(shuffled["pixel_values"][0], batch["pixel_values"][1])
    assert shuffled["pixel_values"].data_ptr() != batch["pixel_values"].data_ptr()
    # inference mode (embed_files) records no view base: the storage decides
    with torch.inference_mode():
        frozen = BatchTransform(t)(_batch(4))
        inf_rows = [{k: v[i] for k, v in frozen.items()} for i in range(4)]
        assert inf_rows[0]["pixel_values"]._base is None
        assert _same_memory(collate_batch(inf_rows)["pixel_values"], frozen["pixel_values"])
    partial = collate_batch(rows[:3])
    assert torch.equal(partial["pixel_values"], batch["pixel_values"][:3])
    loose = collate_batch([{"pixel_values": torch.ones(3, 2, 2)}, {"pixel_values": torch.zeros(3, 2, 2)}])
    assert loose["pixel_values"].shape == (2, 3, 2, 2)


@pytest.mark.parametrize("steps", [DEFAULT_EVAL_STEPS, DEFAULT_TRAIN_STEPS], ids=["eval", "train"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batched_conversion_equals_the_per_image_pipeline(steps, channels_last) -> None:
    # BatchTransform converts and normalises once per batch; the result must be the per-image pipeline's,
    # bit for bit, bad rows included (zeros), in the asked memory format.
    t = _build(steps)
    assert t.batchable
    batch = _batch(5, bad_at=(2,))
    out = BatchTransform(t, seed=3, channels_last=channels_last)(batch)
    per_image = BatchTransform(_PerImage(t), seed=3, image_size=S)(batch)
    assert torch.equal(out["pixel_values"], per_image["pixel_values"])
    assert out["valid"].tolist() == [True, True, False, True, True]
    assert (out["pixel_values"][2] == 0).all()
    pv = out["pixel_values"]
    assert pv.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    # collate_batch still hands the batch on without a copy
    rows = [{k: v[i] for k, v in out.items()} for i in range(5)]
    assert _same_memory(collate_batch(rows)["pixel_values"], pv)


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same elements in the same memory (a view, not a copy)."""
    return (
        a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)
    )


class _PerImage:
    """A FaceTransform hidden behind a plain callable: BatchTransform's per-image path (convert, then stack)."""

    def __init__(self, t) -> None:
        self.t = t

    def __call__(self, img):
        return self.t(img)


def test_steps_that_do_not_end_in_normalize_are_not_batched() -> None:
    t = _build([*DEFAULT_EVAL_STEPS, {"random_erasing": {"p": 1.0}}])
    assert not t.batchable  # a tensor step after normalize: the per-image path
    out = BatchTransform(t)(_batch(3))
    assert out["pixel_values"].shape == (3, 3, S, S)


def test_seeded_augmentations_do_not_depend_on_where_the_dataset_lives(tmp_path: Path) -> None:
    # the same Name/file.jpg tree under two different roots: the same batch draws the same augmentations
    (tmp_path / "a" / "Person").mkdir(parents=True)
    files = _real_jpegs(tmp_path / "a" / "Person")
    shutil.copytree(tmp_path / "a", tmp_path / "somewhere" / "else")
    bt = BatchTransform(_build(DEFAULT_TRAIN_STEPS), seed=3)

    def batch(root: Path) -> dict:
        return {
            "image": [{"path": str(root / "Person" / f.name), "bytes": None} for f in files],
            "label": [0] * len(files),
        }

    moved = tmp_path / "somewhere" / "else"
    a, b = bt(batch(tmp_path / "a")), bt(batch(moved))
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    other = BatchTransform(_build(DEFAULT_TRAIN_STEPS), seed=4)(batch(moved))
    assert not torch.equal(a["pixel_values"], other["pixel_values"])  # the seed still matters

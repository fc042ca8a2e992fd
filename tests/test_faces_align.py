"""Alignment maths and the aligner pipeline, without a real detector: Umeyama against exact transforms and a
scipy least-squares optimum, warp_face against synthetic landmark discs (the pixel-centre convention),
AlignmentSpec (de)serialisation, the face-selection policies and FaceAligner's statuses with a scripted detector."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.optimize import least_squares

from facenet_hf.faces import (
    ARCFACE_TEMPLATE_112,
    AlignmentSpec,
    Face,
    FaceAligner,
    MTCNNDetector,
    build_detector,
    choose_faces,
    transform_points,
    umeyama,
    warp_face,
)

ROOT = Path(__file__).resolve().parent.parent


def similarity(scale: float, angle: float, tx: float, ty: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, tx], [scale * s, scale * c, ty]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:2, :2].T + m[:, 2]


# ---------------------------------------------------------------------------------------------------------
# umeyama


@pytest.mark.parametrize(
    ("seed", "angle_deg"),
    [(0, None), (1, None), (2, None), (3, None), (4, 180.0), (5, 179.9), (6, -179.9), (7, 0.0)],
)
def test_umeyama_recovers_an_exact_similarity(seed, angle_deg):
    rng = np.random.default_rng(seed)
    src = rng.uniform(-50, 150, size=(5, 2))
    angle = rng.uniform(-np.pi, np.pi) if angle_deg is None else np.deg2rad(angle_deg)
    truth = similarity(rng.uniform(0.2, 5.0), angle, *rng.uniform(-300, 300, size=2))
    m = umeyama(src, apply(truth, src))
    np.testing.assert_allclose(m, truth, atol=1e-9)
    assert np.linalg.det(m[:, :2]) > 0


def test_umeyama_without_scale_recovers_a_rigid_motion():
    rng = np.random.default_rng(10)
    src = rng.normal(size=(7, 2)) * 30
    truth = similarity(1.0, 2.5, 12.0, -7.0)
    np.testing.assert_allclose(umeyama(src, apply(truth, src), estimate_scale=False), truth, atol=1e-9)


def _least_squares_optimum(src: np.ndarray, dst: np.ndarray, *, estimate_scale: bool) -> np.ndarray:
    """The best similarity by generic nonlinear least squares over (scale, angle, tx, ty), several starts."""

    def residual(p: np.ndarray) -> np.ndarray:
        scale = p[0] if estimate_scale else 1.0
        return (apply(similarity(scale, p[1], p[2], p[3]), src) - dst).ravel()

    best = None
    for start_angle in np.linspace(-np.pi, np.pi, 6, endpoint=False):
        shift = dst.mean(axis=0) - src.mean(axis=0)
        fit = least_squares(residual, [1.0, start_angle, *shift], xtol=1e-15, ftol=1e-15, gtol=1e-15)
        if best is None or fit.cost < best.cost:
            best = fit
    scale = best.x[0] if estimate_scale else 1.0
    if scale < 0:  # (−s, θ) is (s, θ + π)
        return similarity(-scale, best.x[1] + np.pi, best.x[2], best.x[3])
    return similarity(scale, *best.x[1:])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("estimate_scale", [True, False])
def test_umeyama_is_the_least_squares_optimum_with_noise(seed, estimate_scale):
    rng = np.random.default_rng(100 + seed)
    src = rng.uniform(0, 100, size=(5, 2))
    truth = similarity(rng.uniform(0.5, 2.0), rng.uniform(-np.pi, np.pi), *rng.uniform(-50, 50, size=2))
    dst = apply(truth, src) + rng.normal(scale=3.0, size=src.shape)
    if seed == 3:  # a mirrored point set: the best rotation, never a reflection
        dst[:, 0] = -dst[:, 0]
    m = umeyama(src, dst, estimate_scale=estimate_scale)
    ref = _least_squares_optimum(src, dst, estimate_scale=estimate_scale)
    np.testing.assert_allclose(m, ref, atol=1e-6)
    assert np.linalg.det(m[:, :2]) > 0


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        (np.ones((5, 2)) * 3.0, np.random.default_rng(0).normal(size=(5, 2)), "src is degenerate"),
        (np.random.default_rng(0).normal(size=(5, 2)), np.zeros((5, 2)), "dst is degenerate"),
        (np.zeros((1, 2)), np.zeros((1, 2)), "at least 2"),
        (np.zeros((5, 3)), np.zeros((5, 3)), r"\(N, 2\)"),
        (np.zeros(10), np.zeros(10), r"\(N, 2\)"),
        (np.zeros((5, 2)), np.zeros((4, 2)), "same shape"),
        (np.array([[0.0, 0.0], [1.0, np.nan]]), np.zeros((2, 2)), "finite"),
    ],
)
def test_umeyama_rejects_bad_input(src, dst, message):
    with pytest.raises(ValueError, match=message):
        umeyama(src, dst)


def test_two_points_fix_a_similarity():
    src = np.array([[10.0, 10.0], [20.0, 10.0]])
    m = umeyama(src, np.array([[0.0, 0.0], [0.0, 20.0]]))
    np.testing.assert_allclose(m, similarity(2.0, np.pi / 2, 20.0, -20.0), atol=1e-12)


def test_transform_points():
    m = similarity(1.5, 0.3, 4.0, -2.0)
    pts = np.random.default_rng(3).normal(size=(6, 2))
    np.testing.assert_allclose(transform_points(m, pts), apply(m, pts))
    with pytest.raises(ValueError, match="2x3"):
        transform_points(np.eye(3), pts)


# ---------------------------------------------------------------------------------------------------------
# warp_face: where the landmarks land

COLOURS = [(255, 60, 60), (60, 255, 60), (60, 60, 255), (255, 255, 60), (60, 255, 255)]
BACKGROUND = 20


def _disc_image(size: tuple[int, int], centres: np.ndarray, radius: float) -> Image.Image:
    """Dark RGB image with anti-aliased discs (8x8 supersampled coverage) centred at ``centres``.

    Pixel-index coordinates: the pixel in column i, row j covers [i - 0.5, i + 0.5] x [j - 0.5, j + 0.5].
    """
    w, h = size
    arr = np.full((h, w, 3), float(BACKGROUND))
    sub = (np.arange(8) + 0.5) / 8 - 0.5
    for (cx, cy), colour in zip(centres, COLOURS, strict=True):
        x0, x1 = int(np.floor(cx - radius - 1)), int(np.ceil(cx + radius + 1))
        y0, y1 = int(np.floor(cy - radius - 1)), int(np.ceil(cy + radius + 1))
        xs = np.arange(x0, x1 + 1)[None, :, None, None] + sub[None, None, None, :]
        ys = np.arange(y0, y1 + 1)[:, None, None, None] + sub[None, None, :, None]
        cover = (((xs - cx) ** 2 + (ys - cy) ** 2) <= radius**2).mean(axis=(2, 3))
        patch = arr[y0 : y1 + 1, x0 : x1 + 1]
        patch += cover[..., None] * (np.array(colour, dtype=float) - BACKGROUND)
    return Image.fromarray(np.round(arr).astype(np.uint8), "RGB")


def _centroid(img: Image.Image, around: np.ndarray, window: float) -> np.ndarray:
    """Intensity-weighted centroid (background removed) of the pixels within ``window`` px of ``around``."""
    arr = np.asarray(img, dtype=np.float64).sum(axis=2) - 3 * BACKGROUND
    ys, xs = np.mgrid[: arr.shape[0], : arr.shape[1]]
    near = (xs - around[0]) ** 2 + (ys - around[1]) ** 2 <= window**2
    weight = np.where(near, np.clip(arr, 0, None), 0.0)
    assert weight.sum() > 0, f"no disc near {around}"
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


@pytest.mark.parametrize("spec", [AlignmentSpec(size=112), AlignmentSpec(size=160, margin=0.1)])
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_warp_face_puts_the_landmarks_on_the_template(spec, seed):
    rng = np.random.default_rng(seed)
    scale = [0.5, 2.0, rng.uniform(0.5, 2.0), rng.uniform(0.5, 2.0)][seed]
    angle = np.deg2rad([30.0, -30.0, rng.uniform(-30, 30), rng.uniform(-30, 30)][seed])
    size = (300, 260)
    centred = ARCFACE_TEMPLATE_112 - ARCFACE_TEMPLATE_112.mean(axis=0)
    place = np.array(size) / 2 + rng.uniform(-40, 40, size=2)
    landmarks = apply(similarity(scale, angle, *place), centred)
    radius = 3.0 * scale  # ~3 px in a 112 crop at any scale
    image = _disc_image(size, landmarks, radius)
    # the rendered discs sit where they should (checks the reference itself)
    for p in landmarks:
        np.testing.assert_allclose(_centroid(image, p, radius + 3), p, atol=0.05)

    crop = warp_face(image, landmarks, spec)
    assert crop.size == (spec.size, spec.size) and crop.mode == "RGB"
    template = spec.landmarks_template()
    window = 10.0 * spec.size / 112
    errors = [np.linalg.norm(_centroid(crop, t, window) - t) for t in template]
    assert max(errors) < 0.15, errors  # measured: at most 0.07 px


def test_warp_face_pixel_centres_with_an_exact_integer_scale():
    """Landmarks mapped by scale 2 about the template: pixel (2i + 0.5, 2j + 0.5) of the source is pixel (i, j)."""
    spec = AlignmentSpec(size=112)
    template = spec.landmarks_template()
    src = np.random.default_rng(5).integers(0, 256, size=(224, 224, 3), dtype=np.uint8)
    crop = warp_face(Image.fromarray(src), template * 2 + 0.5, spec, resample=Image.BILINEAR)
    expect = src.astype(float).reshape(112, 2, 112, 2, 3).mean(axis=(1, 3))  # bilinear at a 2x2 centre
    np.testing.assert_allclose(np.asarray(crop, dtype=float), expect, atol=1.0)  # PIL rounds in fixed point


def test_warp_face_rejects_bad_landmarks():
    img = Image.new("RGB", (64, 64))
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        warp_face(img, np.zeros((4, 2)), AlignmentSpec())
    with pytest.raises(ValueError, match="degenerate"):
        warp_face(img, np.full((5, 2), 7.0), AlignmentSpec())
    with pytest.raises(ValueError, match="five_point"):
        warp_face(img, ARCFACE_TEMPLATE_112, AlignmentSpec(kind="lfw_crop"))


# ---------------------------------------------------------------------------------------------------------
# AlignmentSpec


def test_alignment_spec_round_trip():
    for spec in (
        AlignmentSpec(),
        AlignmentSpec(size=160, margin=0.1),
        AlignmentSpec(kind="lfw_crop", size=250),
    ):
        d = json.loads(json.dumps(spec.to_dict()))
        assert AlignmentSpec.from_dict(d) == spec
    assert AlignmentSpec().to_dict() == {
        "kind": "five_point",
        "size": 112,
        "margin": 0.0,
        "template": "arcface",
    }
    assert AlignmentSpec.from_dict({"size": 128}) == AlignmentSpec(size=128)


@pytest.mark.parametrize(
    ("d", "words"),
    [
        ({"sizee": 112}, ["sizee", "'size'", "'margin'"]),
        ({"kind": "5pt"}, ["kind", "'5pt'", "'five_point'", "'lfw_crop'"]),
        ({"size": 8}, ["size", "8", "[16, 4096]"]),
        ({"size": 5000}, ["size", "5000"]),
        ({"size": 112.0}, ["size", "integer"]),
        ({"size": True}, ["size", "integer"]),
        ({"margin": 1.0}, ["margin", "[0, 1)"]),
        ({"margin": -0.1}, ["margin", "-0.1"]),
        ({"margin": "0.1"}, ["margin", "number"]),
        ({"template": "dlib"}, ["template", "'dlib'", "'arcface'"]),
    ],
)
def test_alignment_spec_from_dict_is_strict(d, words):
    with pytest.raises(ValueError) as info:
        AlignmentSpec.from_dict(d)
    for word in words:
        assert word in str(info.value)


def test_landmarks_template_scale_and_margin():
    np.testing.assert_allclose(AlignmentSpec().landmarks_template(), ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(
        AlignmentSpec(size=224).landmarks_template(), (ARCFACE_TEMPLATE_112 + 0.5) * 2 - 0.5
    )
    plain, wide = (
        AlignmentSpec(size=160).landmarks_template(),
        AlignmentSpec(size=160, margin=0.25).landmarks_template(),
    )
    centre = np.array([79.5, 79.5])
    np.testing.assert_allclose(wide - centre, (plain - centre) / 1.5)
    with pytest.raises(ValueError, match="five_point"):
        AlignmentSpec(kind="lfw_crop").landmarks_template()


# ---------------------------------------------------------------------------------------------------------
# Face and choose_faces


def face(x1: float, y1: float, x2: float, y2: float, score: float = 0.99) -> Face:
    """A face whose landmarks are the ArcFace template fitted into its box."""
    pts = ARCFACE_TEMPLATE_112 / 112 * [x2 - x1, y2 - y1] + [x1, y1]
    return Face(box=(x1, y1, x2, y2), score=score, landmarks=pts)


def test_face_properties_and_dict():
    f = face(10, 20, 50, 100, score=0.9)
    assert (f.width, f.height, f.area, f.center) == (40.0, 80.0, 3200.0, (30.0, 60.0))
    d = json.loads(json.dumps(f.to_dict()))
    assert Face.from_dict(d) == f and hash(Face.from_dict(d)) == hash(f)
    assert f.landmarks.dtype == np.float64 and not f.landmarks.flags.writeable
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        Face(box=(0, 0, 1, 1), score=1.0, landmarks=np.zeros((4, 2)))
    with pytest.raises(ValueError, match="x2 >= x1"):
        Face(box=(5, 0, 1, 1), score=1.0, landmarks=np.zeros((5, 2)))
    with pytest.raises(ValueError, match="keys"):
        Face.from_dict({"box": [0, 0, 1, 1], "score": 1.0})


def test_choose_faces_policies():
    big_corner = face(0, 0, 100, 100, score=0.8)
    small_centre = face(180, 130, 220, 170, score=0.95)
    mid = face(250, 20, 330, 100, score=0.99)
    faces = [big_corner, small_centre, mid]
    size = (400, 300)
    assert choose_faces(faces, size, "largest") == [big_corner]
    assert choose_faces(faces, size, "central") == [small_centre]
    assert choose_faces(faces, size, "all") == [mid, small_centre, big_corner]
    assert choose_faces([], size, "largest") == []
    # central tie (same centre): the larger face wins
    inner, outer = face(190, 140, 210, 160, score=0.99), face(170, 120, 230, 180, score=0.5)
    assert choose_faces([inner, outer], (401, 301), "central") == [outer]
    with pytest.raises(ValueError, match="'largest', 'central', 'all'"):
        choose_faces(faces, size, "biggest")
    with pytest.raises(ValueError, match="image_size"):
        choose_faces(faces, (400,), "largest")


# ---------------------------------------------------------------------------------------------------------
# FaceAligner with a scripted detector


class ScriptedDetector:
    """A Detector that returns prepared faces per image size and records what it was given."""

    name = "scripted"
    min_score = 0.5

    def __init__(self, faces_by_size: dict[tuple[int, int], list[Face]] | None = None) -> None:
        self.faces_by_size = faces_by_size or {}
        self.calls: list[list[Image.Image]] = []

    def detect(self, images):
        self.calls.append(list(images))
        return [list(self.faces_by_size.get(img.size, [])) for img in images]


def test_aligner_statuses():
    two = [face(20, 20, 120, 140, score=0.99), face(200, 30, 260, 100, score=0.97)]
    det = ScriptedDetector({(300, 200): two, (160, 160): [face(30, 20, 130, 140)]})
    aligner = FaceAligner(det, AlignmentSpec(size=112))
    grey = Image.new("L", (160, 160), 90)
    blank = Image.new("RGB", (100, 90), (128, 128, 128))
    tiny = Image.new("RGB", (10, 10))
    results = aligner.align([Image.new("RGB", (300, 200)), grey, blank, tiny])
    assert [r.status for r in results] == ["several_faces", "ok", "no_face", "too_small"]
    assert len(det.calls) == 1 and [im.size for im in det.calls[0]] == [(300, 200), (160, 160), (100, 90)]
    assert all(im.mode == "RGB" for im in det.calls[0])  # the greyscale image went in as RGB
    several, one, none, small = results
    assert several.chosen == [two[0]] and len(several.crops) == 1 and several.faces == two
    assert "2 faces" in several.reason
    assert one.crops[0].size == (112, 112) and one.crops[0].mode == "RGB"
    assert none.crops == [] and "no face found (scripted, min score 0.5)" in none.reason and not none.ok
    assert "10x10" in small.reason and small.crops == []
    assert json.loads(json.dumps(several.to_dict()))["chosen"] == [0]


def test_aligner_select_all_and_center_crop_fallback():
    two = [face(20, 20, 120, 140, score=0.9), face(200, 30, 260, 100, score=0.97)]
    det = ScriptedDetector({(300, 200): two})
    results = FaceAligner(det, AlignmentSpec(size=96), select="all", no_face="center_crop").align(
        [Image.new("RGB", (300, 200)), Image.new("RGB", (300, 200), (1, 2, 3)).resize((250, 200))]
    )
    assert results[0].status == "several_faces" and results[0].chosen == [two[1], two[0]]
    assert [c.size for c in results[0].crops] == [(96, 96), (96, 96)]
    assert results[1].status == "fallback_center" and [c.size for c in results[1].crops] == [(96, 96)]


def test_center_crop_fallback_is_the_central_square():
    arr = np.zeros((200, 300, 3), dtype=np.uint8)
    arr[40:160, 90:210] = 255  # the centred 0.6 x 200 = 120 px square
    aligner = FaceAligner(ScriptedDetector(), AlignmentSpec(size=120), no_face="center_crop")
    (result,) = aligner.align([Image.fromarray(arr)])
    assert result.status == "fallback_center"
    assert np.asarray(result.crops[0]).min() == 255


def test_lfw_crop_needs_no_detector():
    det = ScriptedDetector()
    img = Image.new("RGB", (250, 250), (5, 6, 7))
    (same,) = FaceAligner(det, AlignmentSpec(kind="lfw_crop", size=250)).align([img])
    (small,) = FaceAligner(det, AlignmentSpec(kind="lfw_crop", size=112)).align([img])
    assert det.calls == []
    assert same.status == "ok" and np.array_equal(np.asarray(same.crops[0]), np.asarray(img))
    assert small.crops[0].size == (112, 112)


def test_align_files_reports_unreadable_files(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (160, 160)).save(good)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image at all")
    det = ScriptedDetector({(160, 160): [face(30, 20, 130, 140)]})
    results = FaceAligner(det).align_files([good, bad, tmp_path / "missing.jpg", good], chunk_size=3)
    assert [r.status for r in results] == ["ok", "error", "error", "ok"]
    assert all(r.reason for r in results[1:3])


def test_aligner_rejects_bad_options():
    with pytest.raises(ValueError, match="select"):
        FaceAligner(ScriptedDetector(), select="biggest")
    with pytest.raises(ValueError, match="no_face"):
        FaceAligner(ScriptedDetector(), no_face="crop")
    with pytest.raises(ValueError, match="center_crop_fraction"):
        FaceAligner(ScriptedDetector(), center_crop_fraction=0.0)
    with pytest.raises(TypeError, match="detector"):
        FaceAligner(object())
    with pytest.raises(TypeError, match=r"images\[0\]"):
        FaceAligner(ScriptedDetector()).align([np.zeros((64, 64, 3))])


# ---------------------------------------------------------------------------------------------------------
# registry, light imports, the missing-dependency hint


def test_build_detector_names_the_valid_choices():
    with pytest.raises(ValueError, match="'mtcnn'"):
        build_detector("retinaface")


def test_importing_faces_loads_no_detector_stack():
    code = (
        "import sys, facenet_hf.faces\n"
        "print(sorted(m for m in ('torch', 'facenet_pytorch', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_missing_facenet_pytorch_gives_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "facenet_pytorch", None)  # makes `import facenet_pytorch` fail
    with pytest.raises(ImportError, match=r"pip install facenet-pytorch==2\.5\.3"):
        MTCNNDetector(device="cpu")

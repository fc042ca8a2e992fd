"""The real MTCNN detector (facenet-pytorch's bundled weights, CPU) on the bundled LFW sample: the central face
and plausible landmarks, batched = one-by-one detection, a rotated face on a noisy canvas aligned back onto the
template, and the aligner's statuses on bad input. A few images only (the file runs in seconds)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from facenet_hf.faces import AlignmentSpec, Face, FaceAligner, MTCNNDetector, transform_points, umeyama

NAMES = ["Abdullah/Abdullah_0002", "Calvin_Harrison/Calvin_Harrison_0001", "John_Cornyn/John_Cornyn_0001"]


@pytest.fixture(scope="module")
def detector() -> MTCNNDetector:
    return MTCNNDetector(device="cpu")


@pytest.fixture(scope="module")
def images(lfw_sample) -> list[Image.Image]:
    root = lfw_sample / "lfw-deepfunneled"
    return [Image.open(root / f"{name}.jpg").convert("RGB") for name in NAMES]


@pytest.fixture(scope="module")
def detected(detector, images) -> list[list[Face]]:
    return detector.detect(images)


def assert_plausible(face: Face) -> None:
    (lx, ly), (rx, ry), (nx, ny), (mlx, mly), (mrx, mry) = face.landmarks
    assert lx < nx < rx and mlx < mrx
    assert max(ly, ry) < ny < min(mly, mry)
    x1, y1, x2, y2 = face.box
    assert ((face.landmarks >= [x1, y1]) & (face.landmarks <= [x2, y2])).all()


def test_lfw_images_have_exactly_the_central_face(detected, images):
    for faces, img in zip(detected, images, strict=True):
        assert len(faces) == 1
        (f,) = faces
        assert f.score > 0.9
        cx, cy = f.center
        assert abs(cx - img.width / 2) < 25 and abs(cy - img.height / 2) < 25  # deep-funneled: centred
        assert 60 < f.width < 140
        assert_plausible(f)


def test_batched_detection_equals_one_by_one(detector, images, detected):
    other = [img.resize((200, 180), Image.BILINEAR) for img in images[:2]]
    batch = [images[0], other[0], images[1], other[1], images[2]]
    together = MTCNNDetector(device="cpu", batch_size=2).detect(batch)
    alone = [detector.detect([img])[0] for img in batch]
    assert [len(f) for f in together] == [len(f) for f in alone] == [1, 1, 1, 1, 1]
    for a, b in zip(together, alone, strict=True):
        np.testing.assert_allclose(a[0].box, b[0].box, atol=1e-3)
        np.testing.assert_allclose(a[0].landmarks, b[0].landmarks, atol=1e-3)
        assert a[0].score == pytest.approx(b[0].score, abs=1e-5)
    for k in (0, 2, 4):  # the module's own batch of three 250x250 images agrees too
        np.testing.assert_allclose(together[k][0].landmarks, detected[k // 2][0].landmarks, atol=1e-3)


def _rotated_on_canvas(img: Image.Image, angle: float, offset: tuple[int, int]):
    """``img`` turned ``angle`` degrees (counter-clockwise) and pasted on a noise canvas; and the point map."""
    rot = img.rotate(angle, resample=Image.BICUBIC, expand=True)
    rng = np.random.default_rng(0)
    canvas = Image.fromarray(rng.normal(128, 30, size=(400, 480, 3)).clip(0, 255).astype(np.uint8))
    canvas.paste(rot, offset)
    t = np.deg2rad(angle)
    r = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    centre, rot_centre = np.array(img.size) / 2, np.array(rot.size) / 2

    def mapping(p: np.ndarray) -> np.ndarray:  # pixel-index coordinates of img -> of the canvas
        return (p + 0.5 - centre) @ r.T + rot_centre - 0.5 + offset

    return canvas, mapping


def test_rotated_face_is_found_and_aligned_onto_the_template(detector, images, detected):
    canvas, mapping = _rotated_on_canvas(images[0], 20.0, (170, 80))
    faces = detector.detect([canvas])[0]
    assert faces and faces[0].score > 0.9
    expected = mapping(detected[0][0].landmarks)
    moved = np.linalg.norm(faces[0].landmarks - expected, axis=1)
    assert moved.max() < 3.0, moved  # the detector follows the rotation

    spec = AlignmentSpec(size=160, margin=0.1)  # re-detection needs some border round the face
    (result,) = FaceAligner(detector, spec).align([canvas])
    assert result.status == "ok" and result.crops[0].size == (160, 160)
    again = detector.detect(result.crops)[0]  # sorted by score; a weak false face may come second
    assert again and again[0].score > 0.9 and again[0].area == max(f.area for f in again)
    template = spec.landmarks_template()
    m = umeyama(result.chosen[0].landmarks, template)
    # re-detected vs where the alignment put the landmarks: MTCNN's repeatability on the upright crop
    to_aligned = np.linalg.norm(again[0].landmarks - transform_points(m, result.chosen[0].landmarks), axis=1)
    # re-detected vs the template: the above plus this face's own difference from the mean template shape
    to_template = np.linalg.norm(again[0].landmarks - template, axis=1)
    assert to_aligned.max() < 4.0, to_aligned
    assert to_template.max() < 8.0 and to_template.mean() < 5.0, to_template
    assert_plausible(again[0])


def test_bad_inputs(detector):
    blank = Image.new("RGB", (200, 200), (128, 128, 128))
    (none,) = FaceAligner(detector).align([blank])
    assert none.status == "no_face" and "no face found (mtcnn" in none.reason and none.crops == []
    (fallback,) = FaceAligner(detector, AlignmentSpec(size=112), no_face="center_crop").align([blank])
    assert fallback.status == "fallback_center" and [c.size for c in fallback.crops] == [(112, 112)]
    (small,) = FaceAligner(detector).align([Image.new("RGB", (10, 10))])
    assert small.status == "too_small"
    assert detector.detect([Image.new("RGB", (10, 10))]) == [[]]  # smaller than min_face_size: no face


def test_greyscale_image_is_aligned(detector, images):
    (result,) = FaceAligner(detector).align([images[1].convert("L")])
    assert result.status == "ok" and result.crops[0].mode == "RGB" and result.crops[0].size == (112, 112)
    assert_plausible(result.chosen[0])


def test_two_faces_side_by_side(detector, images):
    pair = Image.new("RGB", (500, 250))
    pair.paste(images[0], (0, 0))
    pair.paste(images[2], (250, 0))
    (largest,) = FaceAligner(detector).align([pair])
    assert largest.status == "several_faces" and len(largest.faces) == 2 and len(largest.crops) == 1
    (both,) = FaceAligner(detector, select="all").align([pair])
    assert both.status == "several_faces" and len(both.crops) == 2
    assert sorted(f.center[0] > 250 for f in both.chosen) == [False, True]


def test_min_score_drops_faces(images, detected):
    score = detected[0][0].score
    assert score < 1.0
    assert MTCNNDetector(device="cpu", min_score=(score + 1) / 2).detect(images[:1]) == [[]]
    (kept,) = MTCNNDetector(device="cpu", min_score=score - 1e-6).detect(images[:1])
    assert [f.score for f in kept] == pytest.approx([score])
    with pytest.raises(ValueError, match="thresholds"):
        MTCNNDetector(device="cpu", thresholds=(0.6, 0.7))
    with pytest.raises(ValueError, match="min_score"):
        MTCNNDetector(device="cpu", min_score=1.5)

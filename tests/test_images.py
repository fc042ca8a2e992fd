"""Tests for facenet_hf.data.images: robust loading, colour modes, EXIF, bad files, decompression bombs."""

from __future__ import annotations

import io
import os
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from facenet_hf.data.images import ALPHA_BACKGROUND, BadImageError, check_image, load_image, to_rgb


def _noise(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def _save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    img.save(path, fmt, **kw)
    return path


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _png_claiming(width: int, height: int) -> bytes:
    """A real 16x16 PNG whose IHDR is patched (CRC fixed) to claim ``width x height``: cheap to make."""
    data = bytearray(_png_bytes(Image.new("RGB", (16, 16))))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def _reason(exc_info: pytest.ExceptionInfo[BadImageError]) -> str:
    return exc_info.value.reason.lower()


# --- good images and colour modes ----------------------------------------------------------------------------


def test_rgb_jpeg_path_str_and_pathlib(tmp_path: Path) -> None:
    p = _save(_noise(40, 30), tmp_path / "a.jpg")
    for obj in (p, str(p)):
        img = load_image(obj)
        assert img.mode == "RGB" and img.size == (40, 30)


def test_bytes_and_datasets_row(tmp_path: Path) -> None:
    a, b = Image.new("RGB", (20, 20), (255, 0, 0)), Image.new("RGB", (20, 20), (0, 0, 255))
    pa = _save(a, tmp_path / "a.png")
    pb = _save(b, tmp_path / "b.png")
    assert load_image(pa.read_bytes()).getpixel((0, 0)) == (255, 0, 0)
    assert load_image(bytearray(pa.read_bytes())).getpixel((0, 0)) == (255, 0, 0)
    # bytes are preferred over the path when both are given
    assert load_image({"bytes": pa.read_bytes(), "path": str(pb)}).getpixel((0, 0)) == (255, 0, 0)
    assert load_image({"bytes": None, "path": str(pb)}).getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(BadImageError, match="neither 'bytes' nor 'path'"):
        load_image({"bytes": None, "path": None})


def test_pil_input_is_not_modified() -> None:
    rgba = Image.new("RGBA", (20, 20), (10, 20, 30, 255))
    out = load_image(rgba)
    assert out.mode == "RGB" and rgba.mode == "RGBA"
    rgb = Image.new("RGB", (20, 20))
    assert load_image(rgb) is rgb


@pytest.mark.parametrize(
    ("mode", "fmt", "value", "expected"),
    [
        ("L", "PNG", 77, (77, 77, 77)),
        ("1", "PNG", 1, (255, 255, 255)),
        ("CMYK", "JPEG", (0, 0, 0, 0), (255, 255, 255)),
        ("CMYK", "TIFF", (0, 255, 255, 0), (255, 0, 0)),
        ("P", "PNG", None, None),
        ("LA", "PNG", (200, 255), (200, 200, 200)),
        ("RGBA", "PNG", (200, 100, 50, 255), (200, 100, 50)),
        ("YCbCr", "JPEG", (128, 128, 128), None),
        ("I", "TIFF", 40000, (156, 156, 156)),  # 0..65535 range: / 257
        ("F", "TIFF", 0.5, (128, 128, 128)),  # 0..1 range: * 255
    ],
)
def test_modes_convert_to_rgb(tmp_path: Path, mode: str, fmt: str, value, expected) -> None:
    img = Image.new(mode, (24, 24)) if value is None else Image.new(mode, (24, 24), value)
    path = _save(img, tmp_path / f"img.{fmt.lower()}", fmt)
    out = load_image(path)
    assert out.mode == "RGB" and out.size == (24, 24)
    if expected is not None:
        got = np.asarray(out)[12, 12]
        assert np.abs(got.astype(int) - np.array(expected)).max() <= 3, (mode, got)


def test_palette_with_transparency_uses_black_background(tmp_path: Path) -> None:
    img = Image.new("P", (20, 20), 1)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    path = _save(img, tmp_path / "p.png", transparency=1)  # palette entry 1 (red) is fully transparent
    assert Image.open(path).mode == "P"
    assert load_image(path).getpixel((5, 5)) == ALPHA_BACKGROUND


def test_alpha_is_composited_on_black(tmp_path: Path) -> None:
    assert ALPHA_BACKGROUND == (0, 0, 0)
    arr = np.zeros((20, 20, 4), dtype=np.uint8)
    arr[:, :10] = (255, 255, 255, 0)  # transparent white -> black
    arr[:, 10:] = (200, 100, 50, 128)  # half transparent -> about half the colour
    out = load_image(_save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png"))
    assert out.getpixel((2, 2)) == (0, 0, 0)
    assert np.abs(np.array(out.getpixel((15, 2))) - np.array([100, 50, 25])).max() <= 1
    la = Image.fromarray(np.stack([np.full((20, 20), 255, np.uint8), np.zeros((20, 20), np.uint8)], -1), "LA")
    assert load_image(_save(la, tmp_path / "la.png")).getpixel((3, 3)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_16bit_greyscale_keeps_the_top_8_bits(tmp_path: Path, fmt: str) -> None:
    arr = np.zeros((20, 20), dtype=np.uint16)
    arr[:, :10] = 100 * 256 + 255
    arr[:, 10:] = 65535
    path = _save(Image.fromarray(arr), tmp_path / f"g.{fmt.lower()}", fmt)
    assert Image.open(path).mode.startswith("I;16")
    out = np.asarray(load_image(path))
    assert out.shape == (20, 20, 3)
    assert (out[:, :10] == 100).all() and (out[:, 10:] == 255).all()


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), dtype=np.uint8)  # stored 40 wide x 20 high: left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the stored left edge becomes the top
    path = _save(Image.fromarray(arr), tmp_path / "phone.jpg", "JPEG", exif=exif, quality=95)
    out = load_image(path)
    assert out.size == (20, 40)  # now 20 wide x 40 high
    top, bottom = np.asarray(out)[5, 10], np.asarray(out)[35, 10]
    assert top[0] > 200 and top[2] < 60, top
    assert bottom[2] > 200 and bottom[0] < 60, bottom
    assert load_image(Image.open(path)).size == (20, 40)  # same for a PIL image opened by the caller


def test_real_lfw_image(lfw_sample: Path) -> None:
    files = sorted((lfw_sample / "lfw-deepfunneled").glob("*/*.jpg"))
    assert files, "the bundled LFW sample has no images"
    img = load_image(files[0])
    assert img.mode == "RGB" and img.size == (250, 250)
    assert check_image(files[0]) is None


# --- bad files -----------------------------------------------------------------------------------------------


def test_bad_image_error_message_and_pickle() -> None:
    exc = BadImageError("a/b.jpg", "empty file (0 bytes)")
    assert isinstance(exc, ValueError)
    assert str(exc) == "cannot use image a/b.jpg: empty file (0 bytes)"
    back = pickle.loads(pickle.dumps(exc))
    assert (back.source, back.reason, str(back)) == (exc.source, exc.reason, str(exc))
    # the one-argument form torch's DataLoader uses to re-raise a worker's exception
    text = f"Caught BadImageError in DataLoader worker process 0.\nOriginal Traceback:\n  ...\nx.BadImageError: {exc}\n"
    again = BadImageError(text)
    assert (again.source, again.reason) == ("a/b.jpg", "empty file (0 bytes)")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="file not found") as info:
        load_image(tmp_path / "nope.jpg")
    assert info.value.source == str(tmp_path / "nope.jpg")
    with pytest.raises(BadImageError, match="directory"):
        load_image(tmp_path)


def test_zero_byte_file_and_empty_bytes(tmp_path: Path) -> None:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    with pytest.raises(BadImageError, match="empty file") as info:
        load_image(path)
    assert info.value.source == str(path)
    with pytest.raises(BadImageError, match="empty") as info:
        load_image(b"")
    assert info.value.source == "<bytes>"
    assert "empty" in check_image(path)


def test_truncated_jpeg_is_caught_at_load(tmp_path: Path) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    full = _save(_noise(120, 120), tmp_path / "full.jpg", "JPEG", quality=90)
    data = full.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="truncated") as info:
        load_image(cut)
    assert info.value.source == str(cut) and "re-download" in info.value.reason
    with pytest.raises(BadImageError, match="truncated"):
        load_image({"bytes": data[: len(data) // 2], "path": "Name/Name_0001.jpg"})
    assert "truncated" in check_image(cut, decode=True)


def test_truncated_png_is_caught(tmp_path: Path) -> None:
    data = _png_bytes(_noise(64, 64))
    with pytest.raises(BadImageError) as info:
        load_image(data[: len(data) // 2])
    assert "truncated" in _reason(info) or "corrupt" in _reason(info)
    assert check_image(data[: len(data) // 2]) is not None  # verify() catches a cut PNG without decoding


def test_text_file_with_image_extension(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    path.write_text("<!DOCTYPE html><html><body>404 Not Found</body></html>")
    with pytest.raises(BadImageError) as info:
        load_image(path)
    assert "not an image" in _reason(info) and "text" in _reason(info) and "doctype" in _reason(info)
    assert "not an image" in check_image(path)
    binary = tmp_path / "junk.png"
    binary.write_bytes(bytes(range(256)))
    with pytest.raises(BadImageError, match="not an image"):
        load_image(binary)


def test_tiny_images_are_refused(tmp_path: Path) -> None:
    path = _save(_noise(8, 8), tmp_path / "tiny.png")
    with pytest.raises(BadImageError, match=r"8x8.*min_size=16"):
        load_image(path)
    assert load_image(path, min_size=8).size == (8, 8)
    assert "min_size" in check_image(path)
    with pytest.raises(BadImageError, match="min_size"):
        load_image(_noise(100, 10))  # one short side is enough


def test_decompression_bomb_refused_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_claiming(20000, 20000))

    def no_decoding(self):  # decoding would be the bug: the header alone must decide
        raise AssertionError("decoded a decompression bomb")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL DecompressionBombWarning may escape
        with pytest.raises(BadImageError, match="max_pixels") as info:
            load_image(path)
        assert info.value.source == str(path)
        # below PIL's own hard limit (2 x Image.MAX_IMAGE_PIXELS), our max_pixels decides
        path2 = tmp_path / "big.png"
        path2.write_bytes(_png_claiming(9000, 9000))
        with pytest.raises(BadImageError, match="81,000,000 pixels, more than max_pixels=64,000,000"):
            load_image(path2)
        with pytest.raises(BadImageError, match="max_pixels=1,000"):
            load_image(_png_claiming(100, 100), max_pixels=1000)
        assert "max_pixels" in check_image(path)
        # a max_pixels above PIL's hard limit still never lets PIL's own error type escape
        with pytest.raises(BadImageError, match="decompression bomb"):
            load_image(path, max_pixels=10**12)


def test_pil_warning_zone_does_not_leak_a_warning(tmp_path: Path) -> None:
    # 10000 x 10000 = 1e8 pixels: above PIL's warning limit (~89.5M), below its error limit; allowed by us,
    # so decoding starts and fails on the (fake) data: a BadImageError, never a DecompressionBombWarning
    assert Image.MAX_IMAGE_PIXELS is not None and 2 * Image.MAX_IMAGE_PIXELS > 10**8
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(BadImageError):
            load_image(_png_claiming(10000, 10000), max_pixels=2 * 10**8)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path: Path) -> None:
    path = _save(_noise(32, 32), tmp_path / "secret.png")
    path.chmod(0)
    try:
        with pytest.raises(BadImageError, match="permission denied"):
            load_image(path)
    finally:
        path.chmod(0o644)


def test_wrong_type_and_bad_limits() -> None:
    with pytest.raises(TypeError, match="got int"):
        load_image(42)
    with pytest.raises(ValueError, match="max_pixels"):
        load_image(b"x", max_pixels=0)
    with pytest.raises(ValueError, match="min_size"):
        load_image(b"x", min_size=-1)


def test_check_image_good_and_cheap(tmp_path: Path) -> None:
    path = _save(_noise(64, 48), tmp_path / "ok.jpg")
    assert check_image(path) is None
    assert check_image(str(path), decode=True) is None
    assert check_image({"bytes": path.read_bytes(), "path": "x.jpg"}) is None
    assert check_image(_noise(64, 48)) is None
    assert "file not found" in check_image(tmp_path / "missing.jpg")


def test_to_rgb_direct() -> None:
    assert to_rgb(Image.new("L", (4, 4), 9)).getpixel((0, 0)) == (9, 9, 9)

"""Image operations the torchvision set lacks (PIL or uint8 tensor in, same type out; randomness from torch's
global RNG), and the one-pass uint8 -> normalised float conversion."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


class FaceCrop(torch.nn.Module):
    """Centred square crop whose side is ``fraction`` x the short side."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction

    def forward(self, img: Any) -> Any:
        h, w = F.get_size(img)
        side = max(1, round(self.fraction * min(h, w)))
        return F.center_crop(img, [side, side])

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}"


class RandomShift(torch.nn.Module):
    """Pad by ``padding`` px on each side, then crop ``size`` (default: the incoming size) at a random place."""

    def __init__(self, padding: int, size: int | list[int] | None, fill: Any, padding_mode: str) -> None:
        super().__init__()
        self.padding, self.size, self.fill, self.padding_mode = padding, size, fill, padding_mode

    def forward(self, img: Any) -> Any:
        h, w = F.get_size(img)
        if self.size is None:
            th, tw = h, w
        elif isinstance(self.size, int):
            th, tw = self.size, self.size
        else:
            th, tw = self.size
        p = self.padding
        # pad enough that a (th, tw) window fits, even when the image is smaller than the window
        pad_x, pad_y = max(p, (tw - w + 1) // 2 + p), max(p, (th - h + 1) // 2 + p)
        if pad_x or pad_y:
            img = F.pad(img, [pad_x, pad_y, pad_x, pad_y], fill=self.fill, padding_mode=self.padding_mode)
        ph, pw = h + 2 * pad_y, w + 2 * pad_x
        top = int(torch.randint(0, ph - th + 1, ()).item())
        left = int(torch.randint(0, pw - tw + 1, ()).item())
        return F.crop(img, top, left, th, tw)


class SquarePad(torch.nn.Module):
    """Pad the short side so the image becomes a centred square."""

    def __init__(self, fill: Any, padding_mode: str) -> None:
        super().__init__()
        self.fill, self.padding_mode = fill, padding_mode

    def forward(self, img: Any) -> Any:
        h, w = F.get_size(img)
        if h == w:
            return img
        d = abs(h - w)
        a, b = d // 2, d - d // 2
        padding = [a, 0, b, 0] if h > w else [0, a, 0, b]
        return F.pad(img, padding, fill=self.fill, padding_mode=self.padding_mode)


class FaceAffine(torch.nn.Module):
    """Random rotation, scale, aspect, shift and flip of the face square, sampled in one affine warp.

    The square is centred, ``fraction`` x the short side; a window of ``scale`` x its area and aspect
    ``ratio`` is placed at a uniform position inside it (as ``random_resized_crop`` does), turned by an angle
    uniform in ``degrees`` about its centre, mirrored with probability ``flip``, and resampled straight to
    ``size x size``: one pass over the output pixels instead of a full-image rotation, two crops and a resize.
    """

    def __init__(
        self,
        size: int,
        fraction: float,
        degrees: tuple[float, float],
        scale: tuple[float, float],
        ratio: tuple[float, float],
        flip: float,
        resample: Image.Resampling,
        fill: Any,
    ) -> None:
        super().__init__()
        self.size, self.fraction, self.degrees = size, fraction, degrees
        self.scale, self.ratio, self.flip, self.resample = scale, ratio, flip, resample
        self.fill = tuple(fill) if isinstance(fill, list) else (fill,) * 3
        self._log_ratio = (float(np.log(ratio[0])), float(np.log(ratio[1])))

    def coefficients(self, width: int, height: int, u: Sequence[float]) -> tuple[float, ...]:
        """PIL's inverse affine ``(a, b, c, d, e, f)`` for 6 uniform draws ``u`` in [0, 1)."""
        side = self.fraction * min(width, height)
        area = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        ratio = float(np.exp(self._log_ratio[0] + (self._log_ratio[1] - self._log_ratio[0]) * u[1]))
        w, h = side * float(np.sqrt(area * ratio)), side * float(np.sqrt(area / ratio))
        w, h = min(w, side), min(h, side)
        cx = width / 2 + (u[2] - 0.5) * (side - w)
        cy = height / 2 + (u[3] - 0.5) * (side - h)
        angle = np.deg2rad(self.degrees[0] + (self.degrees[1] - self.degrees[0]) * u[4])
        cos, sin = float(np.cos(angle)), float(np.sin(angle))
        sx = (-1.0 if u[5] < self.flip else 1.0) * w / self.size
        sy = h / self.size
        # source = centre + R(angle) @ diag(sx, sy) @ (output - size / 2), in continuous pixel coordinates
        a, b, d, e = cos * sx, -sin * sy, sin * sx, cos * sy
        half = self.size / 2
        return (a, b, cx - (a + b) * half, d, e, cy - (d + e) * half)

    def forward(self, img: Any) -> Any:
        is_tensor = isinstance(img, torch.Tensor)
        if is_tensor:
            img = Image.fromarray(img.permute(1, 2, 0).contiguous().numpy())
        u = torch.rand(6).tolist()
        data = self.coefficients(img.width, img.height, u)
        fill = self.fill if img.mode == "RGB" else self.fill[0]
        out = img.transform(
            (self.size, self.size), Image.Transform.AFFINE, data, resample=self.resample, fillcolor=fill
        )
        if is_tensor:
            return torch.from_numpy(np.array(out)).permute(2, 0, 1).contiguous()
        return out

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, fraction={self.fraction}, degrees={list(self.degrees)}, scale={list(self.scale)}, "
            f"ratio={list(self.ratio)}, flip={self.flip}"
        )


_GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ColorJitter(torch.nn.Module):
    """Brightness, contrast and saturation jitter in random order, as ``v2.ColorJitter`` (same factors and
    formulas: blend with black, with the mean grey level, with the grey image; clamped after each), computed
    in one float32 array instead of three PIL round trips (about 4x faster at face sizes)."""

    def __init__(self, brightness: float, contrast: float, saturation: float) -> None:
        super().__init__()
        self.ranges = [(max(0.0, 1 - f), 1 + f) if f else None for f in (brightness, contrast, saturation)]

    def forward(self, img: Any) -> Any:
        is_tensor = isinstance(img, torch.Tensor)
        x = (img.permute(1, 2, 0).numpy() if is_tensor else np.asarray(img)).astype(np.float32)
        order = torch.randperm(3).tolist()
        draws = torch.rand(3).tolist()
        for op in order:
            bounds = self.ranges[op]
            if bounds is None:
                continue
            f = bounds[0] + (bounds[1] - bounds[0]) * draws[op]
            if op == 0:  # blend with black
                x *= f
            elif op == 1:  # blend with the mean grey level
                mean = float((x @ _GREY_WEIGHTS).mean())
                x *= f
                x += (1 - f) * mean
            else:  # blend with the grey image
                grey = x @ _GREY_WEIGHTS
                grey *= 1 - f
                x *= f
                x += grey[..., None]
            np.clip(x, 0, 255, out=x)
        out = np.rint(x).astype(np.uint8)
        if is_tensor:
            return torch.from_numpy(out).permute(2, 0, 1).contiguous()
        return Image.fromarray(out, "RGB")

    def extra_repr(self) -> str:
        return f"brightness/contrast/saturation ranges={self.ranges}"


class EnsureSize(torch.nn.Module):
    """Exact bilinear resize to ``size x size`` when (and only when) the image has another size."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def forward(self, img: Any) -> Any:
        if list(F.get_size(img)) == [self.size, self.size]:
            return img
        return F.resize(
            img, [self.size, self.size], interpolation=v2.InterpolationMode.BILINEAR, antialias=True
        )

    def extra_repr(self) -> str:
        return f"size={self.size}"


class ToNormalizedTensor(torch.nn.Module):
    """PIL RGB / uint8 CHW tensor -> float32 CHW ``(x/255 - mean) / std`` in one pass over the data."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.register_buffer("_shift", torch.tensor(self.mean).view(-1, 1, 1) * 255.0, persistent=False)
        self.register_buffer(
            "_scale", 1.0 / (torch.tensor(self.std).view(-1, 1, 1) * 255.0), persistent=False
        )

    def forward(self, img: Any) -> torch.Tensor:
        if isinstance(img, Image.Image):
            # HWC uint8 -> contiguous CHW uint8 -> float: about 2x faster than F.pil_to_tensor + a float permute
            x = torch.from_numpy(np.array(img.convert("RGB") if img.mode != "RGB" else img))
            x = x.permute(2, 0, 1).contiguous()
        elif isinstance(img, torch.Tensor):
            x = img.contiguous()
        else:
            raise TypeError(f"expected a PIL image or a tensor, got {type(img).__name__}")
        was_float = x.is_floating_point()
        x = x.to(torch.float32)
        if was_float:  # a float image is in [0, 1]
            x = x * 255.0
        return x.sub_(self._shift).mul_(self._scale)

    def normalize_batch(self, hwc: np.ndarray, channels_last: bool) -> torch.Tensor:
        """uint8 ``[B, H, W, 3]`` -> float32 ``[B, 3, H, W]``, as ``forward`` on each image, in two batched passes;
        ``channels_last``: keep the NHWC memory (what a channels_last model takes) instead of copying to NCHW."""
        x = torch.from_numpy(hwc).permute(0, 3, 1, 2)
        x = (
            x.to(torch.float32)
            if channels_last
            else x.to(torch.float32, memory_format=torch.contiguous_format)
        )
        return x.sub_(self._shift).mul_(self._scale)

    def extra_repr(self) -> str:
        return f"mean={list(self.mean)}, std={list(self.std)}"


# ---------------------------------------------------------------------------------------------------------
# the steps

"""DataLoader glue: :class:`BatchTransform` (a ``Dataset.with_transform`` callable that decodes, transforms and
marks bad images once per batch) and :func:`collate_batch`."""

from __future__ import annotations

import numbers
import os
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from facenet_hf.constants import BAD_IMAGE_POLICIES
from facenet_hf.data.images import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, BadImageError, load_image
from facenet_hf.data.transforms.checks import choice_or_value_error

__all__ = ["BatchTransform", "collate_batch"]


class BatchTransform:
    """``Dataset.with_transform`` callable: a batch (dict of lists) -> model inputs, bad images handled.

    Returns ``{"pixel_values": float32 [B, 3, H, W], "labels": int64 [B], "valid": bool [B], "bad": list,
    "path": list}`` (``path[i]``: the row's file path, None for an image given as bytes only).
    Every value is row-aligned (``datasets`` splits the result into rows for ``ds[i]`` and ``__getitems__``), so
    here ``bad[i]`` is ``(path, reason)`` for a bad row and None for a good one; :func:`collate_batch` (the
    DataLoader ``collate_fn``) re-stacks the rows and keeps only the failures: ``bad: list[(path, reason)]``.

    ``bad_image_policy="error"`` raises :class:`BadImageError` (path + reason); ``"skip"`` puts a zero image
    with ``valid=False`` in the bad row (batch shapes stay P x K; the training loop drops invalid rows from the
    loss) and appends ``(path, reason)`` to ``self.bad``. With DataLoader worker processes ``self.bad`` fills in
    the workers' copies, so collect the failures from each batch's ``"bad"`` instead.
    ``label_key=None`` gives labels -1 (unlabelled data). With a :class:`FaceTransform` ending in ``normalize``
    (every built pipeline without tensor steps) the images are converted and normalised once per batch;
    ``channels_last=True`` then returns ``pixel_values`` in channels_last memory (what a channels_last model
    takes, without the copy it would otherwise make).

    ``seed``: None draws the augmentations from torch's global RNG (seeded per worker by the DataLoader). An int
    seeds each batch's augmentations from ``(seed, epoch, the batch's images' folder/file names)`` (see :meth:`set_epoch`): the same batch is augmented the
    same way whichever process or worker builds it and however much of the global RNG the training loop has
    consumed, so a resumed run sees exactly the images an uninterrupted one would; the global RNG is untouched.

    ``source_transforms``: ``{source name: transform}`` for the rows whose ``source_key`` column (what
    :func:`facenet_hf.data.sources.combine_sources` adds) names that source (a source framed differently, e.g.
    CelebA's tight crops beside LFW's); every other row gets ``transform``. All of them must give the same output
    size; the batched tensor conversion is kept when they are all batchable with one normalisation.
    """

    def __init__(
        self,
        transform: Callable[[Image.Image], torch.Tensor],
        *,
        bad_image_policy: str = "skip",
        image_key: str = "image",
        label_key: str | None = "label",
        image_size: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        min_size: int = DEFAULT_MIN_SIZE,
        seed: int | None = None,
        channels_last: bool = False,
        source_transforms: Mapping[str, Callable[[Image.Image], torch.Tensor]] | None = None,
        source_key: str = "source",
    ) -> None:
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        self.transform = transform
        self.source_transforms = dict(source_transforms or {})
        self.source_key = source_key
        everything = [transform, *self.source_transforms.values()]
        sizes = {getattr(t, "image_size", None) for t in everything}
        if len(sizes) > 1:
            raise ValueError(
                f"source_transforms must give the transform's output size, got sizes {sorted(map(str, sizes))}"
            )
        self._batchable = all(getattr(t, "batchable", False) for t in everything) and (
            len({repr(getattr(t, "to_tensor", None)) for t in everything}) == 1
        )
        self.bad_image_policy = choice_or_value_error(
            "bad_image_policy", bad_image_policy, BAD_IMAGE_POLICIES
        )
        self.image_key = image_key
        self.label_key = label_key
        self.image_size = image_size if image_size is not None else getattr(transform, "image_size", None)
        self.max_pixels = max_pixels
        self.min_size = min_size
        self.channels_last = bool(channels_last)
        self.bad: list[tuple[str, str]] = []
        self.seed = None if seed is None else int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Vary the seeded augmentations per epoch (workers see it if they are not persistent)."""
        self.epoch = int(epoch)

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        if self.seed is None:
            return self._apply(batch)
        key = zlib.crc32("\n".join(_identify(obj) for obj in self._column(batch, self.image_key)).encode())
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + self.epoch * 4_294_967_311 + key) % 2**63)
            return self._apply(batch)

    def _apply(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
        images = self._column(batch, self.image_key)
        if self.label_key is None:
            labels = torch.full((len(images),), -1, dtype=torch.int64)
        else:
            labels = torch.as_tensor(list(self._column(batch, self.label_key)), dtype=torch.int64)
        tf = self.transform
        batched = self._batchable  # the tensor conversion runs once for the batch
        if self.source_transforms:
            sources = self._column(batch, self.source_key)
            per_row = [self.source_transforms.get(src, tf) for src in sources]
        else:
            per_row = [tf] * len(images)
        rows: list[Any] = []  # per row: the prepared image (batched) or the tensor; None for a bad image
        bad: list[tuple[str, str] | None] = []
        for obj, tf in zip(images, per_row, strict=True):
            try:
                img = load_image(obj, max_pixels=self.max_pixels, min_size=self.min_size)
            except BadImageError as exc:
                if self.bad_image_policy == "error":
                    raise
                failure = (exc.source, exc.reason)
                self.bad.append(failure)
                rows.append(None)
                bad.append(failure)
                continue
            rows.append(tf.prepare(img) if batched else tf(img))
            bad.append(None)
        return {
            "pixel_values": self._batch_pixels(rows) if batched else self._stack(rows),
            "labels": labels,
            "valid": torch.tensor([x is not None for x in rows], dtype=torch.bool),
            "bad": bad,
            "path": [_path_of(obj) for obj in images],
        }

    def _batch_pixels(self, rows: list[Any]) -> torch.Tensor:
        """Prepared images -> one uint8 NHWC array -> normalised float32 in two batched passes (instead of a
        conversion per image and a stack); bad rows are zeros."""
        tf = self.transform
        size = tf.image_size
        hwc = np.zeros((len(rows), size, size, 3), dtype=np.uint8)
        loose: dict[int, torch.Tensor] = {}  # anything but an RGB uint8 image of the output size: one by one
        for i, img in enumerate(rows):
            if img is None:
                continue
            arr = _hwc_uint8(img, size)
            if arr is None:
                loose[i] = tf.to_tensor(img)
            else:
                hwc[i] = arr
        x = tf.to_tensor.normalize_batch(hwc, self.channels_last)
        for i, t in loose.items():
            x[i] = t
        for i, img in enumerate(rows):
            if img is None:
                x[i] = 0.0
        return x

    def _stack(self, pixels: list[torch.Tensor | None]) -> torch.Tensor:
        template = next((x for x in pixels if x is not None), None)
        if template is None:
            if self.image_size is None:
                raise ValueError(
                    f"all {len(pixels)} images of the batch are bad and the output size is unknown: "
                    "pass image_size= to BatchTransform"
                )
            template = torch.zeros(3, self.image_size, self.image_size)
        zeros = torch.zeros_like(template)
        x = torch.stack([zeros if x is None else x for x in pixels]) if pixels else zeros.unsqueeze(0)[:0]
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.dim() == 4 else x

    @staticmethod
    def _column(batch: Mapping[str, Sequence[Any]], key: str) -> Sequence[Any]:
        if key not in batch:
            raise KeyError(f"batch has no column {key!r}; columns: {', '.join(map(str, batch))}")
        return batch[key]

    def __repr__(self) -> str:
        return (
            f"BatchTransform(policy={self.bad_image_policy!r}, image_key={self.image_key!r}, "
            f"label_key={self.label_key!r}, seed={self.seed!r}, transform={self.transform!r})"
        )


def _hwc_uint8(img: Any, size: int) -> np.ndarray | None:
    """An RGB image of ``size x size`` as a uint8 ``[H, W, 3]`` array, or None when it is anything else."""
    if isinstance(img, Image.Image):
        return np.asarray(img) if img.mode == "RGB" and img.size == (size, size) else None
    if isinstance(img, torch.Tensor) and img.dtype == torch.uint8 and tuple(img.shape) == (3, size, size):
        return img.permute(1, 2, 0).numpy()
    return None


def _path_of(obj: Any) -> str | None:
    """An image row's file path, if it has one."""
    if isinstance(obj, dict):
        return str(obj["path"]) if obj.get("path") else None
    if isinstance(obj, (str, os.PathLike)):
        return str(obj)
    return None


def _identify(obj: Any) -> str:
    """A cheap stable identity for an image row: its file's folder and name (``Name/file.jpg``: the same
    wherever the dataset lives, so a run moved to another folder or machine draws the same augmentations), else
    a checksum of its bytes."""
    if isinstance(obj, dict):
        if obj.get("path"):
            return _last_two(str(obj["path"]))
        data = obj.get("bytes")
        return f"crc:{zlib.crc32(data)}" if data else ""
    if isinstance(obj, (str, os.PathLike)):
        return _last_two(os.fspath(obj))
    if isinstance(obj, (bytes, bytearray)):
        return f"crc:{zlib.crc32(obj)}"
    return str(id(obj))


def _last_two(path: str) -> str:
    return "/".join(path.replace(os.sep, "/").rsplit("/", 2)[-2:])


def _restack(rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack(rows)``, without the copy when the rows are, in order, the consecutive rows of one dense
    tensor (what ``Dataset.__getitems__`` makes of a batch transform's output: ``[t[0], t[1], ...]``), in NCHW or
    channels_last memory. Decided from the storage, not ``Tensor._base``, which inference mode does not set."""
    first = rows[0]
    n, size = len(rows), first.numel() * first.element_size()
    storage = first.untyped_storage().data_ptr()
    if all(
        isinstance(r, torch.Tensor)
        and r.dtype == first.dtype
        and r.device == first.device
        and r.shape == first.shape
        and r.stride() == first.stride()
        and r.untyped_storage().data_ptr() == storage
        and r.data_ptr() == first.data_ptr() + i * size
        for i, r in enumerate(rows)
    ):
        batch = first.as_strided((n, *first.shape), (first.numel(), *first.stride()), first.storage_offset())
        dense = batch.is_contiguous() or (
            batch.dim() == 4 and batch.is_contiguous(memory_format=torch.channels_last)
        )
        if (
            dense
            and batch.untyped_storage().nbytes() >= first.storage_offset() * first.element_size() + n * size
        ):
            return batch
    return torch.stack(list(rows))


def collate_batch(items: Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> dict[str, Any]:
    """DataLoader ``collate_fn`` for ``ds.with_transform(BatchTransform(...))``.

    ``items`` is the list of per-row dicts that ``Dataset.__getitems__`` makes of one transformed batch (or an
    already batched dict). Returns ``pixel_values [B,3,H,W]``, ``labels [B]``, ``valid [B]`` and ``bad``: the
    list of ``(path, reason)`` of the bad rows (always present, empty when none); other keys are stacked when
    tensors, else kept as lists.
    """
    if isinstance(items, Mapping):
        out = dict(items)
        out["bad"] = [b for b in out.get("bad", []) if b is not None]
        return out
    if not items:
        raise ValueError("collate_batch got an empty list of rows")
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        if key == "bad":
            out[key] = [tuple(v) for v in values if v is not None]
        elif isinstance(values[0], torch.Tensor):
            out[key] = _restack(values)
        else:
            out[key] = values
    out.setdefault("bad", [])
    return out

"""Building a run's parts from its config: the model (with a check that the backbone takes the image size) and
the data (identity-disjoint from the evaluation pairs; every data error surfaces here, before training)."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import numpy as np
import torch

from facenet_hf.config import (
    Config,
    ConfigError,
    IdentityExclusions,
    SourceConfig,
    read_exclusion_file,
    source_name,
)
from facenet_hf.constants import FIXED_MEAN, FIXED_STD
from facenet_hf.data.images import BadImageError
from facenet_hf.data.lfw import (
    LFWPairs,
    SplitOverlapError,
    check_disjoint,
    identity_disjoint_split,
    missing_pair_images,
    read_pairs,
)
from facenet_hf.data.prescan import prescan_dataset, scan_files
from facenet_hf.data.sources import arrow_column, combine_sources, keep_rows, load_source
from facenet_hf.faces.align import AlignmentSpec
from facenet_hf.faces.tree import folder_alignment
from facenet_hf.model import FaceNet

__all__ = ["build_data", "build_model", "check_image_size"]

logger = logging.getLogger(__name__)


def build_model(cfg: Config) -> FaceNet:
    """The one place a FaceNet is built from a config."""
    m = cfg.model
    mean, std = (FIXED_MEAN, FIXED_STD) if m.normalization == "fixed" else (None, None)
    model = FaceNet(
        backbone=m.backbone,
        embedding_dim=m.embedding_dim,
        head_bn=m.head_bn,
        dropout=m.dropout,
        image_size=m.image_size,
        mean=mean,
        std=std,
        eval_transforms=list(cfg.data.eval_transforms),
        distance="squared_euclidean" if cfg.loss.squared else "euclidean",
        alignment=alignment_spec(cfg),
    )
    if m.pretrained_weights:
        model.load_backbone_weights(m.pretrained_weights)
    check_image_size(model, cfg)
    return model


def alignment_spec(cfg: Config) -> dict | None:
    """The alignment the model is trained on (its config.json ``alignment``), None for LFW-style crops."""
    m = cfg.model
    if m.alignment != "five_point":
        return None
    return AlignmentSpec(size=m.align_size, margin=m.align_margin).to_dict()


def check_alignment(cfg: Config, folders: list[str]) -> None:
    """A folder made by ``facenet-hf align`` records its alignment (``alignment.json``): it must be the one the
    config trains for, else the model would record the wrong input in its config.json; and a five-point model
    needs such folders (raw images would train and score it on unaligned faces)."""
    want = alignment_spec(cfg)
    for folder in folders:
        made = folder_alignment(folder)
        if made is None and want is None:
            continue
        if made is None:
            raise ConfigError(
                f"model.alignment=five_point but {folder} has no alignment.json: it was not made by `facenet-hf "
                "align`; align it first (`facenet-hf align SRC DST`) and point the config at DST"
            )
        if want != made:
            raise ConfigError(
                f"{folder} holds faces aligned as {made}, but the config trains for {want or 'LFW-style crops'}: "
                f"set model.alignment=five_point, model.align_size={made.get('size')} and "
                f"model.align_margin={made.get('margin')} to match"
            )


def check_image_size(model: FaceNet, cfg: Config) -> None:
    """Refuse a ``model.image_size`` the backbone cannot take (e.g. a ViT built for 224 px), before training."""
    size, name = cfg.model.image_size, cfg.model.backbone
    patch = getattr(model.backbone, "patch_embed", None)
    fixed = getattr(patch, "img_size", None)
    if fixed is not None and getattr(patch, "strict_img_size", False) and tuple(fixed) != (size, size):
        raise ConfigError(
            f"model.image_size={size} does not fit backbone {name!r}: it takes only {fixed[0]}x{fixed[1]} images; "
            f"set model.image_size={fixed[0]}, or use a backbone that takes any size (a CNN such as resnet18)"
        )
    was_training = model.training
    model.eval()
    try:
        error = _forward_error(model, size)
        if error is None:
            return
        default = (getattr(model.backbone, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))[-1]
        if default != size and _forward_error(model, default) is None:
            raise ConfigError(
                f"model.image_size={size} does not fit backbone {name!r}: it fails on {size}x{size} images "
                f"({error}) but works at {default}x{default}; set model.image_size={default}"
            )
        raise ValueError(
            f"backbone {name!r} does not work as a FaceNet backbone: a forward pass fails ({error})"
        )
    finally:
        model.train(was_training)


def _forward_error(model: FaceNet, size: int) -> str | None:
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return None


def build_data(cfg: Config, *, bad_images: list | None = None, progress: bool = False):
    """Training dataset (identity-disjoint from the evaluation pairs) and the evaluation pairs (or None).

    Every data error surfaces here, before training: the source, the pairs file, missing or unusable pair
    images, and (``data.prescan``) unusable training images: the first one with ``data.bad_images=error``, more
    than ``data.max_bad_fraction`` of them with ``skip``; else they are dropped and their ``[path, reason]``
    appended to ``bad_images``.

    ``data.exclude_identities_file``: its identities are dropped from every source (by their raw names, before the
    held-out split, the overlap checks and the pre-scan); the counts are logged, and a listed name that no source
    holds is warned about.
    """
    d = cfg.data
    exclusions = (
        read_exclusion_file(d.exclude_identities_file, [source_name(s) for s in d.extra_sources])
        if d.exclude_identities_file
        else None
    )
    dropper = _Exclusion(exclusions) if exclusions is not None else None
    source = d.train_source or d.lfw_dir
    folders = {source, d.lfw_dir, *(s.path for s in d.extra_sources)}
    check_alignment(cfg, sorted(f for f in folders if f and Path(f).is_dir()))
    ds = load_source(
        source,
        image_column=d.image_column,
        label_column=d.label_column,
        name_column=d.name_column,
        labels_file=d.labels_file,
    )
    if dropper is not None:  # before the checks: a listed LFW person is dropped, not refused
        ds = dropper.apply(ds, None, f"the first source ({source})")
    pairs: LFWPairs | None = read_pairs(d.pairs) if d.pairs else None
    if pairs is not None and d.holdout_folds:
        with _quiet_datasets():  # a source filtered by the exclusions is flattened here: no bar for that
            ds, pairs = identity_disjoint_split(ds, pairs, d.holdout_folds)
    elif pairs is not None:  # read from Arrow: Dataset.unique would copy a filtered source, image bytes too
        check_disjoint(_identities(ds), pairs)
    if d.extra_sources:
        ds = _with_extra_sources(ds, d.extra_sources, pairs, dropper)
    if dropper is not None:
        dropper.report()
    if pairs is not None:
        _check_pair_images(cfg, pairs)
    total = len(ds)
    ds, bad = prescan_dataset(
        ds,
        mode=d.prescan,
        policy=d.bad_images,
        max_bad_fraction=d.max_bad_fraction,
        num_workers=d.num_workers,
        progress=progress,
    )
    if bad:
        logger.warning(
            "pre-scan: %d of %d training images are unusable and left out (see bad_images.tsv), e.g. %s: %s",
            len(bad),
            total,
            bad[0][1],
            bad[0][2],
        )
        if bad_images is not None:
            bad_images.extend([path, reason] for _, path, reason in bad)
    return ds, pairs


def _with_extra_sources(
    primary, extras: list[SourceConfig], pairs: LFWPairs | None, dropper: _Exclusion | None = None
):
    """The primary source and ``data.extra_sources`` as one dataset with disjoint label spaces.

    Each extra source is refused (:class:`SplitOverlapError` naming it) if any of its identities, by its own name
    before the prefix, is a person of the evaluation pairs: an extra source is never filtered, since a source
    holding evaluation people is most likely the evaluation set itself. A raw name shared with another source is
    only warned about: the prefixes keep them apart, but it may be one person under two labels.
    """
    parts: list[tuple[str | None, object]] = [(None, primary)]
    seen = {n: "the primary source" for n in _identities(primary)}
    for i, src in enumerate(extras):
        name = source_name(src)
        where = f"data.extra_sources[{i}] ({name!r}, {src.path})"
        ds = load_source(
            src.path,
            image_column=src.image_column,
            label_column=src.label_column,
            name_column=src.name_column,
            labels_file=src.labels_file,
        )
        if dropper is not None:
            ds = dropper.apply(ds, name, where)
        names = _identities(ds)
        if pairs is not None:
            try:
                check_disjoint(names, pairs)
            except SplitOverlapError as e:
                raise SplitOverlapError(
                    f"{where}: {e}; an extra training source may hold no person of the evaluation pairs"
                ) from None
        shared = sorted(names & seen.keys())
        if shared:
            logger.warning(
                "%s: %d identity names are also in %s (e.g. %s); they stay separate identities ('%s:<name>'), "
                "but may be the same people",
                where,
                len(shared),
                seen[shared[0]],
                ", ".join(shared[:5]),
                name,
            )
        seen.update(dict.fromkeys(names - seen.keys(), where))
        parts.append((name, ds))
    return combine_sources(parts)


@contextlib.contextmanager
def _quiet_datasets():
    """No ``datasets`` progress bars inside (a table operation of a second is not worth one)."""
    import datasets

    shown = not datasets.are_progress_bars_disabled()
    if shown:
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if shown:
            datasets.enable_progress_bars()


class _Exclusion:
    """``data.exclude_identities_file`` applied source by source: what each source lost, which names matched."""

    def __init__(self, exclusions: IdentityExclusions) -> None:
        self.exclusions = exclusions
        self.found: dict[str | None, set[str]] = {}  # source name (None: the first) -> the raw names it held
        self.dropped: list[tuple[str, int, int]] = []  # (where, identities, images) per source that lost any

    def apply(self, ds, source: str | None, where: str):
        import pyarrow as pa
        import pyarrow.compute as pc

        names = self.exclusions.names_for(source)
        if not names:
            self.found[source] = set()
            return ds
        identity = arrow_column(ds, "identity")
        hit = pc.is_in(identity, value_set=pa.array(sorted(names), pa.string())).to_numpy(
            zero_copy_only=False
        )
        found = set(pc.unique(pc.filter(identity, hit)).to_pylist()) if hit.any() else set()
        self.found[source] = found
        if not found:
            return ds
        keep = np.flatnonzero(~hit)
        if keep.size == 0:
            raise ConfigError(
                f"data.exclude_identities_file {self.exclusions.path!r} drops every identity of {where} "
                f"({len(found)} identities, {len(ds)} images): nothing is left to train on from it"
            )
        self.dropped.append((where, len(found), int(hit.sum())))
        with _quiet_datasets():  # a source already filtered is flattened: no bar for that
            return keep_rows(ds, keep, tag=f"exclude-{len(found)}-{int(hit.sum())}")

    def report(self) -> None:
        """Log what was dropped; warn about each listed name that no source (or not its own source) holds."""
        ex = self.exclusions
        everywhere = set().union(*self.found.values()) if self.found else set()
        unknown = sorted(
            (line, f"{s}:{n}" if s is not None else n)
            for (s, n), line in ex.lines.items()
            if (n not in everywhere if s is None else n not in self.found.get(s, set()))
        )
        identities = sum(i for _, i, _ in self.dropped)
        images = sum(m for _, _, m in self.dropped)
        if not ex.lines:
            logger.warning(
                "data.exclude_identities_file %s lists no identities: nothing dropped (fill it with the names to "
                "leave out, one a line)",
                ex.path,
            )
        else:
            per_source = "; ".join(f"{w}: {i} identities, {m} images" for w, i, m in self.dropped) or "none"
            logger.info(
                "data.exclude_identities_file %s: dropped %d identities (%d images) of the %d listed names "
                "before sampling (%s)",
                ex.path,
                identities,
                images,
                len(ex),
                per_source,
            )
        if unknown:
            shown = ", ".join(f"{n!r} (line {line})" for line, n in unknown[:20])
            more = f", and {len(unknown) - 20} more" if len(unknown) > 20 else ""
            logger.warning(
                "data.exclude_identities_file %s: %d listed names match no identity of their source(s), so "
                "nothing was dropped for them: %s%s; check the spelling (the source's own names: a VGGFace2 "
                "folder name n000123, an LFW name Aaron_Eckhart) or the '<source>:' prefix",
                ex.path,
                len(unknown),
                shown,
                more,
            )


def _identities(ds) -> set[str]:
    import pyarrow.compute as pc

    return set(pc.unique(arrow_column(ds, "identity")).to_pylist())


def _check_pair_images(cfg: Config, pairs: LFWPairs) -> None:
    """Every pair image must exist (and, with ``data.prescan``, be usable): the protocol needs every pair."""
    root = Path(cfg.data.lfw_dir)
    missing = missing_pair_images(root, pairs)
    if missing:
        shown = ", ".join(missing[:20]) + (", ..." if len(missing) > 20 else "")
        raise FileNotFoundError(
            f"{len(missing)} images named by the evaluation pairs ({cfg.data.pairs}) are missing under {root}: "
            f"{shown}; data.lfw_dir must hold Name/Name_NNNN.jpg for every pair image"
        )
    if cfg.data.prescan == "off":
        return
    p1, p2 = pairs.paths()
    bad = scan_files(
        [root / p for p in sorted(set(p1) | set(p2))],
        decode=cfg.data.prescan == "decode",
        num_workers=cfg.data.num_workers,
    )
    if bad:
        others = "; ".join(f"{path}: {reason}" for _, path, reason in bad[1:6])
        raise BadImageError(
            bad[0][1],
            f"{bad[0][2]} [an evaluation pair image: the verification protocol needs every pair; "
            f"{len(bad)} pair image(s) are unusable{': ' + others if others else ''}]",
        )

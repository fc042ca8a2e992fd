"""LFW verification of a model: embed each distinct pair image once, score pairs, run the fold protocol."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from facenet_hf.data.lfw import LFWPairs
from facenet_hf.data.workers import DEFAULT_WORKER_NICE
from facenet_hf.evaluation.embed import embed_files
from facenet_hf.evaluation.embeddings_io import pair_distances
from facenet_hf.evaluation.plots import plot_distance_histogram, plot_roc
from facenet_hf.evaluation.verification import report_to_json, verification_protocol
from facenet_hf.faces.tree import folder_alignment
from facenet_hf.fileio import atomic_write_text


def evaluate_lfw(
    model,
    lfw_dir: str | os.PathLike,
    pairs: LFWPairs,
    *,
    flip: str = "sum",
    batch_size: int = 128,
    num_workers: int = 0,
    worker_nice: int = DEFAULT_WORKER_NICE,
    squared: bool = True,
    far_target: float = 1e-3,
    accelerator=None,
    progress: bool = True,
    check_alignment: bool = True,
) -> tuple[dict[str, Any], np.ndarray]:
    """Score ``pairs`` (all of its folds) with ``model``; returns the protocol report and the pair distances.

    With ``check_alignment`` the images must be what the model expects: a five-point model needs a folder made
    by ``facenet-hf align`` with its alignment (``alignment.json``), an LFW-crop model one without."""
    if check_alignment:
        _check_folder(accelerator.unwrap_model(model) if accelerator else model, lfw_dir)
    paths1, paths2 = pairs.paths()
    unique = sorted(set(paths1) | set(paths2))
    root = Path(lfw_dir)
    missing = [p for p in unique if not (root / p).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} pair images are missing under {root}, e.g. {missing[:5]}; "
            "data.lfw_dir must be the folder holding Name/Name_NNNN.jpg"
        )
    emb = embed_files(
        model,
        [str(root / p) for p in unique],
        batch_size=batch_size,
        flip=flip,
        num_workers=num_workers,
        worker_nice=worker_nice,
        accelerator=accelerator,
        progress=progress,
        desc="embedding LFW pairs",
    )
    distances = pair_distances(unique, emb, paths1, paths2, squared=squared)
    report = verification_protocol(distances, pairs.is_same, pairs.fold, far_target=far_target)
    report["n_images"] = len(unique)
    report["flip"] = flip
    report["distance"] = "squared_euclidean" if squared else "euclidean"
    return report, distances


def _check_folder(model, lfw_dir) -> None:
    expected, made = getattr(model, "alignment", None), folder_alignment(lfw_dir)
    if expected == made:
        return
    if made is None:
        raise ValueError(
            f"the model expects five-point-aligned faces ({expected}) but {lfw_dir} has no alignment.json: align "
            f"it first (`facenet-hf align {lfw_dir} DST --size {expected['size']} --margin {expected['margin']} "
            "--select central --no-face center_crop`) and score DST"
        )
    raise ValueError(
        f"{lfw_dir} holds faces aligned as {made}, but the model expects "
        f"{expected or 'LFW deep-funneled style crops (the original LFW images)'}"
    )


def write_report(
    report: dict[str, Any], distances: np.ndarray, is_same: np.ndarray, out_dir: str | os.PathLike
) -> dict[str, Path]:
    """Write ``lfw_report.json``, ``lfw_roc.png`` and ``lfw_distances.png`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "lfw_report.json",
        "roc": out / "lfw_roc.png",
        "hist": out / "lfw_distances.png",
    }
    atomic_write_text(paths["json"], json.dumps(report_to_json(report), indent=2))
    plot_roc(report, paths["roc"])
    plot_distance_histogram(distances, is_same, report["threshold"], paths["hist"])
    return paths

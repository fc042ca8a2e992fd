"""An in-the-wild verification test built from LFW's held-out fold, and its scoring.

``build``: every image of fold 10's pairs is pasted onto a larger canvas (480-720 x 400-600 px) of other content
(random shapes, gradients and noise, blurred), at a random position and scale (0.3-1.5x its size in LFW),
turned by up to +-30 degrees; 30% of the photos also get a second, smaller face of another LFW person (from the
training folds). Files keep LFW's names, so ``pairs.txt`` works unchanged; ``wild.json`` records every draw.

``score``: one model on the same 600 pairs three ways: the original crops (the aligned copy of LFW made by
``facenet-hf align``), the wild photos with detection + alignment (``facenet-hf align --select largest``, the
centre-crop fallback counted), and the wild photos without alignment (the whole photo resized, as a user who
skips detection would get). Accuracy by the protocol's cross-validation inside the fold and with the model's
stored threshold, AUC.

    python scripts/wild_lfw.py build --lfw-dir /data/lfw/lfw-deepfunneled --pairs /data/lfw/pairs.txt --out /data/wild
    python scripts/wild_lfw.py score --model runs/aligned/model --pairs /data/lfw/pairs.txt \
        --aligned /data/lfw-aligned112/lfw-deepfunneled --wild /data/wild --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from facenet_hf.data.lfw import read_pairs


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    t = (x * rng.uniform(-1, 1) + y * rng.uniform(-1, 1)) / (w + h) + 0.5
    img = Image.fromarray((c0 + (c1 - c0) * t[..., None]).clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(6, 16)):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))]
        fill = tuple(int(v) for v in rng.integers(0, 255, 3))
        (draw.rectangle if rng.random() < 0.5 else draw.ellipse)(box, fill=fill)
    img = img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.5, 3))))
    noise = rng.normal(0, 8, (h, w, 3))
    return Image.fromarray((np.asarray(img, np.float32) + noise).clip(0, 255).astype(np.uint8))


def _patch(face: Image.Image, scale: float, angle: float) -> Image.Image:
    """The face square of a deep-funneled image (central 170 px), scaled and turned, with an alpha mask."""
    w, h = face.size
    side = 170
    sq = face.crop(((w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2)).convert("RGBA")
    size = max(8, round(side * scale))
    return sq.resize((size, size), Image.BILINEAR).rotate(angle, resample=Image.BILINEAR, expand=True)


def build(args: argparse.Namespace) -> int:
    lfw, out = Path(args.lfw_dir), Path(args.out)
    pairs = read_pairs(args.pairs)
    fold = pairs.select_folds([args.fold])
    p1, p2 = fold.paths()
    images = sorted(set(p1) | set(p2))
    o1, o2 = pairs.select_folds([f for f in pairs.folds if f != args.fold]).paths()
    others = sorted(set(o1) | set(o2))
    rng = np.random.default_rng(args.seed)
    log = {}
    for rel in images:
        w, h = int(rng.integers(480, 721)), int(rng.integers(400, 601))
        canvas = _background(rng, w, h)
        scale, angle = float(rng.uniform(0.3, 1.5)), float(rng.uniform(-30, 30))
        main = _patch(Image.open(lfw / rel).convert("RGB"), scale, angle)
        mx = int(rng.integers(0, max(1, w - main.width)))
        my = int(rng.integers(0, max(1, h - main.height)))
        entry = {"scale": scale, "angle": angle, "box": [mx, my, mx + main.width, my + main.height]}
        if rng.random() < args.second_face:
            other = others[int(rng.integers(len(others)))]
            s2 = scale * float(rng.uniform(0.4, 0.8))
            second = _patch(Image.open(lfw / other).convert("RGB"), s2, float(rng.uniform(-30, 30)))
            # away from the main face where the canvas allows (it may overlap on small canvases)
            sx = int(rng.integers(0, max(1, w - second.width)))
            sy = int(rng.integers(0, max(1, h - second.height)))
            canvas.paste(second, (sx, sy), second)
            entry["second_face"] = {
                "image": other,
                "scale": s2,
                "box": [sx, sy, sx + second.width, sy + second.height],
            }
        canvas.paste(main, (mx, my), main)
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        canvas.save(dst, quality=90)
        log[rel] = entry
    (out / "wild.json").write_text(
        json.dumps({"fold": args.fold, "seed": args.seed, "images": log}, indent=1)
    )
    print(f"wrote {len(images)} wild photos of fold {args.fold} to {out}")
    return 0


def score(args: argparse.Namespace) -> int:
    from facenet_hf import FaceNet
    from facenet_hf.cli import main as cli_main
    from facenet_hf.evaluation.lfw_eval import evaluate_lfw
    from facenet_hf.evaluation.verification import report_to_json
    from facenet_hf.faces.tree import read_manifest

    model = FaceNet.from_pretrained(args.model)
    pairs = read_pairs(args.pairs).select_folds([args.fold])
    wild = Path(args.wild)
    wild_aligned = Path(str(wild) + "_aligned")
    spec = model.alignment or {"size": 112, "margin": 0.0}
    rc = cli_main(
        [
            "align",
            str(wild),
            str(wild_aligned),
            "--select",
            "largest",
            "--no-face",
            "center_crop",
            "--size",
            str(spec["size"]),
            "--margin",
            str(spec["margin"]),
            "--quiet",
        ]
    )
    if rc != 0:
        raise SystemExit(f"facenet-hf align failed on {wild} (exit {rc})")
    statuses: dict[str, int] = {}
    for r in read_manifest(wild_aligned / "manifest.csv"):
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    results = {"model": str(args.model), "fold": args.fold, "wild_alignment_statuses": statuses}
    for name, root in (
        ("original_crops_aligned", args.aligned),
        ("wild_detect_align", wild_aligned),
        ("wild_no_alignment", wild),
    ):
        report, distances = evaluate_lfw(
            model,
            root,
            pairs,
            flip=model.threshold_flip,
            num_workers=1,
            progress=False,
            squared=model.distance == "squared_euclidean",
            check_alignment=name != "wild_no_alignment",  # that one is unaligned on purpose
        )
        stored = (
            None
            if model.threshold is None
            else float(np.mean((distances <= model.threshold) == pairs.is_same))
        )
        j = report_to_json(report)
        results[name] = {
            "accuracy_cv": j["accuracy_mean"],
            "accuracy_cv_std": j["accuracy_std"],
            "accuracy_stored_threshold": stored,
            "auc": j["auc"],
            "tar_at_far": j["tar_at_far"],
            "protocol": j["protocol"],
        }
        at_stored = "no stored threshold" if stored is None else f"{100 * stored:.2f}% (stored threshold)"
        print(f"{name}: accuracy {100 * j['accuracy_mean']:.2f}% (CV), {at_stored}, AUC {j['auc']:.4f}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--lfw-dir", required=True)
    b.add_argument("--pairs", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--fold", type=int, default=10)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--second-face", type=float, default=0.3, help="share of photos with a second face")
    s = sub.add_parser("score")
    s.add_argument("--model", required=True)
    s.add_argument("--pairs", required=True)
    s.add_argument("--aligned", required=True, help="the aligned copy of LFW (facenet-hf align)")
    s.add_argument("--wild", required=True, help="the folder `build` wrote")
    s.add_argument("--fold", type=int, default=10)
    s.add_argument("--out", default=None)
    args = p.parse_args(argv)
    return build(args) if args.cmd == "build" else score(args)


if __name__ == "__main__":
    sys.exit(main())

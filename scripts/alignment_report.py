"""From a `facenet-hf align` manifest: how often the face is found, whether it is the central (named) one, and
how close the warped landmarks land to the template (the similarity fit's residual, px in the crop).

    python scripts/alignment_report.py /data/lfw-aligned112/lfw-deepfunneled/manifest.csv --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from facenet_hf.faces import LANDMARK_NAMES, AlignmentSpec, transform_points, umeyama
from facenet_hf.faces.tree import read_manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("manifest")
    p.add_argument("--image-size", type=int, default=250, help="source image side (LFW: 250)")
    p.add_argument("--central-radius", type=float, default=25.0, help="px from the image centre")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    rows = read_manifest(args.manifest)
    spec = AlignmentSpec(**json.loads((Path(args.manifest).parent / "alignment.json").read_text())["spec"])
    template = spec.landmarks_template()
    first = {}
    for r in rows:
        first.setdefault(r["src"], r)
    statuses = Counter(r["status"] for r in first.values())
    found = [r for r in first.values() if r["status"] in ("ok", "several_faces")]
    pts = np.array([[[float(r[f"{n}_{a}"]) for a in "xy"] for n in LANDMARK_NAMES] for r in found])
    boxes = np.array([[float(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in found])
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    off = np.linalg.norm(centre - args.image_size / 2, axis=1)
    residual = np.empty((len(found), 5))
    for i, lm in enumerate(pts):
        residual[i] = np.linalg.norm(transform_points(umeyama(lm, template), lm) - template, axis=1)
    groups = {"eyes": [0, 1], "nose": [2], "mouth": [3, 4], "all": [0, 1, 2, 3, 4]}
    report = {
        "manifest": str(args.manifest),
        "spec": spec.to_dict(),
        "images": len(first),
        "statuses": dict(statuses),
        "face_found_share": len(found) / len(first),
        "several_faces_share": statuses.get("several_faces", 0) / len(first),
        "chosen_face_central_share": float(np.mean(off <= args.central_radius)) * len(found) / len(first),
        "central_radius_px": args.central_radius,
        "median_landmarks_source_px": np.median(pts, axis=0).round(2).tolist(),
        "residual_px": {
            g: {
                "median": float(np.median(residual[:, idx])),
                "p95": float(np.percentile(residual[:, idx], 95)),
                "max": float(residual[:, idx].max()),
            }
            for g, idx in groups.items()
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

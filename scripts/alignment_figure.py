"""docs/img/alignment_grid.png: raw photos with the detected boxes and five landmarks drawn, beside the aligned
crops (the chosen face); and docs/img/alignment_failures.png: images without a face found.

    python scripts/alignment_figure.py --photos /data/wild/lfw-deepfunneled --failures A.jpg B.jpg --out docs/img
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from facenet_hf.faces import AlignmentSpec, FaceAligner, build_detector

H = 200  # row height, px
COLOURS = ["red", "lime", "yellow", "cyan", "magenta"]


def _annotated(img: Image.Image, result) -> Image.Image:
    out = img.convert("RGB")
    draw = ImageDraw.Draw(out)
    r = max(2, round(min(out.size) / 150))
    for face in result.faces:
        chosen = any(face is c for c in result.chosen)
        draw.rectangle(face.box, outline="white" if chosen else "grey", width=max(1, r // 2 + 1))
        for (x, y), colour in zip(face.landmarks, COLOURS, strict=True):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", required=True, help="a folder of photos (e.g. the wild LFW test)")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--failures", nargs="*", default=[])
    p.add_argument("--out", default="docs/img")
    args = p.parse_args(argv)
    files = sorted(Path(args.photos).rglob("*.jpg"))[
        :: max(1, len(list(Path(args.photos).rglob("*.jpg"))) // args.n)
    ]
    files = files[: args.n]
    aligner = FaceAligner(build_detector("mtcnn", device="cpu", min_score=0.9), AlignmentSpec(size=112))
    images = [Image.open(f).convert("RGB") for f in files]
    results = aligner.align(images)
    tiles = []
    for img, res in zip(images, results, strict=True):
        shown = _annotated(img, res)
        shown = shown.resize((round(shown.width * H / shown.height), H))
        crop = res.crops[0].resize((H, H)) if res.crops else Image.new("RGB", (H, H), "black")
        tile = Image.new("RGB", (shown.width + H + 8, H), "white")
        tile.paste(shown, (0, 0))
        tile.paste(crop, (shown.width + 8, 0))
        tiles.append(tile)
    cols = 2
    width = max(t.width for t in tiles)
    grid = Image.new("RGB", (cols * (width + 12), ((len(tiles) + cols - 1) // cols) * (H + 12)), "white")
    for i, t in enumerate(tiles):
        grid.paste(t, ((i % cols) * (width + 12), (i // cols) * (H + 12)))
    out = Path(args.out)
    grid.save(out / "alignment_grid.png")
    if args.failures:
        imgs = [Image.open(f).convert("RGB") for f in args.failures]
        res = aligner.align(imgs)
        strip = Image.new("RGB", (len(imgs) * (250 + 12), 250), "white")
        for i, (img, r) in enumerate(zip(imgs, res, strict=True)):
            strip.paste(_annotated(img, r).resize((250, 250)), (i * 262, 0))
            print(f"{args.failures[i]}: {r.status}: {r.reason}")
        strip.save(out / "alignment_failures.png")
    print(f"wrote {out / 'alignment_grid.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Cut the bundled LFW sample (``data/lfw_sample``) from the full deep-funneled LFW, deterministically.

    python scripts/make_lfw_sample.py --lfw-dir /path/to/lfw --out data/lfw_sample --overwrite

``--lfw-dir`` holds ``pairs.txt`` (official View 2) and ``lfw-deepfunneled/``. The sample keeps LFW's layout,
file names and JPEG bytes (files are copied, never re-encoded):

- ``pairs.txt`` in the official format with header ``10 N``: from each official fold, N matched and N mismatched
  pairs drawn at random (official order kept), so the sample's folds stay disjoint in people;
- ``lfw-deepfunneled/<Name>/<Name>_NNNN.jpg``: every image those pairs use, plus a few images each of extra
  training people who are in none of the sample's pairs and not in the held-out official fold (people in no
  official pair first), so a model trained on the people outside fold 10 has something to learn from;
- ``README.md`` describing the above.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from facenet_hf.data.lfw import LFWPairs, read_pairs  # noqa: E402


def _select_pairs(pairs: LFWPairs, per_fold: int, rng: np.random.Generator) -> np.ndarray:
    """Indices into ``pairs``: per fold ``per_fold`` matched then ``per_fold`` mismatched, in official order."""
    chosen = []
    for fold in pairs.folds:
        for same in (True, False):
            idx = np.flatnonzero((pairs.fold == fold) & (pairs.is_same == same))
            if idx.size < per_fold:
                raise ValueError(
                    f"fold {fold} has only {idx.size} {'matched' if same else 'mismatched'} pairs"
                )
            chosen.append(np.sort(rng.choice(idx, size=per_fold, replace=False)))
    return np.concatenate(chosen)


def _pairs_text(pairs: LFWPairs, sel: np.ndarray, per_fold: int) -> str:
    lines = [f"{len(pairs.folds)}\t{per_fold}"]
    for i in sel.tolist():
        a, b, ia, ib = pairs.name1[i], pairs.name2[i], pairs.idx1[i], pairs.idx2[i]
        lines.append(f"{a}\t{ia}\t{ib}" if pairs.is_same[i] else f"{a}\t{ia}\t{b}\t{ib}")
    return "\n".join(lines) + "\n"


def _images_of(image_root: Path) -> dict[str, list[str]]:
    return {
        d.name: sorted(f.name for f in d.iterdir() if f.suffix == ".jpg")
        for d in sorted(image_root.iterdir())
        if d.is_dir()
    }


def _pick_extras(
    pairs: LFWPairs,
    used_people: set[str],
    files: dict[str, list[str]],
    *,
    n_people: int,
    n_images: int,
    min_images: int,
    holdout_fold: int,
    rng: np.random.Generator,
) -> dict[str, list[str]]:
    """People (>= min_images images) in no sample pair and not in ``holdout_fold``; no-pair people first."""
    in_pairs = pairs.people()
    held = pairs.people(holdout_fold)
    ok = [n for n, fs in files.items() if len(fs) >= min_images and n not in used_people and n not in held]
    first = [n for n in ok if n not in in_pairs]
    rest = [n for n in ok if n in in_pairs]
    people = first[:n_people]
    if len(people) < n_people:
        extra = rng.choice(len(rest), size=min(n_people - len(people), len(rest)), replace=False)
        people += [rest[i] for i in sorted(extra.tolist())]
    out = {}
    for name in sorted(people):
        fs = files[name]
        take = rng.choice(len(fs), size=min(n_images, len(fs)), replace=False)
        out[name] = [fs[i] for i in sorted(take.tolist())]
    return out


README = """# Bundled LFW sample

A small cut of LFW (Labeled Faces in the Wild, deep-funneled) for tests, the demo and CI, with the exact layout
of the full set: `lfw-deepfunneled/<Name>/<Name>_NNNN.jpg` (original file names and original JPEG bytes, copied,
not re-encoded; 250x250 RGB) and `pairs.txt` in the official View 2 format.

## Contents

- `pairs.txt`: header `{n_folds} {per_fold}` (tab-separated): {n_folds} folds x ({per_fold} matched + {per_fold} mismatched) =
  {n_pairs} pairs, drawn at random (seed {seed}) from the same folds of the official View 2 `pairs.txt` and kept
  in official order, so the sample's folds are disjoint in people like the official ones.
- `lfw-deepfunneled/`: {n_images} images of {n_people} people:
  - {n_pair_images} images of the {n_pair_people} people in the sample's pairs (only the images the pairs use);
  - {n_extra_images} images of {n_extra_people} extra training people who appear in no pair of the sample and
    are not in official fold {holdout} (the {n_first} people of LFW who appear in no official pair and have 4+
    images come first; the rest are people of official folds other than {holdout} with {min_images}+ images),
    up to {extra_images} images each.
- Training on the people outside fold {holdout} (`identity_disjoint_split(ds, pairs, {holdout})`) leaves
  {n_train_people} people, {n_train_multi} of them with 2+ images ({n_train_images} images between those); fold {holdout} has
  {n_holdout_pairs} pairs.

## How it was made

    python scripts/make_lfw_sample.py --lfw-dir /path/to/lfw --out data/lfw_sample --overwrite

with `/path/to/lfw` holding the official `pairs.txt` and the extracted `lfw-deepfunneled.tgz`. The script is
deterministic (numpy `default_rng({seed})`); options: `--per-fold`, `--extra-people`, `--extra-images`,
`--seed`. Its test (`tests/test_lfw.py`, run when `FACENET_HF_LFW_DIR` points at the full LFW) checks that it
reproduces this folder byte for byte.

## Licence and citation

LFW is released for research use by the University of Massachusetts, Amherst
(http://vis-www.cs.umass.edu/lfw/). The images are news photographs of public figures collected from the web.
If you use LFW, cite:

    Gary B. Huang, Manu Ramesh, Tamara Berg, and Erik Learned-Miller.
    Labeled Faces in the Wild: A Database for Studying Face Recognition in Unconstrained Environments.
    University of Massachusetts, Amherst, Technical Report 07-49, October 2007.

Deep funneling: Gary B. Huang, Marwan Mattar, Honglak Lee, and Erik Learned-Miller. Learning to Align from
Scratch. Advances in Neural Information Processing Systems (NIPS), 2012.

The numbers this sample gives are for smoke tests only: {n_pairs} pairs say nothing about a model's LFW accuracy.
"""


def make_sample(
    lfw_dir: Path,
    out: Path,
    *,
    per_fold: int = 6,
    extra_people: int = 32,
    extra_images: int = 5,
    min_images: int = 4,
    holdout: int = 10,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write the sample into ``out``; returns its counts."""
    image_root = lfw_dir / "lfw-deepfunneled"
    if not image_root.is_dir() or not (lfw_dir / "pairs.txt").is_file():
        raise FileNotFoundError(f"{lfw_dir} must hold pairs.txt and lfw-deepfunneled/ (the full LFW)")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; pass --overwrite to replace the sample")
        for name in ("lfw-deepfunneled", "pairs.txt", "README.md"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    rng = np.random.default_rng(seed)
    pairs = read_pairs(lfw_dir / "pairs.txt")
    sel = _select_pairs(pairs, per_fold, rng)
    text = _pairs_text(pairs, sel, per_fold)
    sample_pairs = LFWPairs(
        pairs.name1[sel],
        pairs.idx1[sel],
        pairs.name2[sel],
        pairs.idx2[sel],
        pairs.is_same[sel],
        pairs.fold[sel],
    )
    p1, p2 = sample_pairs.paths()
    pair_images = sorted(set(p1) | set(p2))
    files = _images_of(image_root)
    extras = _pick_extras(
        pairs,
        sample_pairs.people(),
        files,
        n_people=extra_people,
        n_images=extra_images,
        min_images=min_images,
        holdout_fold=holdout,
        rng=rng,
    )
    extra_images_rel = [f"{n}/{f}" for n, fs in extras.items() for f in fs]
    all_images = sorted(set(pair_images) | set(extra_images_rel))

    out.mkdir(parents=True, exist_ok=True)
    for rel in all_images:
        dst = out / "lfw-deepfunneled" / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(image_root / rel, dst)
    (out / "pairs.txt").write_text(text)

    check = read_pairs(out / "pairs.txt")
    held = check.people(holdout)
    per_person: dict[str, int] = {}
    for rel in all_images:
        per_person[rel.split("/")[0]] = per_person.get(rel.split("/")[0], 0) + 1
    train = {n: c for n, c in per_person.items() if n not in held}
    counts = {
        "n_folds": len(check.folds),
        "per_fold": per_fold,
        "n_pairs": len(check),
        "n_images": len(all_images),
        "n_people": len(per_person),
        "n_pair_images": len(pair_images),
        "n_pair_people": len(sample_pairs.people()),
        "n_extra_images": len(extra_images_rel),
        "n_extra_people": len(extras),
        "n_first": len([n for n in extras if n not in pairs.people()]),
        "n_train_people": len(train),
        "n_train_multi": sum(c >= 2 for c in train.values()),
        "n_train_images": sum(c for c in train.values() if c >= 2),
        "n_holdout_pairs": len(check.select_folds(holdout)),
        "holdout": holdout,
        "min_images": min_images,
        "extra_images": extra_images,
        "seed": seed,
    }
    (out / "README.md").write_text(README.format(**counts))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--lfw-dir", required=True, type=Path, help="folder with pairs.txt and lfw-deepfunneled/"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "lfw_sample", help="output folder")
    parser.add_argument("--per-fold", type=int, default=6, help="matched (and mismatched) pairs per fold")
    parser.add_argument("--extra-people", type=int, default=32, help="extra training people in no pair")
    parser.add_argument(
        "--extra-images", type=int, default=5, help="at most this many images per extra person"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing sample in --out")
    args = parser.parse_args(argv)
    counts = make_sample(
        args.lfw_dir,
        args.out,
        per_fold=args.per_fold,
        extra_people=args.extra_people,
        extra_images=args.extra_images,
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(
        f"wrote {args.out}: {counts['n_pairs']} pairs in {counts['n_folds']} folds, {counts['n_images']} images "
        f"of {counts['n_people']} people ({counts['n_extra_people']} extra training people)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

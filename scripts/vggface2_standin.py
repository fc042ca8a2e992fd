"""The VGGFace2 path end to end on a stand-in built from real faces (docs/scaling.md): CelebA's people and LFW's
people renamed into VGGFace2's layout (``n000001/0001_01.jpg``), LFW's fold-K people listed in an overlap file
(as VGGFace2's LFW people must be), then the preset's commands, each timed:

1. ``facenet-hf align TREE ALIGNED --shard i/2`` as two concurrent processes (two "machines");
2. ``facenet-hf pack ALIGNED SHARDS --shard i/2`` as two concurrent processes;
3. ``accelerate launch --multi_gpu --num_processes 2`` (gloo, CPU) of ``recipes/train_r18_lfw.py`` with
   ``configs/vggface2/r50_vggface2_112_g8.yaml`` scaled down (ResNet-18, P x K per process, steps), the overlap file
   as ``data.exclude_identities_file``, global semi-hard mining;
4. LFW fold K's pairs, aligned the same way, scored by the trained model (nobody of fold K was trained on: the
   renamed names cannot say so, the overlap file does).

    python scripts/vggface2_standin.py --celeba ../shared/data/celeba10k --lfw-dir ../shared/data/lfw/lfw-deepfunneled \
        --pairs ../shared/data/lfw/pairs.txt --out runs/vggface2_standin --fold 10 --max-steps 600

Writes OUT/standin_report.json (counts, the time of every stage, the training's images/s, the LFW report).
Rerunning resumes: align and pack resume from their manifests, training from its last checkpoint.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from facenet_hf.data.lfw import read_pairs  # noqa: E402


def build_tree(
    celeba: Path,
    lfw_dir: Path,
    out: Path,
    *,
    min_images: int,
    celeba_people: int | None,
    lfw_people: int | None,
    keep_lfw: set[str],
    seed: int,
):
    """Copy CelebA's and LFW's people with ``min_images``+ images into ``out/n000001/0001_01.jpg`` (a seeded
    shuffle of the people decides the numbers): the first ``celeba_people`` CelebA ids, the LFW people in
    ``keep_lfw`` and the first ``lfw_people`` others (None: all); returns {new id: (source, original name)}."""
    people: dict[tuple[str, str], list[Path]] = {}
    by_id: dict[str, list[str]] = defaultdict(list)
    for line in (celeba / "identity_CelebA.txt").read_text().splitlines():  # CelebA's `000001.jpg 2880`
        if line.strip():
            name, identity = line.split()
            by_id[identity].append(name)
    celeba_ids = sorted((i for i, f in by_id.items() if len(f) >= min_images), key=int)
    if celeba_people is not None:
        celeba_ids = celeba_ids[:celeba_people]
    for i in celeba_ids:
        people[("celeba", i)] = [celeba / "img_align_celeba" / f for f in sorted(by_id[i])]
    others = 0
    for d in sorted(p for p in lfw_dir.iterdir() if p.is_dir()):
        files = sorted(d.glob("*.jpg"))
        if len(files) < min_images:
            continue
        if d.name not in keep_lfw:
            if lfw_people is not None and others >= lfw_people:
                continue
            others += 1
        people[("lfw", d.name)] = files
    keys = sorted(people)
    random.Random(seed).shuffle(keys)
    mapping = {}
    for n, key in enumerate(keys, start=1):
        new = f"n{n:06d}"
        mapping[new] = key
        (out / new).mkdir(parents=True, exist_ok=True)
        for j, src in enumerate(people[key], start=1):
            dst = out / new / f"{j:04d}_01.jpg"
            if not dst.exists():
                shutil.copyfile(src, dst)
    return mapping


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bin(name: str) -> str:
    return str(Path(sys.executable).parent / name)


def _parallel(cmds: list[list[str]], env: dict[str, str], log: Path) -> float:
    """Run the commands at once; their time (s); raise naming the log on a failure."""
    t0 = time.perf_counter()
    with log.open("a") as fh:
        procs = [subprocess.Popen(c, stdout=fh, stderr=subprocess.STDOUT, env=env) for c in cmds]
        codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"{cmds[codes.index(next(c for c in codes if c))]} failed; see {log}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--celeba", type=Path, required=True, help="folder with img_align_celeba/ and identity_CelebA.txt"
    )
    ap.add_argument("--lfw-dir", type=Path, required=True, help="LFW's image folder (lfw-deepfunneled)")
    ap.add_argument("--pairs", type=Path, required=True, help="LFW's pairs.txt")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--fold", type=int, default=10, help="the LFW fold scored (its people are excluded)")
    ap.add_argument("--min-images", type=int, default=2, help="people with fewer images are not copied")
    ap.add_argument("--celeba-people", type=int, default=None, help="at most this many CelebA people")
    ap.add_argument(
        "--lfw-people", type=int, default=None, help="at most this many LFW people besides fold K's"
    )
    ap.add_argument("--max-steps", type=int, default=600)
    ap.add_argument("--p", type=int, default=8, help="identities per process and step")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "standin.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    report: dict = {"command": " ".join(sys.argv), "fold": args.fold, "times_s": {}}

    # 0. the VGGFace2-layout tree, its identity map and the overlap file (fold K's LFW people, renamed)
    t0 = time.perf_counter()
    tree = out / "vggface2" / "train"
    pairs = read_pairs(args.pairs).select_folds([args.fold])
    paths = sorted(set(pairs.paths()[0]) | set(pairs.paths()[1]))
    fold_people = {p.split("/")[0] for p in paths}
    mapping = build_tree(
        args.celeba,
        args.lfw_dir,
        tree,
        min_images=args.min_images,
        celeba_people=args.celeba_people,
        lfw_people=args.lfw_people,
        keep_lfw=fold_people,
        seed=args.seed,
    )
    with (out / "vggface2" / "identities.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["identity", "source", "original"])
        w.writerows([new, *key] for new, key in sorted(mapping.items()))
    overlap = sorted(new for new, (src, name) in mapping.items() if src == "lfw" and name in fold_people)
    (out / "lfw_overlap.txt").write_text(
        f"# LFW fold {args.fold}'s people in the stand-in tree (renamed: only this list can drop them)\n"
        + "".join(f"{x}\n" for x in overlap)
    )
    # fold K's pair images, for alignment like the training faces
    eval_src = out / f"lfw_fold{args.fold}"
    for p in paths:
        (eval_src / p).parent.mkdir(parents=True, exist_ok=True)
        if not (eval_src / p).exists():
            shutil.copyfile(args.lfw_dir / p, eval_src / p)
    report["times_s"]["build_tree"] = time.perf_counter() - t0
    n_files = sum(1 for _ in tree.rglob("*.jpg"))
    report["tree"] = {
        "identities": len(mapping),
        "celeba_identities": sum(1 for s, _ in mapping.values() if s == "celeba"),
        "lfw_identities": sum(1 for s, _ in mapping.values() if s == "lfw"),
        "images": n_files,
        "overlap_listed": len(overlap),
        "eval_pairs": len(pairs),
        "eval_images": len(paths),
    }

    # 1. align in two shards at once (two machines), then fold K's pair images
    aligned = out / "vggface2-112" / "train"
    align = [
        _bin("facenet-hf"),
        "align",
        "--select",
        "central",
        "--no-face",
        "center_crop",
        "--quiet",
        "--json",
    ]
    report["times_s"]["align_train"] = _parallel(
        [[*align, str(tree), str(aligned), "--shard", f"{i}/2", "--num-workers", "0"] for i in (0, 1)],
        env,
        log,
    )
    eval_dir = out / f"lfw_fold{args.fold}-112"
    eval_align = [*align, "--center-crop-fraction", "0.45", str(eval_src), str(eval_dir)]
    report["times_s"]["align_eval"] = _parallel(
        [[*eval_align, "--shard", f"{i}/2"] for i in (0, 1)], env, log
    )
    statuses: dict[str, int] = defaultdict(int)
    for m in aligned.glob("manifest*.csv"):
        with m.open() as fh:
            for row in csv.DictReader(fh):
                statuses[row["status"]] += 1
    report["align_status"] = dict(statuses)

    # 2. parquet shards, two writers
    shards = out / "vggface2-112-parquet" / "train"
    pack = [_bin("facenet-hf"), "pack", str(aligned), str(shards), "--rows-per-shard", "1000"]
    report["times_s"]["pack"] = _parallel([[*pack, "--shard", f"{i}/2"] for i in (0, 1)], env, log)

    # 3. two processes (gloo), the 8-GPU preset's code path scaled down
    run = out / "run"
    cmd = [
        _bin("accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "bf16", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        str(ROOT / "recipes" / "train_r18_lfw.py"),
        "--config", str(ROOT / "configs" / "vggface2" / "r50_vggface2_112_g8.yaml"),
        f"--data.train_source={shards}",
        f"--data.exclude_identities_file={out / 'lfw_overlap.txt'}",
        f"--data.lfw_dir={eval_dir}",
        f"--data.pairs={args.pairs}",
        f"--data.holdout_folds=[{args.fold}]",
        f"--model.backbone={args.backbone}",
        f"--data.p={args.p}", f"--data.k={args.k}",
        "--data.num_workers=1", "--data.worker_nice=19",
        "--train.lr=1e-3", "--train.warmup_steps=50", f"--train.max_steps={args.max_steps}", "--train.epochs=1000",
        "--train.eval_every_epochs=0", "--train.eval_batch_size=128", "--train.checkpoint_every_steps=200",
        f"--output_dir={run}", "--quiet",
    ]  # fmt: skip
    if not (run / "eval" / "lfw_report.json").is_file():  # else done: a rerun only rewrites the report
        if (run / "config.yaml").is_file():
            cmd.append("--resume=latest")  # an interrupted run continues from its last checkpoint
        report["times_s"]["train_and_score"] = _parallel([cmd], env, log)
    lfw = json.loads((run / "eval" / "lfw_report.json").read_text())
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in logged if "elapsed" in x][-1]  # the final evaluation's line: all steps done
    images = 2 * args.p * args.k * last["step"]
    report["train"] = {
        "processes": 2,
        "global_batch": 2 * args.p * args.k,
        "steps": last["step"],
        "images": images,
        "train_s": last["elapsed"],
        "images_per_second": images / max(last["elapsed"], 1e-9),
    }
    report["lfw"] = {
        k: lfw[k] for k in ("accuracy_mean", "accuracy_std", "auc", "n_pairs", "folds") if k in lfw
    }
    report["lfw"].update({k: v for k, v in lfw.items() if k.startswith(("tar", "eer"))})
    (out / "standin_report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One markdown row per training run (the lever tables of docs/results.md): the run's config differences from a
base config, fold, accuracy +- s.e., AUC, TAR@FAR=1e-3, EER, steps, images, training time and images/s.

    python scripts/lever_table.py runs/levers/*/fold_* --base configs/lfw/r18_lfw_112_cpu5m.yaml \
        --json docs/results/levers_cpu5m.json

A run folder holds ``config.yaml``, ``metrics.jsonl`` and ``eval/lfw_report.json`` (what ``train`` writes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


IGNORED = {"output_dir", "data.lfw_dir", "data.pairs", "data.holdout_folds"}


def run_row(run: Path, base: dict) -> dict:
    """The figures of one run folder, and its config keys that differ from ``base``."""
    cfg = _flat(yaml.safe_load((run / "config.yaml").read_text()))
    report = json.loads((run / "eval" / "lfw_report.json").read_text())
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    last = [x for x in steps if "elapsed" in x][-1]  # the final evaluation's line: every step done
    p, k = cfg["data.p"], cfg["data.k"]
    diff = {key: cfg[key] for key in sorted(cfg) if key not in IGNORED and base.get(key) != cfg[key]}
    return {
        "run": str(run),
        "changes": diff,
        "fold": cfg["data.holdout_folds"],
        "accuracy": report["accuracy_mean"],
        "stderr": report["accuracy_stderr"],
        "auc": report["auc"],
        "tar_at_far_1e-3": report["tar_at_far"],
        "eer": report["eer"],
        "steps": last["step"],
        "images": last["step"] * p * k,
        "train_s": last["elapsed"],
        "images_per_second": last["step"] * p * k / max(last["elapsed"], 1e-9),
    }


def markdown(rows: list[dict]) -> str:
    head = (
        "| change | fold | accuracy (+- s.e.) | AUC | TAR@FAR=1e-3 | EER | steps (images) | training time |\n"
    )
    head += "|---|---|---|---|---|---|---|---|\n"
    body = ""
    for r in rows:
        change = ", ".join(f"`{k}: {v}`" for k, v in r["changes"].items()) or "(the preset)"
        body += (
            f"| {change} | {','.join(map(str, r['fold']))} | {100 * r['accuracy']:.2f} +- {100 * r['stderr']:.2f}% "
            f"| {r['auc']:.4f} | {100 * r['tar_at_far_1e-3']:.1f}% | {100 * r['eer']:.1f}% "
            f"| {r['steps']:,} ({r['images']:,}) | {r['train_s'] / 60:.1f} min at {r['images_per_second']:.0f} img/s |\n"
        )
    return head + body


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="run folders (config.yaml, metrics.jsonl, eval/)")
    ap.add_argument("--base", type=Path, required=True, help="the config the changes are relative to")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from dataclasses import asdict

    from facenet_hf.config import load_config

    base = _flat(asdict(load_config(args.base, ["data.lfw_dir=/x", "data.pairs=/x"])))
    rows = [run_row(r, base) for r in args.runs if (r / "eval" / "lfw_report.json").is_file()]
    print(markdown(rows), end="")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

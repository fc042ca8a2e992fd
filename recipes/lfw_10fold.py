"""LFW's full View-2 protocol without outside data: for each fold k, train on the people outside fold k and score
fold k's pairs; report mean accuracy +- standard error over the folds (10 trainings).

    python recipes/lfw_10fold.py --config configs/lfw/r18_lfw_112_cpu5m.yaml \
        --data.lfw_dir /data/lfw/lfw-deepfunneled --data.pairs /data/lfw/pairs.txt [--folds 1 2 3]

Each fold's run is written to ``<output_dir>/fold_<k>``; the summary to ``<output_dir>/protocol.json`` and
``protocol.md``, the per-fold bars to ``protocol.png``. Runs already finished (``fold_<k>/eval/lfw_report.json``
present) are reused, so an interrupted protocol continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

from facenet_hf.cli.common import setup_logging
from facenet_hf.cli.train import parse_train_config, train_parser

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "lfw" / "r18_lfw_112_cpu5m.yaml"


def summarize(fold_reports: dict[int, dict]) -> dict:
    """Mean, standard deviation and standard error (ddof=1 / sqrt(n), as LFW asks) of the per-fold accuracies."""
    folds = sorted(fold_reports)
    acc = np.array([fold_reports[k]["accuracy_mean"] for k in folds])
    auc = np.array([fold_reports[k]["auc"] for k in folds])
    n = len(acc)
    return {
        "protocol": "LFW View 2, unrestricted, no outside data: fold k scored by a model trained on the people "
        "outside fold k; threshold by 10-fold cross-validation within fold k",
        "folds": folds,
        "fold_accuracy": acc.tolist(),
        "fold_auc": auc.tolist(),
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std(ddof=1)) if n > 1 else 0.0,
        "accuracy_stderr": float(acc.std(ddof=1) / np.sqrt(n)) if n > 1 else 0.0,
        "auc_mean": float(auc.mean()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = train_parser(prog="lfw_10fold.py", default_config=DEFAULT_CONFIG)
    parser.add_argument(
        "--folds", type=int, nargs="+", default=list(range(1, 11)), help="folds to run (1-10)"
    )
    cfg, args = parse_train_config(argv, parser)
    bad = [k for k in args.folds if not 1 <= k <= 10]
    if bad:
        parser.error(f"--folds: {bad} are not LFW folds (1-10)")
    from facenet_hf.evaluation.plots import plot_fold_accuracies
    from facenet_hf.training import train

    setup_logging()
    root = Path(cfg.output_dir)
    reports: dict[int, dict] = {}
    for k in args.folds:
        fold_cfg = dataclasses.replace(
            cfg, data=dataclasses.replace(cfg.data, holdout_folds=[k]), output_dir=str(root / f"fold_{k}")
        )
        done = Path(fold_cfg.output_dir) / "eval" / "lfw_report.json"
        if not done.is_file():
            train(fold_cfg, progress=not args.quiet)
        reports[k] = json.loads(done.read_text())
        r = reports[k]
        print(f"fold {k}: accuracy {100 * r['accuracy_mean']:.2f}%, AUC {r['auc']:.4f}", flush=True)
    summary = summarize(reports)
    root.mkdir(parents=True, exist_ok=True)
    (root / "protocol.json").write_text(json.dumps(summary, indent=2))
    rows = "\n".join(
        f"| {k} | {100 * a:.2f} | {u:.4f} |"
        for k, a, u in zip(summary["folds"], summary["fold_accuracy"], summary["fold_auc"], strict=True)
    )
    (root / "protocol.md").write_text(
        f"{summary['protocol']}\n\n| fold | accuracy (%) | AUC |\n|---|---|---|\n{rows}\n\n"
        f"mean accuracy {100 * summary['accuracy_mean']:.2f} +- {100 * summary['accuracy_stderr']:.2f} "
        f"(standard error over {len(summary['folds'])} folds)\n"
    )
    plot_fold_accuracies(
        summary["folds"],
        summary["fold_accuracy"],
        root / "protocol.png",
        stds=[reports[k]["accuracy_std"] for k in summary["folds"]],
        title=f"LFW {len(summary['folds'])}-fold protocol, no outside data ({cfg.model.backbone}, "
        f"{cfg.model.image_size} px)",
    )
    print(
        f"LFW {len(summary['folds'])}-fold: accuracy {100 * summary['accuracy_mean']:.2f} "
        f"+- {100 * summary['accuracy_stderr']:.2f}% (standard error); written to {root / 'protocol.md'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

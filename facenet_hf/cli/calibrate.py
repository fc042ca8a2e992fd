"""``facenet-hf calibrate``: fit a model's verification threshold and calibrated score on labelled pairs, and
store them in its ``config.json`` with a record of the data they were fitted on (``evaluate`` only reads)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import date
from pathlib import Path

from facenet_hf.cli.common import load_model_or_error, progress_enabled, setup_logging
from facenet_hf.constants import FLIP_MODES

__all__ = ["main"]

EPILOG = """example:
  facenet-hf calibrate runs/r18/model --lfw-dir lfw/lfw-deepfunneled --pairs lfw/pairs.txt \\
      --folds 1 2 3 4 5 6 7 8 9 --check-folds 10

Fits, on the pairs of --folds (default: all), the best-accuracy threshold and P(same | distance) (logistic by
default, or isotonic), tabulates the threshold at false-accept rates, and writes them to MODEL/config.json
(or to a copy of the model in --save-to). --check-folds scores pairs NOT used to fit: Brier score, expected
calibration error and a reliability plot in --out. Pairs files use LFW's pairs.txt format, so any dataset of
matched/mismatched pairs can be used; the record in config.json says which one it was."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facenet-hf calibrate",
        description="Fit and store a model's verification threshold and calibrated same-person probability.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="model folder (or Hub repo id with --save-to)")
    parser.add_argument("--lfw-dir", required=True, help="folder of Name/Name_NNNN.jpg images")
    parser.add_argument("--pairs", required=True, help="pairs file in LFW's pairs.txt format")
    parser.add_argument("--folds", type=int, nargs="*", help="fit on these folds (default: all)")
    parser.add_argument(
        "--check-folds", type=int, nargs="*", default=[], help="held-out folds to check it on"
    )
    parser.add_argument("--method", choices=("logistic", "isotonic"), default="logistic")
    parser.add_argument("--flip", choices=FLIP_MODES, default="sum", help="flip TTA the threshold is for")
    parser.add_argument(
        "--dataset-name", default=None, help="name recorded in fitted_on (default: the folder)"
    )
    parser.add_argument("--save-to", default=None, help="write the calibrated model here, not into MODEL")
    parser.add_argument("--out", default=None, help="folder for calibration.json and the reliability plot")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=2, help="image decoding worker processes")
    parser.add_argument("--revision", default=None, help="Hub revision of MODEL")
    parser.add_argument(
        "--skip-alignment-check", action="store_true", help="see `facenet-hf evaluate --help`"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    overlap = sorted(set(args.folds or []) & set(args.check_folds))
    if overlap:
        parser.error(f"--check-folds {overlap} are also --folds: check on pairs not used to fit")
    target = Path(args.save_to) if args.save_to else Path(args.model)
    if not args.save_to and not Path(args.model).is_dir():
        parser.error(f"{args.model} is not a local folder: give --save-to DIR to write a calibrated copy")
    setup_logging()

    from facenet_hf.apps.calibration import brier_score, fit_calibration, reliability_curve
    from facenet_hf.data.lfw import read_pairs
    from facenet_hf.evaluation.lfw_eval import evaluate_lfw
    from facenet_hf.evaluation.verification import best_threshold
    from facenet_hf.fileio import atomic_write_text

    model = load_model_or_error("calibrate", args.model, revision=args.revision)
    if model is None:
        return 1
    try:
        all_pairs = read_pairs(args.pairs)
        # without --folds: every fold but the check folds (never fit on the pairs it is checked on)
        fit_folds = args.folds or [f for f in all_pairs.folds if f not in set(args.check_folds)]
        fit_pairs = all_pairs.select_folds(fit_folds) if fit_folds != all_pairs.folds else all_pairs
        check_pairs = all_pairs.select_folds(args.check_folds) if args.check_folds else None
    except (FileNotFoundError, ValueError) as e:
        print(f"facenet-hf calibrate: {e}", file=sys.stderr)
        return 1

    def distances(pairs):
        _, d = evaluate_lfw(
            model,
            args.lfw_dir,
            pairs,
            flip=args.flip,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            squared=model.distance == "squared_euclidean",
            check_alignment=not args.skip_alignment_check,
            progress=progress_enabled(),
        )
        return d

    try:
        d_fit = distances(fit_pairs)
        d_check = distances(check_pairs) if check_pairs is not None else None
    except (FileNotFoundError, ValueError) as e:
        print(f"facenet-hf calibrate: {e}", file=sys.stderr)
        return 1
    folds = sorted({int(f) for f in fit_pairs.fold})
    fitted_on = {
        "dataset": args.dataset_name or Path(args.lfw_dir).resolve().name,
        "pairs_file": Path(args.pairs).name,
        "folds": folds,
        "date": date.today().isoformat(),
    }
    try:
        cal = fit_calibration(
            d_fit,
            fit_pairs.is_same,
            method=args.method,
            distance=model.distance,
            flip=args.flip,
            fitted_on=fitted_on,
        )
    except ValueError as e:
        print(f"facenet-hf calibrate: {e}", file=sys.stderr)
        return 1
    threshold, fit_acc = best_threshold(d_fit, fit_pairs.is_same)
    model.threshold, model.threshold_flip, model.calibration = float(threshold), args.flip, cal.to_dict()
    if args.save_to:
        model.save_pretrained(target)
    else:
        model.write_config(target)

    summary = {
        "model": str(target / "config.json"),
        "method": cal.method,
        "fitted_on": cal.fitted_on,
        "threshold": float(threshold),
        "accuracy_on_fit_pairs": float(fit_acc),
        "brier_on_fit_pairs": cal.brier,
        "threshold_at_far": {
            f"{far:g}": cal.threshold_at_far(far) for far in (1e-3, 1e-2) if far >= cal.min_far
        },
    }
    out = Path(args.out) if args.out else None
    if d_check is not None:
        p = cal.probability(d_check)
        curve = reliability_curve(p, check_pairs.is_same)
        summary["check"] = {
            "folds": sorted({int(f) for f in check_pairs.fold}),
            "n_pairs": len(d_check),
            "brier": brier_score(p, check_pairs.is_same),
            "ece": curve["ece"],
            "accuracy_at_threshold": float(((d_check <= threshold) == check_pairs.is_same).mean()),
            "reliability": curve,
        }
        if out is not None:
            from facenet_hf.apps.calibration import plot_reliability

            out.mkdir(parents=True, exist_ok=True)
            plot_reliability(
                curve, out / "reliability.png", title=f"{cal.method} calibration, held-out pairs"
            )
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "calibration.json", json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"calibrated {target}: threshold {threshold:.4f} (accuracy {100 * fit_acc:.2f}% on the {len(d_fit)} fit "
        f"pairs), {cal.method} score, Brier {cal.brier:.4f} on the fit pairs"
    )
    for far, t in summary["threshold_at_far"].items():
        print(f"  threshold at FAR={far}: {t:.4f}")
    if "check" in summary:
        c = summary["check"]
        print(
            f"  held-out folds {c['folds']} ({c['n_pairs']} pairs): Brier {c['brier']:.4f}, ECE {c['ece']:.4f}, "
            f"accuracy {100 * c['accuracy_at_threshold']:.2f}% at the threshold"
        )
    return 0

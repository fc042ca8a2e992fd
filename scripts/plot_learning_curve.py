"""Plot held-out accuracy against training time from runs' metrics.jsonl files.

python scripts/plot_learning_curve.py LABEL=runs/a/metrics.jsonl [LABEL=...] --out docs/img/learning_curve.png
"""

from __future__ import annotations

import argparse
import sys

from facenet_hf.evaluation.plots import plot_learning_curve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.jsonl")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    runs = {}
    for item in args.runs:
        label, sep, path = item.partition("=")
        if not sep:
            parser.error(f"{item!r}: expected LABEL=path/to/metrics.jsonl")
        runs[label] = path
    print(plot_learning_curve(runs, args.out, title=args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())

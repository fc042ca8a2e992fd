"""``facenet-hf cluster EMBEDDINGS --out DIR``: group unlabelled faces by person; with identities, score it."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from facenet_hf.cli.common import load_model_or_error, message_naming, progress_enabled, setup_logging
from facenet_hf.constants import DISTANCES

__all__ = ["main"]

METHODS = ("agglomerative", "hdbscan", "chinese_whispers")  # facenet_hf.apps.cluster.METHODS (not imported)

EPILOG = """examples:
  facenet-hf embed runs/r18/model ~/Photos --out photos.parquet
  facenet-hf cluster photos.parquet --out photo_clusters --model runs/r18/model --contact-sheets --copy
  facenet-hf cluster people.parquet --out clusters --threshold 1.1 --method chinese_whispers --json
  facenet-hf cluster photos.parquet --out clusters --method hdbscan --min-cluster-size 3

DIR gets assignments.csv (path, face_index, cluster, identity; cluster -1 = noise) and summary.json (settings,
cluster sizes, timing; with identities in the table, the metrics: pairwise and BCubed precision / recall / F1,
NMI); with --copy a folder per cluster (hard links; copies across file systems), with --contact-sheets a PNG of
face thumbnails per cluster. agglomerative (the default) merges groups while their average distance is within
the model's verification threshold (--model) or --threshold. hdbscan finds dense groups of any size and calls
the rest noise (with a threshold, also every face with no other face within it). chinese_whispers propagates
labels over the pairs within the threshold and scales past agglomerative's O(n^2) memory (agglomerative refuses
more than 60,000 faces). A non-empty DIR is refused unless --overwrite."""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facenet-hf cluster",
        description="Cluster the faces of an embeddings table (from `facenet-hf embed`) by person.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("embeddings", help="embeddings file (.parquet from `facenet-hf embed`, or .npz)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=METHODS, default="agglomerative")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument("--threshold", type=float, default=None, help="merge distance (in --distance)")
    rule.add_argument("--model", default=None, help="take the threshold and distance stored in this model")
    p.add_argument("--revision", default=None, help="Hub revision of --model")
    p.add_argument(
        "--distance",
        choices=DISTANCES,
        default=None,
        help="distance of --threshold (default squared_euclidean)",
    )
    p.add_argument("--linkage", choices=("average", "single", "complete"), default="average")
    p.add_argument("--min-cluster-size", type=int, default=2, help="hdbscan: smallest cluster (>= 2)")
    p.add_argument("--min-samples", type=int, default=1, help="hdbscan: density neighbourhood (default 1)")
    p.add_argument("--seed", type=int, default=0, help="chinese_whispers: visiting order")
    p.add_argument("--image-root", default=None, help="folder the table's relative paths are under")
    p.add_argument(
        "--copy", action="store_true", help="write DIR/clusters/cluster_NNNN/ folders of the images"
    )
    p.add_argument("--no-links", action="store_true", help="with --copy: real copies, never hard links")
    p.add_argument("--contact-sheets", action="store_true", help="write DIR/sheets/cluster_NNNN.png")
    p.add_argument("--max-sheets", type=int, default=100, help="contact sheets for the largest N clusters")
    p.add_argument(
        "--min-size", type=int, default=2, help="clusters smaller than this get no sheet or folder"
    )
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier run in DIR")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    return p


def _fail(message: str) -> int:
    print(f"facenet-hf cluster: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    for flag, value, low in (
        ("--min-cluster-size", args.min_cluster_size, 2),
        ("--min-samples", args.min_samples, 1),
        ("--max-sheets", args.max_sheets, 0),
        ("--min-size", args.min_size, 1),
    ):
        if value < low:
            return _fail(f"{flag} must be >= {low}, got {value}")
    setup_logging()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return _fail(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        return _fail(f"{out} is not empty; choose a new --out folder or pass --overwrite")

    import numpy as np

    from facenet_hf.apps import cluster as C
    from facenet_hf.evaluation.clustering import clustering_metrics
    from facenet_hf.evaluation.embeddings_io import read_table

    threshold, distance, source = args.threshold, args.distance or "squared_euclidean", "--threshold"
    if args.model:
        model = load_model_or_error("cluster", args.model, revision=args.revision)
        if model is None:
            return 1
        try:
            threshold, distance = C.model_threshold(model)
        except ValueError as e:
            return _fail(f"model {args.model}: {e}")
        if args.distance and args.distance != distance:
            return _fail(f"--distance {args.distance} differs from the model's {distance}; drop --distance")
        source = f"model {args.model}"
    if args.method != "hdbscan" and threshold is None:
        return _fail(
            f"{args.method} clustering needs a threshold: pass --model MODEL (its calibrated threshold) or "
            "--threshold T (or use --method hdbscan)"
        )
    sheets_dir, clusters_dir = out / "sheets", out / "clusters"
    if (
        args.copy
        and clusters_dir.is_dir()
        and any(clusters_dir.iterdir())
        and not (clusters_dir / C.MARKER).is_file()
    ):
        return _fail(
            f"{clusters_dir} is not empty and was not written by facenet-hf cluster (no {C.MARKER} file): "
            "refusing to delete anything in it; choose another --out folder"
        )
    try:
        table = read_table(args.embeddings)
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        return _fail(message_naming(args.embeddings, e))
    start = time.perf_counter()
    try:
        labels = C.cluster_embeddings(
            table.embeddings,
            method=args.method,
            threshold=threshold,
            distance=distance,
            linkage=args.linkage,
            min_cluster_size=args.min_cluster_size,
            min_samples=args.min_samples,
            seed=args.seed,
        )
    except ValueError as e:
        return _fail(message_naming(args.embeddings, e))
    seconds = time.perf_counter() - start

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {"assignments": str(C.write_assignments(out / "assignments.csv", table, labels))}
    sizes = np.bincount(labels[labels >= 0]) if (labels >= 0).any() else np.zeros(0, np.int64)
    summary: dict[str, Any] = {
        "embeddings": args.embeddings,
        "rows": len(table),
        "method": args.method,
        "threshold": threshold,
        "distance": distance,
        "threshold_source": None if threshold is None else source,
        "linkage": args.linkage if args.method == "agglomerative" else None,
        "clusters": int(sizes.size),
        "clusters_of_2_or_more": int(np.sum(sizes >= 2)),
        "singletons": int(np.sum(sizes == 1)),
        "noise": int(np.sum(labels == C.NOISE)),
        "largest_clusters": sizes[:10].tolist(),
        "seconds": round(seconds, 4),
        "metrics": None,
    }
    if table.identities is not None:
        known = np.asarray([v is not None and v != "" for v in table.identities])
        if known.any():
            ids = np.asarray(
                [str(v) for v, k in zip(table.identities, known, strict=True) if k], dtype=object
            )
            metrics = clustering_metrics(ids, labels[known]).to_dict()
            summary["metrics"] = {"labelled_rows": int(known.sum()), **metrics}
    try:
        if args.copy:
            copied = C.copy_clusters(
                clusters_dir,
                table,
                labels,
                image_root=args.image_root,
                overwrite=args.overwrite,
                link=not args.no_links,
                min_size=args.min_size,
                progress=progress_enabled(),
            )
            files["clusters"] = {**copied.to_dict(), "missing": len(copied.missing)}
            files["clusters"]["missing_examples"] = copied.missing[:10]
        if args.contact_sheets:
            files["sheets"] = _sheets(sheets_dir, table, labels, sizes, args)
    except (FileExistsError, OSError) as e:
        return _fail(str(e))
    summary["files"] = files
    from facenet_hf.fileio import atomic_write_text

    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary))
        return 0
    _print_summary(summary, out)
    return 0


def _sheets(folder: Path, table, labels, sizes, args) -> dict[str, Any]:
    import numpy as np
    from tqdm.auto import tqdm

    from facenet_hf.apps.cluster import cluster_folder_name, contact_sheet

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("cluster_*.png"):  # an earlier run's (only reached with --overwrite)
        old.unlink()
    chosen = [k for k in range(sizes.size) if sizes[k] >= args.min_size][: args.max_sheets]
    width = max(4, len(str(max(sizes.size - 1, 0))))
    written = []
    for k in tqdm(chosen, desc="contact sheets", disable=not progress_enabled(), unit="sheet"):
        rows = np.flatnonzero(labels == k)
        captions = [
            Path(table.paths[i]).stem if table.identities is None else str(table.identities[i] or "?")
            for i in rows
        ]
        path = contact_sheet(
            folder / f"{cluster_folder_name(k, width)}.png",
            [table.paths[i] for i in rows],
            boxes=None if table.boxes is None else table.boxes[rows],
            captions=captions,
            title=f"cluster {k}: {rows.size} faces" + (" (first 64 shown)" if rows.size > 64 else ""),
            image_root=args.image_root,
        )
        written.append(str(path))
    return {
        "folder": str(folder),
        "written": len(written),
        "skipped_clusters": int(sizes.size) - len(written),
    }


def _print_summary(s: dict[str, Any], out: Path) -> None:
    how = (
        ""
        if s["threshold"] is None
        else f" at {s['distance']} distance <= {s['threshold']:.4g} ({s['threshold_source']})"
    )
    print(
        f"{s['rows']} faces -> {s['clusters']} clusters ({s['clusters_of_2_or_more']} of 2 or more faces, "
        f"{s['singletons']} singletons), {s['noise']} noise; {s['method']}{how}, {s['seconds']:.2f} s"
    )
    m = s["metrics"]
    if m:
        print(
            f"against the identities of {m['labelled_rows']} faces ({m['n_classes']} people): pairwise P/R/F1 "
            f"{m['pairwise_precision']:.3f}/{m['pairwise_recall']:.3f}/{m['pairwise_f1']:.3f}, BCubed P/R/F1 "
            f"{m['bcubed_precision']:.3f}/{m['bcubed_recall']:.3f}/{m['bcubed_f1']:.3f}, NMI {m['nmi']:.3f}"
        )
    files = s["files"]
    extra = []
    if "clusters" in files:
        c = files["clusters"]
        extra.append(f"{c['folders']} folders in {c['out_dir']} ({c['linked']} linked, {c['copied']} copied)")
        if c["missing"]:
            extra.append(
                f"{c['missing']} image(s) not found, e.g. {c['missing_examples'][0]} (see --image-root)"
            )
    if "sheets" in files:
        extra.append(f"{files['sheets']['written']} contact sheets in {files['sheets']['folder']}")
    print(f"wrote {out / 'assignments.csv'}, {out / 'summary.json'}" + "".join(f"; {e}" for e in extra))

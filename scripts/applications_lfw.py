"""The embedder at work on the real LFW: identification, clustering and the calibrated score, on the people of a
held-out fold (a model trained on the other folds' people never saw them).

* identification: gallery = one image (the first) of each held-out person with 2+ images; mated probes = their
  other images; non-mated probes = the held-out people with a single image. Rank-1, rank-5, DIR@FPIR=1% / 10%,
  exact search and (when installed) faiss.
* clustering: every image of the held-out people with 4+ images; agglomerative at the model's threshold and the
  density-based method; BCubed F1, pairwise F1, NMI, number of clusters.
* calibration: the fold's 600 pairs split in two halves (even / odd pair index); the score is fitted on one half
  and checked on the other (Brier, ECE, reliability plot), both ways.

    python scripts/applications_lfw.py --model runs/r18_30m/model --lfw-dir /data/lfw/lfw-deepfunneled \
        --pairs /data/lfw/pairs.txt --fold 10 --out docs/results/applications
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from facenet_hf import FaceNet
from facenet_hf.apps.calibration import brier_score, fit_calibration, plot_reliability, reliability_curve
from facenet_hf.data.lfw import read_pairs
from facenet_hf.evaluation.embed import embed_files
from facenet_hf.evaluation.embeddings_io import EmbeddingTable, pair_distances, write_table
from facenet_hf.evaluation.identification import identification_metrics


def _people_images(lfw_dir: Path, people: set[str]) -> dict[str, list[str]]:
    return {p: sorted(f"{p}/{f.name}" for f in (lfw_dir / p).glob("*.jpg")) for p in sorted(people)}


def identification(table: EmbeddingTable, images: dict[str, list[str]], squared: bool) -> dict:
    row = {p: i for i, p in enumerate(table.paths)}
    gallery = [imgs[0] for imgs in images.values() if len(imgs) >= 2]
    mated = [f for imgs in images.values() if len(imgs) >= 2 for f in imgs[1:]]
    nonmated = [imgs[0] for imgs in images.values() if len(imgs) == 1]
    probes = mated + nonmated
    g = table.embeddings[[row[p] for p in gallery]].astype(np.float64)
    q = table.embeddings[[row[p] for p in probes]].astype(np.float64)
    t0 = time.perf_counter()
    d = ((q[:, None, :] - g[None, :, :]) ** 2).sum(-1)
    if not squared:
        d = np.sqrt(d)
    metrics = identification_metrics(
        d,
        [p.split("/")[0] for p in probes],
        [p.split("/")[0] for p in gallery],
        fpir=(0.01, 0.1),
        ranks=(1, 5),
    )
    metrics["seconds"] = time.perf_counter() - t0
    # per-identity view: one person with hundreds of probes (George_W_Bush: 529 of 1,160) dominates the mean
    labels = np.asarray([p.split("/")[0] for p in gallery])
    nearest = labels[np.argmin(d[: len(mated)], axis=1)]
    truth = np.asarray([p.split("/")[0] for p in mated])
    hits = {name: float(np.mean(nearest[truth == name] == name)) for name in np.unique(truth)}
    metrics["rank_1_mean_over_identities"] = float(np.mean(list(hits.values())))
    top = Counter(truth.tolist()).most_common(3)
    metrics["largest_identities"] = [{"name": n, "probes": c, "rank_1": hits[n]} for n, c in top]
    rest = truth != top[0][0]
    metrics[f"rank_1_without_{top[0][0]}"] = float(np.mean(nearest[rest] == truth[rest]))
    metrics.update(n_gallery=len(gallery), n_mated=len(mated), n_nonmated=len(nonmated))
    return metrics


def clustering(table: EmbeddingTable, images: dict[str, list[str]], model) -> dict:
    from facenet_hf.apps.cluster import cluster_embeddings
    from facenet_hf.evaluation.clustering import clustering_metrics

    row = {p: i for i, p in enumerate(table.paths)}
    files = [f for imgs in images.values() if len(imgs) >= 4 for f in imgs]
    emb = table.embeddings[[row[f] for f in files]]
    truth = [f.split("/")[0] for f in files]
    out = {"n_images": len(files), "n_people": len(set(truth))}
    from facenet_hf.model import model_calibration

    thresholds = {"stored": model.threshold}
    cal = model_calibration(model)
    if cal is not None:
        thresholds["far_1e-2"] = cal.threshold_at_far(1e-2)
    out["thresholds"] = thresholds
    for method in ("agglomerative", "chinese_whispers", "hdbscan"):
        for name, t in thresholds.items():
            t0 = time.perf_counter()
            labels = cluster_embeddings(emb, method=method, threshold=t, distance=model.distance)
            seconds = time.perf_counter() - t0
            out[f"{method}@{name}"] = {**clustering_metrics(truth, labels).to_dict(), "seconds": seconds}
    # every person here has 4+ images: HDBSCAN told so
    t0 = time.perf_counter()
    labels = cluster_embeddings(
        emb, method="hdbscan", threshold=model.threshold, distance=model.distance, min_cluster_size=4
    )
    out["hdbscan_min4@stored"] = {
        **clustering_metrics(truth, labels).to_dict(),
        "seconds": time.perf_counter() - t0,
    }
    return out


def calibration(d: np.ndarray, same: np.ndarray, out: Path, distance: str) -> dict:
    halves = {"even": np.arange(d.size) % 2 == 0, "odd": np.arange(d.size) % 2 == 1}
    result = {}
    for method in ("logistic", "isotonic"):
        for fit_name, fit in halves.items():
            check = ~fit
            cal = fit_calibration(
                d[fit], same[fit], method=method, distance=distance, fitted_on={"half": fit_name}
            )
            p = cal.probability(d[check])
            curve = reliability_curve(p, same[check])
            key = f"{method}_fit_{fit_name}"
            result[key] = {
                "brier_fit": cal.brier,
                "brier_check": brier_score(p, same[check]),
                "ece_check": curve["ece"],
                "n_fit": int(fit.sum()),
                "n_check": int(check.sum()),
                "reliability_check": curve,
            }
            if fit_name == "even":
                plot_reliability(
                    curve,
                    out / f"reliability_{method}.png",
                    title=f"{method}: fitted on even pairs, odd pairs shown",
                )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--lfw-dir", required=True)
    parser.add_argument("--pairs", required=True)
    parser.add_argument("--fold", type=int, default=10)
    parser.add_argument("--flip", default="sum")
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--skip-clustering", action="store_true")
    parser.add_argument("--embeddings-out", default=None, help="also write the fold's embeddings table here")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lfw = Path(args.lfw_dir)
    model = FaceNet.from_pretrained(args.model)
    squared = model.distance == "squared_euclidean"
    pairs = read_pairs(args.pairs).select_folds([args.fold])
    images = _people_images(lfw, pairs.people())
    files = sorted(f for imgs in images.values() for f in imgs)
    t0 = time.perf_counter()
    emb = embed_files(model, [str(lfw / f) for f in files], flip=args.flip, num_workers=args.num_workers)
    embed_s = time.perf_counter() - t0
    table = EmbeddingTable(files, emb, [f.split("/")[0] for f in files])
    if args.embeddings_out:  # e.g. for `facenet-hf plot map` (kept out of --out: it is data, not a report)
        write_table(args.embeddings_out, table)
    counts = Counter(len(v) for v in images.values())

    p1, p2 = pairs.paths()
    d = pair_distances(files, emb, p1, p2, squared=squared)
    report = {
        "model": str(args.model),
        "fold": args.fold,
        "flip": args.flip,
        "distance": model.distance,
        "threshold": model.threshold,
        "n_people": len(images),
        "n_images": len(files),
        "people_by_image_count": {
            "1": counts[1],
            "2-3": counts[2] + counts[3],
            "4+": sum(v for k, v in counts.items() if k >= 4),
        },
        "embed_seconds": embed_s,
        "identification": identification(table, images, squared),
        "clustering": clustering(table, images, model) if not args.skip_clustering else None,
        "calibration": calibration(d, pairs.is_same, out, model.distance),
    }
    (out / f"applications_fold{args.fold}.json").write_text(json.dumps(report, indent=2, default=float))
    ident, clus = report["identification"], report["clustering"]
    print(json.dumps({k: ident[k] for k in ident if not isinstance(ident[k], (list, dict))}, default=float))
    for key, val in (clus or {}).items():
        if isinstance(val, dict) and "bcubed_f1" in val:
            print(key, {k: round(v, 4) for k, v in val.items() if isinstance(v, (int, float))})
    for key, val in report["calibration"].items():
        print(
            key, f"brier fit {val['brier_fit']:.4f} check {val['brier_check']:.4f} ece {val['ece_check']:.4f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

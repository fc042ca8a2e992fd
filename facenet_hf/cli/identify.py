"""``facenet-hf identify GALLERY QUERY...``: who is it? The top-k enrolled people of each face, or "unknown"."""

from __future__ import annotations

import argparse
import json
import math
import sys

from facenet_hf.cli.common import load_model_or_error, progress_enabled, setup_logging
from facenet_hf.constants import FLIP_MODES

__all__ = ["main"]

EPILOG = """examples:
  facenet-hf identify staff.parquet visitor.jpg                    # the gallery's model and its threshold
  facenet-hf identify staff.parquet photos/ --far 1e-4 --top-k 3 --json
  facenet-hf identify staff.parquet probes.parquet --threshold 0.9 --backend faiss
  facenet-hf identify staff.parquet probe_people/ --far 1e-3 --evaluate   # rank-1, DIR@FPIR on labelled probes

A query is "unknown" when its nearest person is farther than the threshold: --threshold as given (the model's
distance), --far the calibrated threshold at that false-accept rate per comparison (a stranger searched against
N people is wrongly matched with probability about 1 - (1 - FAR)^N: reported as expected FPIR), or by default the
model's stored threshold; --closed-set always answers the nearest. Scores are P(same person) from the model's
calibration. Every detected face of a photo is a query; images are detected and aligned when the model was
trained on aligned faces (--detect/--no-detect override). Exact search (torch) by default; --backend faiss is
the same search with faiss (pip install 'facenet-hf[search]'), faiss-hnsw an approximate one for millions of
vectors."""


def _rates(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated rates like 0.01,0.1, got {text!r}"
        ) from None
    if not values or any(not 0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"rates must be in (0, 1], got {text!r}")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="facenet-hf identify",
        description="Identify faces against an enrolled gallery: top-k people with distances and scores, or "
        "unknown (open-set).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("gallery", help="gallery file written by `facenet-hf enrol`")
    p.add_argument("queries", nargs="+", help="images, folders of images (or of people) or embeddings files")
    p.add_argument("--model", default=None, help="model folder or Hub repo id (default: the gallery's)")
    p.add_argument("--top-k", type=int, default=5, help="people listed per query (default 5)")
    rule = p.add_mutually_exclusive_group()
    rule.add_argument(
        "--far", type=float, default=None, help="threshold at this false-accept rate (calibration)"
    )
    rule.add_argument(
        "--threshold", type=float, default=None, help="distance threshold (the model's distance)"
    )
    rule.add_argument("--closed-set", action="store_true", help="never answer unknown")
    p.add_argument("--backend", choices=("exact", "faiss", "faiss-hnsw"), default="exact")
    p.add_argument("--flip", choices=FLIP_MODES, default=None, help="flip TTA (default: the gallery's)")
    detect = p.add_mutually_exclusive_group()
    detect.add_argument("--detect", dest="detect", action="store_true", default=None, help="detect and align")
    detect.add_argument("--no-detect", dest="detect", action="store_false", help="the images are face crops")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="queries carry identities (a people folder, an embeddings file's identity column): report rank-1, "
        "CMC and DIR@FPIR",
    )
    p.add_argument(
        "--fpir", type=_rates, default=[0.01, 0.1], help="FPIRs of --evaluate's DIR (default 0.01,0.1)"
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--revision", default=None, help="Hub revision of MODEL")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.top_k < 1 or args.batch_size < 1:
        parser().error("--top-k and --batch-size must be >= 1")
    setup_logging()

    from facenet_hf.apps.gallery import (
        Gallery,
        expected_fpir,
        is_embeddings_file,
        load_queries,
        resolve_threshold,
    )
    from facenet_hf.model import model_calibration

    def fail(message: object) -> int:
        print(f"facenet-hf identify: {message}", file=sys.stderr)
        return 1

    try:
        gallery = Gallery.load(args.gallery)
    except (ValueError, OSError) as e:
        return fail(e)
    except KeyError as e:
        return fail(e.args[0] if e.args else e)
    images = [q for q in args.queries if not is_embeddings_file(q)]
    needs_model = bool(images) or (args.threshold is None and not args.closed_set)
    model_name = args.model or gallery.info.model_id
    model = None
    if needs_model:
        if model_name is None:
            if images:
                return fail(f"{images[0]} holds images, which need a model to embed them: pass --model MODEL")
            return fail(
                "no threshold: the gallery records no model to take it from; give --threshold T, --model MODEL "
                "(a calibrated one), or --closed-set"
            )
        model = load_model_or_error("identify", model_name, revision=args.revision)
        if model is None:
            return 1
    elif args.model is not None:
        model = load_model_or_error("identify", args.model, revision=args.revision)
        if model is None:
            return 1
    try:
        if model is not None:
            gallery.check_model(model, flip=args.flip)
        threshold, source = (None, "closed set")
        if not args.closed_set:
            threshold, source = resolve_threshold(
                model,
                threshold=args.threshold,
                far=args.far,
                distance=gallery.info.distance,
                flip=args.flip or gallery.info.flip,
            )
        table, failures = load_queries(
            args.queries,
            gallery,
            model=model if images else None,
            flip=args.flip,
            detect=args.detect,
            batch_size=args.batch_size,
            progress=progress_enabled(),
        )
        results = []
        if len(table):
            results = gallery.identify(
                table.embeddings,
                args.top_k,
                threshold=threshold,
                calibration=None if model is None else model_calibration(model),
                names=table.keys,
                backend=args.backend,
            )
        evaluation = _evaluate(table, results, gallery, args) if args.evaluate else None
    except (ValueError, FileNotFoundError, OSError, ImportError) as e:  # BadImageError is a ValueError
        return fail(e)
    except KeyError as e:
        return fail(e.args[0] if e.args else e)
    people = len(gallery.people)
    fpir = None if args.far is None else expected_fpir(args.far, people)
    for path, reason in failures:
        hint = "; pass --no-detect if it already is a face crop" if reason.startswith("no face") else ""
        print(f"facenet-hf identify: cannot use {path}: {reason}{hint}", file=sys.stderr)
    if args.json:
        print(
            json.dumps(
                {
                    "gallery": args.gallery,
                    "vectors": len(gallery),
                    "people": people,
                    "distance": gallery.info.distance,
                    "threshold": threshold,
                    "threshold_source": source,
                    "expected_fpir": fpir,
                    "backend": args.backend,
                    "results": [r.to_dict() for r in results],
                    "failures": [{"path": p, "reason": r} for p, r in failures],
                    "evaluation": evaluation,
                }
            )
        )
        return 1 if failures else 0
    rule = "closed set (never unknown)" if threshold is None else f"threshold {threshold:.4f} ({source})"
    if fpir is not None:
        rule += f", expected FPIR about {fpir:.3g} against {people} people"
    print(f"{args.gallery}: {len(gallery)} vectors of {people} people; {gallery.info.distance} {rule}")
    for r in results:
        if r.known:
            head = f"{r.identity} (distance {r.distance:.4f}" + (
                f" <= {r.threshold:.4f})" if r.threshold is not None else ")"
            )
        else:
            nearest = r.candidates[0] if r.candidates else None
            head = r.decision + (
                f" (nearest {nearest.identity} at {nearest.distance:.4f} > {r.threshold:.4f})"
                if nearest
                else ""
            )
        print(f"{r.query}: {head}")
        width = max((len(c.identity) for c in r.candidates), default=0)
        for rank, c in enumerate(r.candidates, 1):
            score = "" if c.score is None else f"  P(same) {c.score:.3f}"
            print(f"  {rank}. {c.identity:<{width}}  {c.distance:.4f}{score}  {c.path}")
    if evaluation is not None:
        print(_evaluation_text(evaluation))
    return 1 if failures else 0


def _evaluate(table, results, gallery, args) -> dict:
    """Rank-1, CMC and DIR@FPIR of labelled queries (see facenet_hf.evaluation.identification)."""
    import numpy as np

    from facenet_hf.evaluation import ranked_identification_metrics

    if table.identities is None or any(i is None for i in table.identities):
        raise ValueError(
            "--evaluate needs the identity of every query: a folder of people (Person/img.jpg) or an embeddings "
            "file with an identity column"
        )
    if not results:
        raise ValueError("--evaluate: no query could be used")
    k = max(len(r.candidates) for r in results)
    labels = np.full((len(results), k), "", dtype=object)
    dist = np.full((len(results), k), math.inf)
    for i, r in enumerate(results):
        for j, c in enumerate(r.candidates):
            labels[i, j], dist[i, j] = c.identity, c.distance
    probes = [str(i) for i in table.identities]
    enrolled = set(gallery.people)
    fpir = args.fpir if any(p not in enrolled for p in probes) else []
    ranks = [r for r in (1, 5, 10) if r <= k]
    out = ranked_identification_metrics(labels, dist, probes, gallery.people, fpir=fpir, ranks=ranks)
    out["cmc"] = {str(r): v for r, v in out["cmc"].items()}
    if not fpir:
        out["note"] = (
            "every query is of an enrolled person: DIR@FPIR needs queries of people not in the gallery"
        )
    return out


def _evaluation_text(ev: dict) -> str:
    lines = [
        f"evaluation: {ev['n_probes']} queries ({ev['n_mated']} of enrolled people, {ev['n_nonmated']} not) "
        f"against {ev['n_gallery_identities']} people",
        "  closed set: " + ", ".join(f"rank-{r} {v:.3f}" for r, v in ev["cmc"].items()),
    ]
    for row in ev["dir_at_fpir"]:
        lines.append(
            f"  DIR@FPIR={row['fpir']:g}: {row['dir']:.3f} (threshold {row['threshold']:.4f}, FPIR achieved "
            f"{row['fpir_achieved']:.3f})"
        )
    if ev.get("note"):
        lines.append(f"  note: {ev['note']}")
    return "\n".join(lines)

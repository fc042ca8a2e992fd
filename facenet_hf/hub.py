"""Publishing to the Hugging Face Hub: the model card (``README.md``) and the push of a model folder.

A published FaceNet repo holds exactly: ``model.safetensors``, ``config.json`` (see :mod:`facenet_hf.model`),
``README.md`` (:func:`write_model_card`) and PNG plots (``*.png`` and ``eval/*.png``); checkpoints and anything else
in the folder stay local. :func:`push_model` never writes to the local folder.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token

from facenet_hf.constants import DEFAULT_IMAGE_SIZE
from facenet_hf.fileio import atomic_path
from facenet_hf.model import InvalidConfigError, validate_config

__all__ = ["CARD_TAGS", "PushError", "published_files", "push_model", "write_model_card"]

CARD_TAGS = ("face-recognition", "face-verification", "facenet", "triplet-loss", "timm")
# The mixin's own tags: the Hub counts downloads of mixin models through them.
_MIXIN_TAGS = ("model_hub_mixin", "pytorch_model_hub_mixin")
REQUIRED_FILES = ("model.safetensors", "config.json")
ROC_NAMES = ("eval/lfw_roc.png", "lfw_roc.png")
_DISTANCE_WORDS = {"squared_euclidean": "squared Euclidean", "euclidean": "Euclidean"}


class PushError(RuntimeError):
    """A push to the Hub failed; the message says why and what to do. The local folder is unchanged."""


# -- model card -----------------------------------------------------------------------------------------
def write_model_card(
    model_dir: str | os.PathLike,
    *,
    report: Mapping[str, Any] | None = None,
    train_config: Mapping[str, Any] | None = None,
    training_info: Mapping[str, Any] | None = None,
    repo_id: str | None = None,
    roc_image: str | os.PathLike | None = None,
    datasets: Sequence[str] = ("lfw",),
) -> Path:
    """Write ``model_dir/README.md`` (YAML metadata + model-index + body) and return its path.

    ``report``: an LFW report of :func:`facenet_hf.evaluation.verification.verification_protocol` (its numbers go
    into the ``model-index`` unchanged, as fractions). ``train_config``: the resolved config (dumped as YAML).
    ``training_info``: free-form facts such as ``hardware``, ``wall_time_s``, ``steps``, ``images``.
    ``repo_id``: used in the usage snippet (else a placeholder to replace). ``roc_image``: a ROC plot to show;
    one outside ``model_dir`` is copied in as ``lfw_roc.png``; by default ``eval/lfw_roc.png`` or ``lfw_roc.png``
    in ``model_dir`` is used if present. The file is replaced atomically.
    """
    model_dir = Path(model_dir)
    config = _read_config(model_dir)
    roc = _place_roc(model_dir, roc_image)
    name = (repo_id or model_dir.resolve().name).split("/")[-1]
    data = ModelCardData(
        library_name="facenet-hf",
        license="apache-2.0",
        tags=[*CARD_TAGS, _tag(config["backbone"]), *_MIXIN_TAGS],
        datasets=list(datasets) or None,
        pipeline_tag="image-feature-extraction",
        model_name=name,
        eval_results=_eval_results(report) if report else None,
        metrics=["accuracy", "roc_auc"] if report else None,
    )
    body = _card_body(model_dir, name, config, report, train_config, training_info, repo_id, roc)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")  # parses it back: a malformed card fails here
    path = model_dir / "README.md"
    with atomic_path(path) as tmp:
        tmp.write_text(str(card), encoding="utf-8")
    return path


def _read_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{model_dir} has no config.json: save the model with FaceNet.save_pretrained first"
        )
    config = json.loads(path.read_text(encoding="utf-8"))
    validate_config(config, source=str(path))
    return config


def _place_roc(model_dir: Path, roc_image: str | os.PathLike | None) -> str | None:
    if roc_image is None:
        return next((n for n in ROC_NAMES if (model_dir / n).is_file()), None)
    src = Path(roc_image).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"roc_image {roc_image} does not exist")
    root = model_dir.resolve()
    if src.is_relative_to(root):
        return src.relative_to(root).as_posix()
    with atomic_path(model_dir / "lfw_roc.png") as tmp:
        shutil.copyfile(src, tmp)
    return "lfw_roc.png"


def _alignment_words(alignment: dict | None) -> str:
    if not alignment:
        return "LFW deep-funneled style crops (face centred in a 250 x 250 image); `embed(photo, detect=True)` warps a photo to that framing"
    return (
        f"five-point-aligned faces ({alignment.get('template')} template, {alignment.get('size')} px, margin "
        f"{alignment.get('margin')}); `embed` / `verify` detect and align raw photos (MTCNN) the same way"
    )


def _tag(backbone: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", backbone.lower()).strip("-") or "timm-model"


def _eval_results(report: Mapping[str, Any]) -> list[EvalResult]:
    """model-index entries: accuracy, ROC AUC, TAR@FAR, EER on LFW (values as in the report, fractions)."""
    missing = [k for k in ("accuracy_mean", "auc", "tar_at_far", "far_target") if k not in report]
    if missing:
        raise KeyError(f"the LFW report lacks {missing}: pass the dict returned by verification_protocol")
    args = {k: _plain(report[k]) for k in ("protocol", "n_pairs", "folds") if report.get(k) is not None}
    common = dict(
        task_type="image-feature-extraction",
        task_name="Face Verification",
        dataset_type="lfw",
        dataset_name="LFW (Labeled Faces in the Wild)",
        dataset_split="test",
        dataset_args=args or None,
    )
    far = _plain(report["far_target"])
    metrics = [
        ("accuracy", "Accuracy (mean over cross-validation folds)", report["accuracy_mean"], None),
        ("roc_auc", "ROC AUC", report["auc"], None),
        ("tar_at_far", f"TAR @ FAR={far:g}", report["tar_at_far"], {"far": far}),
    ]
    if report.get("eer") is not None:
        metrics.append(("eer", "Equal error rate", report["eer"], None))
    return [
        EvalResult(metric_type=t, metric_name=n, metric_value=_plain(v), metric_args=a, **common)
        for t, n, v, a in metrics
    ]


def _plain(value: Any) -> Any:
    """numpy scalars/arrays -> Python numbers/lists (YAML-safe)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _pct(value: Any) -> str:
    return "n/a" if value is None or not math.isfinite(float(value)) else f"{100 * float(value):.2f}%"


def _param_count(model_dir: Path) -> int | None:
    try:
        from safetensors import safe_open

        with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())  # noqa: SIM118
    except Exception:
        return None


def _card_body(
    model_dir: Path,
    name: str,
    config: Mapping[str, Any],
    report: Mapping[str, Any] | None,
    train_config: Mapping[str, Any] | None,
    training_info: Mapping[str, Any] | None,
    repo_id: str | None,
    roc: str | None,
) -> str:
    distance = config.get("distance", "squared_euclidean")
    dist_word = _DISTANCE_WORDS.get(distance, distance)
    threshold = config.get("threshold")
    size = config.get("image_size", DEFAULT_IMAGE_SIZE)
    mining = ((train_config or {}).get("loss") or {}).get("mining")
    flip = (report or {}).get("flip") or "sum"
    params = _param_count(model_dir)
    out = [
        f"# {name}",
        "",
        f"A FaceNet-style face embedder (Schroff et al., CVPR 2015) built with facenet-hf: a timm `{config['backbone']}` backbone and a linear head map an aligned "
        f"face crop to a {config['embedding_dim']}-dimensional unit vector. Two faces are judged to be the same "
        f"person when the {dist_word} distance between their embeddings is at most the calibrated threshold. "
        f"It was trained with a triplet loss{f' ({mining} mining)' if mining else ''} on P x K batches.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| Backbone | `{config['backbone']}` (timm, built with `pretrained=False`; weights in `model.safetensors`) |",
        f"| Embedding | {config['embedding_dim']}-d, L2-normalised, float32 |",
        f"| Input | RGB, {size} x {size} px |",
        f"| Normalisation | mean {config.get('mean')}, std {config.get('std')} |",
        f"| Eval preprocessing | `{json.dumps(config.get('eval_transforms'))}` (null: the library default) |",
        f"| Expected input | {_alignment_words(config.get('alignment'))} |",
    ]
    if params is not None:
        out.append(f"| Parameters | {params / 1e6:.2f} M |")
    if threshold is not None:
        out.append(
            f"| Verification threshold | {threshold:.4f} on the {dist_word} distance (same person iff "
            f"distance <= threshold), embeddings with flip `{flip}` |"
        )
    else:
        out.append("| Verification threshold | not calibrated (`threshold` is null in config.json) |")
    out += _calibration_rows(config.get("calibration"))
    out += ["", "`config.json` holds all of the above; `FaceNet.from_pretrained` restores it.", ""]
    out += _evaluation_section(report, roc)
    out += _training_section(train_config, training_info)
    out += _usage_section(repo_id, threshold, flip)
    out += _limitations_section(threshold is not None)
    return "\n".join(out).rstrip() + "\n"


def _calibration_rows(cal: Mapping[str, Any] | None) -> list[str]:
    """Model-card rows for a ``calibration`` (P(same | distance), thresholds at FARs) and the data it was fitted on."""
    if not cal:
        return ["| Calibrated score | none (`facenet-hf calibrate` fits one) |"]
    fitted = cal.get("fitted_on") or {}
    where = ", ".join(
        f"{k} {v}" for k, v in fitted.items() if k not in ("n_pairs", "n_matched", "n_mismatched")
    )
    rows = [
        f"| Calibrated score | P(same person) by {cal['method']} regression on the distance, fitted on "
        f"{fitted.get('n_pairs', '?')} pairs ({fitted.get('n_matched', '?')} matched, "
        f"{fitted.get('n_mismatched', '?')} mismatched{'; ' + where if where else ''}), flip `{cal.get('flip')}` |"
    ]
    for far in (1e-3, 1e-2):
        match = [r for r in cal.get("far_table", []) if abs(r[0] - far) < 1e-12]
        if match:
            rows.append(
                f"| Threshold at FAR={far:g} | {match[0][1]:.4f} (TAR {100 * match[0][2]:.2f}% on the calibration "
                "pairs) |"
            )
    return rows


def _evaluation_section(report: Mapping[str, Any] | None, roc: str | None) -> list[str]:
    out = ["## Evaluation: LFW verification", ""]
    if not report:
        out += ["No LFW evaluation was recorded for this model.", ""]
    else:
        folds = report.get("folds")
        protocol = report.get("protocol") or "unspecified protocol"
        out += [
            f"Protocol: {protocol}. {report.get('n_pairs', '?')} pairs"
            + (f" from fold(s) {', '.join(str(f) for f in folds)}" if folds else "")
            + f"; {_DISTANCE_WORDS.get(report.get('distance', ''), report.get('distance', 'squared Euclidean'))}"
            " distance"
            + (f", flip test-time augmentation `{report['flip']}`" if report.get("flip") else "")
            + ". Thresholds are never tuned on the pairs they score, and the people in these pairs were held out "
            "of training (identity-disjoint evaluation).",
            "",
            "| Metric | Value |",
            "|---|---|",
            f"| Accuracy | {_pct(report['accuracy_mean'])} ± {_pct(report.get('accuracy_std'))} (std over folds)"
            + (
                f", standard error {_pct(report['accuracy_stderr'])}"
                if report.get("accuracy_stderr") is not None
                else ""
            )
            + " |",
            f"| ROC AUC | {float(report['auc']):.4f} |",
            f"| TAR @ FAR={float(report['far_target']):g} | {_pct(report['tar_at_far'])} |",
        ]
        if report.get("eer") is not None:
            out.append(f"| Equal error rate | {_pct(report['eer'])} |")
        if report.get("threshold") is not None:
            out.append(
                f"| Deployment threshold (best accuracy on all scored pairs) | {float(report['threshold']):.4f} |"
            )
        out.append("")
    if roc:
        out += [f"![ROC curve on LFW]({roc})", ""]
    return out


def _fmt_duration(seconds: float) -> str:
    seconds = float(seconds)
    h, rem = divmod(round(seconds), 3600)
    return f"{h} h {rem // 60:02d} min" if h else f"{seconds / 60:.1f} min"


def _training_section(train_config: Mapping[str, Any] | None, info: Mapping[str, Any] | None) -> list[str]:
    out = ["## Training", ""]
    if info:
        for key, value in info.items():
            label = key.replace("_", " ")
            if key.endswith(("_s", "_seconds")) and isinstance(value, (int, float)):
                label, value = label.rsplit(" ", 1)[0], _fmt_duration(value)
            out.append(f"- {label.capitalize()}: {value}")
        out.append("")
    if train_config:
        dumped = yaml.safe_dump(_plain_tree(train_config), sort_keys=False).rstrip()
        out += ["The resolved training configuration:", "", "```yaml", dumped, "```", ""]
    if not info and not train_config:
        out += ["No training details were recorded.", ""]
    return out


def _plain_tree(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _plain_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain_tree(v) for v in obj]
    return _plain(obj)


def _usage_section(repo_id: str | None, threshold: float | None, flip: str) -> list[str]:
    target = repo_id or "MODEL_DIR_OR_REPO_ID"
    note = "" if repo_id else "  # replace with the model folder or its Hub repo id"
    code = [
        "from PIL import Image",
        "",
        "from facenet_hf import FaceNet",
        "",
        f'model = FaceNet.from_pretrained("{target}"){note}',
        'img1 = Image.open("face1.jpg")  # aligned face crops, like the training images',
        'img2 = Image.open("face2.jpg")',
        f'emb = model.embed([img1, img2], flip="{flip}")  # [2, D] unit vectors',
    ]
    if threshold is not None:
        code += [
            f'same, distance = model.verify(img1, img2, flip="{flip}")  # uses model.threshold, model.distance',
            'print(f"same person: {same} (distance {distance:.4f}, threshold {model.threshold:.4f})")',
        ]
    else:
        code += [
            "distance = float(((emb[0] - emb[1]) ** 2).sum())  # squared Euclidean; no threshold is calibrated",
            'print(f"distance: {distance:.4f}")',
        ]
    return [
        "## How to use",
        "",
        "`pip install facenet-hf`, then:",
        "",
        "```python",
        *code,
        "```",
        "",
        "`FaceNet.from_pretrained` loads only `model.safetensors` and a validated `config.json`; it never unpickles.",
        "",
    ]


def _limitations_section(has_threshold: bool) -> list[str]:
    out = [
        "## Limitations and ethical considerations",
        "",
        "- **Demographic bias.** LFW is mostly photos of public figures from news media, skewed towards adult, "
        "male and lighter-skinned faces. Accuracy on LFW says little about accuracy for under-represented groups; "
        "error rates are likely higher for them. Measure on data that represents the people the system will see.",
        "- **LFW is small and saturated.** 6,000 pairs; modern models score above 99%, so small differences are "
        "within noise (see the standard error) and do not predict performance on unconstrained, low-quality or "
        "non-frontal images.",
        "- **The threshold is dataset-specific.** It was calibrated on LFW pairs with this preprocessing; other "
        "cameras, alignments or populations shift the distance distributions. Re-calibrate it on your own data, at "
        "the false-accept rate your application can bear.",
        "- **Intended use.** Research and consent-based face verification (e.g. unlocking your own device, comparing "
        "photos you are entitled to compare). It must not be used for surveillance, for identifying or tracking "
        "people without their informed consent, or for decisions with legal or similarly significant effects "
        "without human review. Face data is biometric data; laws such as the GDPR and BIPA apply.",
        "- **Inputs.** The model expects aligned face crops like its training data; it has no face detector.",
        "",
    ]
    if not has_threshold:
        out.insert(
            -1, "- **No threshold.** This model ships no calibrated threshold; `verify` will refuse to run."
        )
    return out


# -- push -----------------------------------------------------------------------------------------------
def published_files(model_dir: str | os.PathLike) -> list[str]:
    """Relative paths that :func:`push_model` uploads; raises ``PushError`` if the folder is not publishable."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise PushError(f"{model_dir} is not a folder: give the folder written by FaceNet.save_pretrained")
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).is_file()]
    if missing:
        raise PushError(
            f"{model_dir} lacks {', '.join(missing)}: save the model with FaceNet.save_pretrained "
            "(only safetensors weights are published)"
        )
    try:
        _read_config(model_dir)
    except (InvalidConfigError, ValueError) as e:
        raise PushError(f"refusing to publish a config that FaceNet.from_pretrained would reject: {e}") from e
    files = [*REQUIRED_FILES]
    if (model_dir / "README.md").is_file():
        files.append("README.md")
    pngs = sorted(p for p in [*model_dir.glob("*.png"), *model_dir.glob("eval/*.png")] if p.is_file())
    files += [p.relative_to(model_dir).as_posix() for p in pngs]
    return files


def push_model(
    model_dir: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload the published files of ``model_dir`` (see :func:`published_files`) to ``repo_id``; returns the commit URL.

    Creates the repo if needed (``private`` applies only to a new repo) and the branch ``revision`` from ``main``
    if it is missing. ``token`` defaults to ``HF_TOKEN`` / the saved login; ``endpoint`` to ``HF_ENDPOINT`` /
    huggingface.co. Every failure (no or bad token, offline mode, network error, server error, dropped connection)
    raises :class:`PushError` with what to do; the local folder is only read.
    """
    files = published_files(model_dir)
    token = token or get_token()
    if not token:
        raise PushError(
            "no Hugging Face token: run `hf auth login`, set HF_TOKEN, or pass a write token (--token); "
            "create one at https://huggingface.co/settings/tokens"
        )
    api = HfApi(endpoint=endpoint, token=token)
    stage = f"creating the repository {repo_id}"
    try:
        repo_id = (
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id or repo_id
        )
        if revision is not None:
            stage = f"creating the branch {revision!r} of {repo_id}"
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        stage = f"uploading {len(files)} files to {repo_id}"
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=model_dir,
            allow_patterns=[glob.escape(f) for f in files],
            revision=revision,
            commit_message=commit_message or "Upload FaceNet model with facenet-hf",
        )
    except Exception as e:
        raise PushError(_explain(e, stage, repo_id, api.endpoint)) from e
    return str(info.commit_url)


def _explain(error: Exception, stage: str, repo_id: str, endpoint: str) -> str:
    """An actionable message for a failed push (works with the httpx- and requests-based clients)."""
    names = {cls.__name__ for cls in type(error).__mro__}
    status = getattr(getattr(error, "response", None), "status_code", None)
    detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if "OfflineModeIsEnabled" in names:
        return f"offline mode is on (HF_HUB_OFFLINE=1) while {stage}: pushing needs the network; unset HF_HUB_OFFLINE"
    if status == 401:
        return (
            f"the Hub at {endpoint} refused the token (401) while {stage}: it is missing, invalid or expired. "
            "Run `hf auth login` or pass a valid write token with --token"
        )
    if status == 403:
        return (
            f"the token may not write to {repo_id} (403) while {stage}: use a token with write access to that "
            "namespace (a fine-grained token needs write permission on it)"
        )
    if status == 404:
        return f"{repo_id} was not found (404) while {stage}: check the repo id and that your token can access it"
    if isinstance(status, int) and status >= 500:
        return (
            f"the Hub at {endpoint} had a server error ({status}) while {stage}; the upload did not complete. "
            "Try again later: re-running the push is safe (unchanged files are skipped)"
        )
    if isinstance(status, int):
        return f"the Hub refused the request ({status}) while {stage}: {detail}"
    if names & {"ConnectError", "ConnectTimeout", "ProxyError", "SSLError"}:
        return (
            f"could not reach {endpoint} while {stage} ({type(error).__name__}: {detail}): check the network "
            "connection, proxy and HF_ENDPOINT; nothing was uploaded"
        )
    if names & {
        "TransportError",
        "RemoteProtocolError",
        "ConnectionError",
        "ChunkedEncodingError",
        "TimeoutException",
    }:
        return (
            f"the connection to {endpoint} dropped while {stage} ({type(error).__name__}: {detail}); the commit may "
            f"or may not have been recorded: check {endpoint}/{repo_id} and re-run the push (it is safe to repeat)"
        )
    return f"push to {repo_id} failed while {stage}: {type(error).__name__}: {detail}"

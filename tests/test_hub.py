"""Publishing to and loading from the Hub, against the loopback stand-in in ``tests/hub_server.py``.

Loads run in fresh subprocesses (``huggingface_hub`` reads ``HF_ENDPOINT``/``HF_HUB_OFFLINE`` at import) with an
empty cache. Pushes run in this process with an explicit endpoint; the ``online`` fixture lifts the offline mode
that conftest.py sets and turns Xet off, so uploads take the plain HTTP path the loopback hub speaks.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from hub_server import LoopbackHub
from huggingface_hub import ModelCard, constants, metadata_load
from PIL import Image
from safetensors.torch import save, save_file

from facenet_hf import FaceNet
from facenet_hf.cli import main as cli_main
from facenet_hf.hub import PushError, published_files, push_model, write_model_card

ROOT = Path(__file__).resolve().parents[1]
REPO = "tester/facenet-tiny"
EVAL_STEPS = [{"resize": {"size": 36}}, {"center_crop": {"size": 32}}]
REPORT = {
    "protocol": "held-out fold 10, threshold by 10-fold cross-validation within the fold",
    "n_pairs": 600,
    "folds": [10],
    "accuracy_mean": 0.9316666666666666,
    "accuracy_std": 0.027638539919628355,
    "accuracy_stderr": 0.009213,
    "auc": 0.9712444444444445,
    "tar_at_far": 0.41333333333333333,
    "far_target": 0.001,
    "eer": 0.07666666666666666,
    "threshold": 0.8731,
    "flip": "sum",
    "distance": "squared_euclidean",
}


def _tiny(**kw) -> FaceNet:
    torch.manual_seed(0)
    kw = {"threshold": 0.8731, "eval_transforms": EVAL_STEPS, **kw}
    return FaceNet(backbone="test_resnet", embedding_dim=32, image_size=32, **kw).eval()


def _faces(folder: Path, n: int = 3) -> list[Path]:
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i in range(n):
        arr = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
        paths.append(folder / f"face{i + 1}.jpg")
        Image.fromarray(arr).save(paths[-1], quality=95)
    return paths


def _folder_state(folder: Path) -> list[tuple[str, str, int]]:
    """(relative path, sha256, mtime_ns) of every file, hidden ones included."""
    return sorted(
        (p.relative_to(folder).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file()
    )


class _TouchOnUnpickle:
    """A pickle payload: unpickling it creates ``path`` (stands in for arbitrary code execution)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


@pytest.fixture
def hub():
    with LoopbackHub() as server:
        yield server


@pytest.fixture
def online(monkeypatch):
    """This process's client: online (conftest sets HF_HUB_OFFLINE=1) and without Xet."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


def _make_model_dir(parent: Path) -> Path:
    """A saved tiny model with a card, a ROC plot under eval/, and a checkpoint that must never be published."""
    folder = parent / "model"
    _tiny().save_pretrained(folder)
    (folder / "eval").mkdir()
    Image.new("RGB", (8, 8), "white").save(folder / "eval" / "lfw_roc.png")
    (folder / "checkpoints" / "step_10").mkdir(parents=True)
    (folder / "checkpoints" / "step_10" / "optimizer.bin").write_bytes(b"not for publishing")
    info = {"hardware": "CPU", "wall_time_s": 12.5}
    write_model_card(folder, report=REPORT, repo_id=REPO, training_info=info)
    return folder


@pytest.fixture
def model_dir(tmp_path) -> Path:
    return _make_model_dir(tmp_path)


def _client(hub_url: str, hf_home: Path, code: str, *args, offline: bool = False, cwd: Path | None = None):
    """Run ``code`` in a fresh interpreter whose huggingface_hub talks to ``hub_url`` with the cache ``hf_home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_ENDPOINT=hub_url,
        HF_HOME=str(hf_home),
        HF_TOKEN="hf_loopback_write_token",
        HF_HUB_OFFLINE="1" if offline else "0",
        HF_HUB_DISABLE_XET="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    cmd = [sys.executable, "-c", code, *map(str, args)]
    result = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"client failed:\n{result.stdout}\n{result.stderr[-4000:]}"
    return result


def _last_json(result: subprocess.CompletedProcess) -> dict:
    return json.loads(result.stdout.strip().splitlines()[-1])


# A fresh client: load the good repo, compare with the reference embeddings, then try each bad repo.
LOAD = r"""
import json, os, sys
import torch
from safetensors.torch import load_file
from facenet_hf import FaceNet

torch.set_num_threads(1)
job = json.loads(sys.argv[1])
ref = load_file(job["ref"])
model = FaceNet.from_pretrained(job["repo"])
with torch.no_grad():
    same_forward = torch.equal(model(ref["x"]), ref["emb"])
same_embed = torch.equal(model.embed(job["images"], flip="sum"), ref["embed"])
errors = {}
for repo in job.get("bad", []):
    try:
        FaceNet.from_pretrained(repo)
        errors[repo] = "loaded"
    except Exception as e:
        errors[repo] = f"{type(e).__name__}: {e}"
print(json.dumps({
    "forward": same_forward, "embed": same_embed, "training": model.training,
    "config": {k: getattr(model, k) for k in ("threshold", "mean", "std", "image_size", "eval_transforms", "distance")},
    "backbone": model.backbone_name, "embedding_dim": model.embedding_dim, "errors": errors,
}), flush=True)
os._exit(0)  # skip the interpreter teardown (seconds with torch + timm loaded)
"""


def _bad_repos(marker: Path) -> dict[str, dict[str, bytes]]:
    """Repos that must be refused, seeded straight into the hub (a push would refuse the bad configs)."""
    model = _tiny()
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = model.config
    cfg = json.dumps(config).encode()
    missing = dict(weights)
    del missing["head.weight"]
    renamed = dict(weights)
    renamed["head.weights"] = renamed.pop("head.weight")
    return {
        "t/missing-key": {"config.json": cfg, "model.safetensors": save(missing)},
        "t/renamed-key": {"config.json": cfg, "model.safetensors": save(renamed)},
        "t/pickle-only": {"config.json": cfg, "pytorch_model.bin": pickle.dumps(_TouchOnUnpickle(marker))},
        "t/unknown-field": {"config.json": json.dumps({**config, "margin": 0.2}).encode()},
        "t/absurd-dim": {"config.json": json.dumps({**config, "embedding_dim": 0}).encode()},
        "t/no-config": {"model.safetensors": save(weights)},
    }


BAD_REPO_ERRORS = {
    "t/missing-key": r"KeyError: .*missing keys \['head.weight'\]",
    "t/renamed-key": r"KeyError: .*unexpected keys \['head.weights'\]",
    "t/pickle-only": r"FileNotFoundError: t/pickle-only has no model.safetensors: only safetensors .* never opened",
    "t/unknown-field": r"InvalidConfigError: config.json of t/unknown-field: field 'margin' is unknown",
    "t/absurd-dim": r"InvalidConfigError: .*field 'embedding_dim' must be an integer in \[1, 65536\], got 0",
    "t/no-config": r"FileNotFoundError: t/no-config has no config.json",
    "t/does-not-exist": r"RepositoryNotFoundError: .*Repository Not Found",
}


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """Push a tiny model to a loopback hub and load it (and the bad repos) in one fresh client with an empty
    cache; then the hub is stopped, so later loads can only be served by that cache."""
    tmp = tmp_path_factory.mktemp("published")
    with pytest.MonkeyPatch.context() as mp, LoopbackHub() as hub:
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        folder = _make_model_dir(tmp)
        url = push_model(folder, REPO, token=hub.token, endpoint=hub.url)
        marker = tmp / "pwned"
        for repo_id, files in _bad_repos(marker).items():
            hub.put_files(repo_id, files)

        model = FaceNet.from_pretrained(folder)
        images = [str(p) for p in _faces(tmp)]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # same as the client: bit-exact comparisons
        try:
            x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                ref = {"x": x, "emb": model(x), "embed": model.embed(images, flip="sum")}
        finally:
            torch.set_num_threads(threads)
        save_file(ref, str(tmp / "ref.safetensors"))
        job = {"ref": str(tmp / "ref.safetensors"), "repo": REPO, "images": images}
        cache = tmp / "hf_home"
        online = _last_json(_client(hub.url, cache, LOAD, json.dumps({**job, "bad": [*BAD_REPO_ERRORS]})))
        remote, requests = hub.files(REPO), list(hub.requests)
    return dict(
        url=url, hub_url=hub.url, folder=folder, model=model, job=job, cache=cache, online=online,
        remote=remote, requests=requests, marker=marker,
    )  # fmt: skip


def _expected(model: FaceNet) -> dict:
    config = {"threshold": 0.8731, "mean": model.mean, "std": model.std, "image_size": 32}
    config |= {"eval_transforms": EVAL_STEPS, "distance": "squared_euclidean"}
    same = {"forward": True, "embed": True, "training": False}
    return {**same, "config": config, "backbone": "test_resnet", "embedding_dim": 32}


@pytest.mark.slow
def test_push_then_load_in_a_fresh_client_bit_exact(published):
    assert published["url"].startswith(f"{published['hub_url']}/{REPO}/commit/")
    remote = published["remote"]
    assert sorted(remote) == [
        ".gitattributes",
        "README.md",
        "config.json",
        "eval/lfw_roc.png",
        "model.safetensors",
    ]
    assert remote["model.safetensors"] == (published["folder"] / "model.safetensors").read_bytes()
    got = dict(published["online"])
    got.pop("errors")
    assert got == _expected(published["model"])
    assert ("GET", f"/{REPO}/resolve/main/model.safetensors") in published["requests"]
    downloaded = {path.rsplit("/", 1)[-1] for _, path in published["requests"] if "/resolve/" in path}
    assert downloaded == {"config.json", "model.safetensors"}  # no backbone weights, no pickles, nothing else


@pytest.mark.slow
def test_offline_load_is_served_from_the_cache(published):
    # The hub was stopped when the fixture ended: nothing answers at hub_url any more.
    job = published["job"]
    got = _last_json(_client(published["hub_url"], published["cache"], LOAD, json.dumps(job), offline=True))
    got.pop("errors")
    assert got == _expected(published["model"])


@pytest.mark.slow
def test_bad_repos_are_refused_with_clear_errors(published):
    errors = published["online"]["errors"]
    for repo_id, pattern in BAD_REPO_ERRORS.items():
        assert re.match(pattern, errors[repo_id], re.S), (repo_id, errors[repo_id])
    assert not published["marker"].exists()
    assert not any(path.endswith("pytorch_model.bin") for _, path in published["requests"])


def test_crafted_pickle_is_never_unpickled(tmp_path):
    folder = tmp_path / "model"
    _tiny().save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    with pytest.raises(
        FileNotFoundError, match=r"no model.safetensors \(found pytorch_model.bin\).*never opened"
    ):
        FaceNet.from_pretrained(folder)
    assert not marker.exists()
    # The payload is live: unpickling it does create its marker (so the assertion above means something).
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(live)))
    assert live.exists()


def test_model_card_metadata_round_trips(model_dir):
    card = ModelCard.load(model_dir / "README.md")
    meta = metadata_load(model_dir / "README.md")
    assert meta["library_name"] == "facenet-hf" and meta["license"] == "apache-2.0"
    assert meta["pipeline_tag"] == "image-feature-extraction" and meta["datasets"] == ["lfw"]
    assert {"face-recognition", "face-verification", "facenet", "triplet-loss", "timm", "test_resnet"} <= set(
        meta["tags"]
    )
    (entry,) = meta["model-index"]
    (result,) = entry["results"]
    assert result["dataset"]["type"] == "lfw" and result["task"]["type"] == "image-feature-extraction"
    assert result["dataset"]["args"] == {"protocol": REPORT["protocol"], "n_pairs": 600, "folds": [10]}
    values = {r.metric_type: r.metric_value for r in card.data.eval_results}
    assert values == {
        "accuracy": REPORT["accuracy_mean"],
        "roc_auc": REPORT["auc"],
        "tar_at_far": REPORT["tar_at_far"],
        "eer": REPORT["eer"],
    }
    tar = next(r for r in card.data.eval_results if r.metric_type == "tar_at_far")
    assert tar.metric_args == {"far": 0.001}
    text = card.text
    for needle in (
        REPORT["protocol"],
        "93.17% ± 2.76%",
        "0.8731",
        "![ROC curve on LFW](eval/lfw_roc.png)",
        "Wall time: 0.2 min",
        "Demographic bias",
        "surveillance",
        "dataset-specific",
        '"resize"',
    ):
        assert needle in text, needle


@pytest.mark.slow
def test_card_usage_snippets_run_as_written(hub, online, model_dir, tmp_path):
    push_model(model_dir, REPO, token=hub.token, endpoint=hub.url)
    snippet = re.search(r"```python\n(.*?)```", (model_dir / "README.md").read_text(), re.S).group(1)
    assert f'FaceNet.from_pretrained("{REPO}")' in snippet  # runs as written against the (loopback) Hub
    local = tmp_path / "local"
    local.mkdir()
    for name in ("model.safetensors", "config.json"):
        (local / name).write_bytes((model_dir / name).read_bytes())
    write_model_card(local, report=None, repo_id=None)
    local_snippet = re.search(r"```python\n(.*?)```", (local / "README.md").read_text(), re.S).group(1)
    placeholder = '"MODEL_DIR_OR_REPO_ID")  # replace with the model folder or its Hub repo id'
    assert placeholder in local_snippet  # the snippet itself asks for the substitution
    local_snippet = local_snippet.replace("MODEL_DIR_OR_REPO_ID", str(local))
    work = tmp_path / "work"
    work.mkdir()
    _faces(work, 2)
    code = "import os, sys\nfor snippet in sys.argv[1:]:\n    exec(snippet, {})\nsys.stdout.flush()\nos._exit(0)\n"
    got = _client(hub.url, tmp_path / "hf_home", code, snippet, local_snippet, cwd=work)
    lines = got.stdout.strip().splitlines()
    assert re.fullmatch(r"same person: (True|False) \(distance \d+\.\d{4}, threshold 0\.8731\)", lines[0])
    assert re.fullmatch(r"same person: (True|False) \(distance \d+\.\d{4}, threshold 0\.8731\)", lines[1])
    assert ("GET", f"/{REPO}/resolve/main/config.json") in hub.requests


@pytest.mark.parametrize("fault", ["500", "drop"])
def test_failed_commit_raises_push_error_and_leaves_folder_untouched(hub, online, model_dir, fault):
    before = _folder_state(model_dir)
    hub.faults["commit"] = fault
    pattern = (
        r"server error \(500\) while uploading"
        if fault == "500"
        else r"connection to .* dropped while uploading"
    )
    with pytest.raises(PushError, match=pattern) as info:
        push_model(model_dir, REPO, token=hub.token, endpoint=hub.url)
    assert "re-run" in str(info.value) or "Try again" in str(info.value)
    assert _folder_state(model_dir) == before
    assert sorted(hub.files(REPO)) == [".gitattributes"]  # the repo was created, nothing was committed
    hub.faults.clear()
    push_model(model_dir, REPO, token=hub.token, endpoint=hub.url)  # a retry goes through
    assert "model.safetensors" in hub.files(REPO)
    assert _folder_state(model_dir) == before


def test_push_errors_are_actionable(hub, online, model_dir, monkeypatch, tmp_path):
    before = _folder_state(model_dir)
    with pytest.raises(PushError, match=r"refused the token \(401\).*hf auth login"):
        push_model(model_dir, REPO, token="hf_wrong", endpoint=hub.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)  # no token anywhere: not in the environment, no saved login
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    with pytest.raises(PushError, match=r"no Hugging Face token: run `hf auth login`, set HF_TOKEN"):
        push_model(model_dir, REPO, endpoint=hub.url)
    url = hub.url
    hub.stop()
    with pytest.raises(
        PushError, match=r"could not reach http://127\.0\.0\.1:\d+ while creating the repository"
    ):
        push_model(model_dir, REPO, token="hf_x", endpoint=url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PushError, match=r"offline mode is on \(HF_HUB_OFFLINE=1\)"):
        push_model(model_dir, REPO, token="hf_x", endpoint=url)
    assert _folder_state(model_dir) == before


def test_only_publishable_folders_are_pushed(model_dir, tmp_path):
    assert published_files(model_dir) == ["model.safetensors", "config.json", "README.md", "eval/lfw_roc.png"]
    with pytest.raises(PushError, match=r"lacks model.safetensors"):
        published_files(tmp_path)
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**cfg, "image_size": 8}))
    with pytest.raises(PushError, match=r"from_pretrained would reject: .*'image_size' must be an integer"):
        published_files(model_dir)


def test_push_to_a_new_branch_and_short_repo_id(hub, online, model_dir):
    url = push_model(
        model_dir, "facenet-tiny", revision="v1", token=hub.token, endpoint=hub.url, private=True
    )
    assert f"/{REPO}/commit/" in url  # the namespace comes from the token's user
    assert "model.safetensors" in hub.files(REPO, "v1")
    assert sorted(hub.files(REPO, "main")) == [".gitattributes"]
    assert hub.repos[REPO].private


def test_cli_push(hub, online, model_dir, monkeypatch, capsys):
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    assert cli_main(["push", str(model_dir), REPO, "--token", hub.token, "--revision", "dev"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{hub.url}/{REPO}/commit/")
    assert "config.json" in hub.files(REPO, "dev")
    hub.faults["commit"] = "500"
    assert cli_main(["push", str(model_dir), REPO, "--token", hub.token]) == 1
    err = capsys.readouterr().err
    assert err.startswith("facenet-hf push: the Hub at") and "server error (500)" in err


def test_card_copies_an_outside_roc_and_handles_a_bare_model(tmp_path):
    folder = tmp_path / "model"
    _tiny(threshold=None, eval_transforms=None).save_pretrained(folder)
    roc = tmp_path / "eval" / "lfw_roc.png"
    roc.parent.mkdir()
    Image.new("RGB", (8, 8)).save(roc)
    path = write_model_card(folder, roc_image=roc, train_config={"loss": {"mining": "semihard"}})
    assert (folder / "lfw_roc.png").read_bytes() == roc.read_bytes()
    card = ModelCard.load(path)
    assert not card.data.eval_results and "model-index" not in metadata_load(path)
    assert "![ROC curve on LFW](lfw_roc.png)" in card.text
    assert "No LFW evaluation was recorded" in card.text and "semihard mining" in card.text
    assert "model.verify" not in card.text and "not calibrated" in card.text
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        write_model_card(tmp_path / "eval")


def test_loopback_hub_serves_ranges_and_404_codes(hub):
    sha = hub.put_files("t/r", {"a.txt": b"0123456789"})

    def get(path: str, **headers: str):
        try:
            with urllib.request.urlopen(urllib.request.Request(hub.url + path, headers=headers)) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()

    status, headers, body = get("/t/r/resolve/main/a.txt", Range="bytes=3-")
    assert (status, body, headers["X-Repo-Commit"]) == (206, b"3456789", sha)
    assert get("/t/r/resolve/main/b.txt")[1]["X-Error-Code"] == "EntryNotFound"
    assert get("/t/r/resolve/nope/a.txt")[1]["X-Error-Code"] == "RevisionNotFound"
    assert get("/t/x/resolve/main/a.txt")[1]["X-Error-Code"] == "RepoNotFound"

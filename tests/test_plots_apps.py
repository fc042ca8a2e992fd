"""The apps' pictures: the embedding map and the worst verification errors, as library calls and as
`facenet-hf plot map|errors` on the bundled sample; the PNGs are checked for size and content."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facenet_hf.cli import main as cli_main
from facenet_hf.data.lfw import read_pairs
from facenet_hf.evaluation import (
    EmbeddingTable,
    plot_embedding_map,
    plot_worst_pairs,
    save_embeddings,
    worst_pairs,
    write_table,
)
from facenet_hf.evaluation.plots_apps import DPI, embedding_map_coordinates
from facenet_hf.model import FaceNet


def png_pixels(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """The PNG's RGB pixels, after checking it is a PNG (of ``size`` inches at the plots' DPI)."""
    with Image.open(path) as im:
        assert im.format == "PNG"
        if size is not None:
            expected = (size[0] * DPI, size[1] * DPI)
            assert all(abs(got - want) <= 1 for got, want in zip(im.size, expected, strict=True)), im.size
        return np.asarray(im.convert("RGB"), dtype=np.int64)


def colourful_fraction(px: np.ndarray) -> float:
    """Share of strongly coloured pixels (not white, black or grey)."""
    return float(((px.max(axis=-1) - px.min(axis=-1)) > 60).mean())


def clustered(n_ids: int = 12, per: int = 8, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centres = 3 * rng.normal(size=(n_ids, dim))
    ids = np.repeat(np.arange(n_ids), per)
    return centres[ids] + rng.normal(size=(ids.size, dim)), [f"person_{i:02d}" for i in ids]


# -- worst pairs: a case worked by hand --------------------------------------------------------------------------
D = [0.10, 0.90, 0.30, 1.50, 0.20, 2.00, 0.25, 0.20, 1.50]
SAME = [0, 1, 0, 1, 0, 1, 0, 0, 1]


def test_worst_pairs_by_hand():
    # different pairs: 0 (0.10), 2 (0.30), 4 (0.20), 6 (0.25), 7 (0.20); same: 1 (0.90), 3 (1.50), 5 (2.00), 8 (1.50)
    fa, fr = worst_pairs(D, SAME, threshold=1.0, n=3)
    assert fa.tolist() == [0, 4, 7]  # the closest impostors; the tie 4 / 7 in pair order
    assert fr.tolist() == [5, 3, 8]  # the farthest genuine pairs, > 1.0 only (pair 1 is accepted)
    fa, fr = worst_pairs(D, SAME, threshold=0.22, n=8)
    assert fa.tolist() == [0, 4, 7] and fr.tolist() == [5, 3, 8, 1]
    fa, fr = worst_pairs(D, SAME, threshold=None, n=8)  # no threshold: every pair of each kind, worst first
    assert fa.tolist() == [0, 4, 7, 6, 2] and fr.tolist() == [5, 3, 8, 1]
    fa, fr = worst_pairs(D, SAME, threshold=5.0, n=2)
    assert fa.tolist() == [0, 4] and fr.tolist() == []
    with pytest.raises(ValueError, match="one length"):
        worst_pairs(D, SAME[:-1])
    with pytest.raises(ValueError, match="finite"):
        worst_pairs([np.nan, 1.0], [0, 1])


# -- the map ----------------------------------------------------------------------------------------------------
def test_pca_coordinates_are_the_principal_components():
    from sklearn.decomposition import PCA

    x, _ = clustered()
    ours = embedding_map_coordinates(x, method="pca")
    theirs = PCA(n_components=2).fit_transform(x)
    for k in range(2):  # equal up to the sign of each axis
        assert np.allclose(ours[:, k], theirs[:, k], atol=1e-8) or np.allclose(
            ours[:, k], -theirs[:, k], atol=1e-8
        )


def test_tsne_map_keeps_people_together_and_plots(tmp_path):
    x, ids = clustered(n_ids=6, per=8)
    xy = embedding_map_coordinates(x, method="tsne", seed=0)
    assert xy.shape == (48, 2) and np.all(np.isfinite(xy))
    d = np.sum((xy[:, None] - xy[None]) ** 2, axis=-1)
    np.fill_diagonal(d, np.inf)
    names = np.asarray(ids)
    assert np.mean(names[d.argmin(axis=1)] == names) > 0.9  # nearest neighbour on the map: same person
    out = plot_embedding_map(x, ids, tmp_path / "tsne.png", method="tsne", top=6)
    px = png_pixels(out, (7.6, 6.0))
    assert colourful_fraction(px) > 0.005


def test_map_colours_the_top_identities_and_checks_input(tmp_path):
    x, ids = clustered()
    out = plot_embedding_map(x, ids, tmp_path / "map.png", method="pca", top=5)
    px = png_pixels(out, (7.6, 6.0))
    assert colourful_fraction(px) > 0.005 and px.std() > 10
    plain = png_pixels(plot_embedding_map(x, None, tmp_path / "plain.png", method="pca"), (7.6, 6.0))
    grey = png_pixels(plot_embedding_map(x, ids, tmp_path / "grey.png", method="pca", top=0), (7.6, 6.0))
    assert colourful_fraction(grey) < colourful_fraction(px) and colourful_fraction(plain) > 0.002
    with pytest.raises(ValueError, match="labels for"):
        plot_embedding_map(x, ids[:-1], tmp_path / "bad.png", method="pca")
    bad = x.copy()
    bad[4, 2] = np.inf
    with pytest.raises(ValueError, match=r"rows \[4\]"):
        embedding_map_coordinates(bad, method="pca")
    with pytest.raises(ValueError, match="at least 3"):
        embedding_map_coordinates(x[:2], method="pca")
    with pytest.raises(ValueError, match="method must be"):
        embedding_map_coordinates(x, method="umap")


# -- the worst pairs' picture -----------------------------------------------------------------------------------
def test_worst_pairs_picture(lfw_sample, tmp_path):
    pairs = read_pairs(lfw_sample / "pairs.txt").select_folds([1])
    p1, p2 = pairs.paths()
    d = np.where(pairs.is_same, 1.2, 0.1) + np.linspace(0.0, 0.5, len(p1))  # every pair is an error
    out = plot_worst_pairs(
        list(zip(p1, p2, strict=True)),
        d,
        pairs.is_same,
        1.0,
        tmp_path / "w.png",
        n=3,
        image_root=lfw_sample / "lfw-deepfunneled",
    )
    assert [a.size for a in worst_pairs(d, pairs.is_same, 1.0, 3)] == [3, 3]
    px = png_pixels(out, (8.0, 1.85 * 3 + 0.8))
    assert px.std() > 40 and colourful_fraction(px) > 0.1  # photos, not an empty grid
    # pictures that cannot be read are grey tiles, not a crash; no error at all draws "none"
    out = plot_worst_pairs(
        [("gone/a.jpg", "gone/b.jpg")] * 2, [0.1, 0.2], [False, True], 0.5, tmp_path / "x.png"
    )
    assert png_pixels(out, (8.0, 1.85 + 0.8)).std() > 10
    with pytest.raises(ValueError, match="1 pairs but 2 distances"):
        plot_worst_pairs([("a", "b")], [0.1, 0.2], [0, 1], 0.5, tmp_path / "y.png")


# -- the CLI ----------------------------------------------------------------------------------------------------
@pytest.fixture()
def sample_table_file(lfw_sample, tmp_path) -> Path:
    root = lfw_sample / "lfw-deepfunneled"
    people = sorted(p for p in root.iterdir() if len(list(p.iterdir())) >= 4)[:12]
    files = [f for p in people for f in sorted(p.iterdir())]
    x, _ = clustered(n_ids=len(people), per=1)
    rng = np.random.default_rng(3)
    emb = np.stack([x[people.index(f.parent)] + 0.3 * rng.normal(size=x.shape[1]) for f in files])
    return write_table(
        tmp_path / "people.parquet",
        EmbeddingTable([str(f) for f in files], emb, [f.parent.name for f in files]),
    )


def test_cli_map_by_identity_and_by_cluster(sample_table_file, tmp_path, capsys):
    out = tmp_path / "map.png"
    assert (
        cli_main(["plot", "map", str(sample_table_file), "--out", str(out), "--method", "pca", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert result["colour_by"] == "identity" and result["groups"] == 12 and result["points"] == result["rows"]
    assert colourful_fraction(png_pixels(out, (7.6, 6.0))) > 0.005
    # colour by the clusters of `facenet-hf cluster`, at most 20 points
    clusters = tmp_path / "clusters"
    assert (
        cli_main(["cluster", str(sample_table_file), "--out", str(clusters), "--threshold", "1.0", "--json"])
        == 0
    )
    capsys.readouterr()
    argv = ["plot", "map", str(sample_table_file), "--out", str(out), "--method", "pca"]
    assert cli_main([*argv, "--assignments", str(clusters / "assignments.csv"), "--max-points", "20"]) == 0
    text = capsys.readouterr().out
    assert f"pca map of 20 of {result['rows']} embeddings, coloured by cluster" in text
    assert colourful_fraction(png_pixels(out, (7.6, 6.0))) > 0.002


def test_cli_errors_from_embeddings_shows_the_planted_mistakes(lfw_sample, tmp_path, capsys):
    pairs = read_pairs(lfw_sample / "pairs.txt")
    p1, p2 = pairs.paths()
    images = sorted(set(p1) | set(p2))
    rng = np.random.default_rng(0)
    people = sorted({p.split("/")[0] for p in images})
    centre = {name: rng.normal(size=32) for name in people}
    emb = {p: centre[p.split("/")[0]] + 0.2 * rng.normal(size=32) for p in images}
    # plant the two worst errors: a different-person pair made identical, a same-person pair made opposite
    fa = int(np.flatnonzero(~pairs.is_same)[3])
    fr = int(np.flatnonzero(pairs.is_same)[5])
    emb[p2[fa]] = emb[p1[fa]].copy()
    emb[p2[fr]] = -emb[p1[fr]]
    unit = np.stack([emb[p] / np.linalg.norm(emb[p]) for p in images])
    # a table made by `facenet-hf embed` of the LFW folder: full paths under --lfw-dir
    lfw = lfw_sample / "lfw-deepfunneled"
    emb_file = save_embeddings(tmp_path / "lfw.npz", [str(lfw / p) for p in images], unit)
    out = tmp_path / "errors.png"
    argv = [
        "plot",
        "errors",
        "--embeddings",
        str(emb_file),
        "--lfw-dir",
        str(lfw),
        "--pairs",
        str(lfw_sample / "pairs.txt"),
    ]
    assert cli_main([*argv, "--out", str(out), "--n", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["worst_false_accepts"][0] == {"a": p1[fa], "b": p2[fa], "distance": 0.0}
    assert r["worst_false_rejects"][0] == {"a": p1[fr], "b": p2[fr], "distance": pytest.approx(4.0)}
    assert r["pairs"] == 120 and r["threshold_source"].startswith("best-accuracy")
    assert r["false_accepts"] >= 1 and r["false_rejects"] >= 1
    px = png_pixels(
        out, (8.0, 1.85 * max(len(r["worst_false_accepts"]), len(r["worst_false_rejects"])) + 0.8)
    )
    assert px.std() > 40
    assert cli_main([*argv, "--out", str(out), "--threshold", "0.5"]) == 0
    assert "threshold 0.5 (--threshold)" in capsys.readouterr().out


def test_cli_errors_with_a_model(lfw_sample, tmp_path, capsys):
    model = tmp_path / "model"
    FaceNet(backbone="resnet18", embedding_dim=16, image_size=32).eval().save_pretrained(model)
    out = tmp_path / "errors.png"
    argv = ["plot", "errors", "--model", str(model), "--lfw-dir", str(lfw_sample / "lfw-deepfunneled")]
    argv += ["--pairs", str(lfw_sample / "pairs.txt"), "--folds", "1", "--out", str(out), "--json"]
    assert cli_main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["pairs"] == 12 and "model has none" in r["threshold_source"]
    assert r["false_accepts"] + r["false_rejects"] == round(12 * (1 - r["accuracy_at_threshold"]))
    assert png_pixels(out).std() > 40


def test_cli_plot_errors_are_one_line_naming_the_file(lfw_sample, tmp_path, capsys):
    def run(*argv: str) -> str:
        assert cli_main(["plot", *argv]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("facenet-hf plot: ") and len(err.splitlines()) == 1
        return err

    missing = tmp_path / "none.parquet"
    assert str(missing) in run("map", str(missing), "--out", str(tmp_path / "m.png"))
    t = EmbeddingTable(["a", "b", "c", "d"], np.eye(4))
    t.embeddings[1, 1] = np.nan
    nan = write_table(tmp_path / "nan.parquet", t)
    err = run("map", str(nan), "--out", str(tmp_path / "m.png"), "--method", "pca")
    assert str(nan) in err and "NaN" in err
    pairs = str(lfw_sample / "pairs.txt")
    err = run(
        "errors",
        "--embeddings",
        str(nan.with_suffix(".npz")),
        "--lfw-dir",
        "x",
        "--pairs",
        pairs,
        "--out",
        "e.png",
    )
    assert "nan.npz" in err
    assert "nope.txt" in run(
        "errors",
        "--embeddings",
        str(nan),
        "--lfw-dir",
        "x",
        "--pairs",
        str(tmp_path / "nope.txt"),
        "--out",
        "e.png",
    )
    assert not (tmp_path / "m.png").exists()
    with pytest.raises(SystemExit) as e:
        cli_main(["plot", "--help"])
    assert e.value.code == 0 and "facenet-hf plot errors --model" in capsys.readouterr().out

"""Tests of facenet_hf.losses against a brute-force pure-Python triple-loop reference."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.profiler import ProfilerActivity, profile

from facenet_hf.losses import MINING_MODES, CPUTuning, TripletLoss, pairwise_distances, sort_rows

STAT_KEYS = {"frac_active", "mean_pos_dist", "mean_neg_dist", "num_triplets"}


# ----------------------------------------------------------------------------------------------------------------
# Brute-force reference: distances from explicit differences in float64, triplets chosen by Python loops, the loss
# rebuilt with torch autograd on the chosen triplets only.
# ----------------------------------------------------------------------------------------------------------------
def _ref_distances(e: torch.Tensor, squared: bool) -> torch.Tensor:
    d = ((e[:, None, :] - e[None, :, :]) ** 2).sum(-1)
    if squared:
        return d
    pos = d > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, d, 1.0)), 0.0)


def _select(dist: list[list[float]], labels: list[int], margin: float, mining: str) -> dict:
    """Triplets by the documented rules, with plain loops (ties: lowest index)."""
    b = len(labels)
    pos = [[p for p in range(b) if p != a and labels[p] == labels[a]] for a in range(b)]
    neg = [[n for n in range(b) if labels[n] != labels[a]] for a in range(b)]
    triplets: list[tuple[int, int, int]] = []
    n_all = 0
    if mining == "semihard":
        for a in range(b):
            if not neg[a]:
                continue
            for p in pos[a]:
                farther = [n for n in neg[a] if dist[a][n] > dist[a][p]]
                if farther:
                    n = min(farther, key=lambda n, a=a: dist[a][n])
                else:
                    n = max(neg[a], key=lambda n, a=a: dist[a][n])
                triplets.append((a, p, n))
    elif mining == "batch_hard":
        for a in range(b):
            if pos[a] and neg[a]:
                p = max(pos[a], key=lambda p, a=a: dist[a][p])
                n = min(neg[a], key=lambda n, a=a: dist[a][n])
                triplets.append((a, p, n))
    else:
        for a in range(b):
            for p in pos[a]:
                for n in neg[a]:
                    n_all += 1
                    if dist[a][p] - dist[a][n] + margin > 0:
                        triplets.append((a, p, n))
    active = [t for t in triplets if dist[t[0]][t[1]] - dist[t[0]][t[2]] + margin > 0]
    if mining != "batch_all":
        n_all = len(triplets)
    valid_pos = [(a, p) for a in range(b) if neg[a] for p in pos[a]]
    valid_neg = [(a, n) for a in range(b) if pos[a] for n in neg[a]]
    return {"triplets": triplets, "n_active": len(active), "n_all": n_all, "pos": valid_pos, "neg": valid_neg}


def reference(
    emb: torch.Tensor, labels: torch.Tensor, margin: float, mining: str, squared: bool
) -> tuple[float, torch.Tensor, dict[str, float]]:
    """(loss, gradient w.r.t. emb in float64, stats) computed by brute force."""
    e = emb.detach().double().clone().requires_grad_(True)
    d = _ref_distances(e, squared)
    dv = d.detach().tolist()
    sel = _select(dv, labels.tolist(), margin, mining)
    trip = sel["triplets"]
    if trip:
        a, p, n = (torch.tensor(x) for x in zip(*trip, strict=True))
        terms = torch.relu(d[a, p] - d[a, n] + margin)
        loss = terms.sum() / (len(trip) if mining != "batch_all" else max(sel["n_active"], 1))
    else:
        loss = e.sum() * 0.0
    loss.backward()
    stats = {
        "frac_active": sel["n_active"] / max(sel["n_all"], 1),
        "num_triplets": float(sel["n_active"] if mining == "batch_all" else len(trip)),
        "mean_pos_dist": sum(dv[a][p] for a, p in sel["pos"]) / max(len(sel["pos"]), 1),
        "mean_neg_dist": sum(dv[a][n] for a, n in sel["neg"]) / max(len(sel["neg"]), 1),
    }
    return loss.item(), e.grad, stats


def _impl(dense: bool | None) -> str:
    """The ``semihard`` constructor argument: None = by device, True = dense, False = compact (CPU)."""
    return "auto" if dense is None else "dense" if dense else "compact"


def _run(
    emb: torch.Tensor,
    labels: torch.Tensor,
    margin: float,
    mining: str,
    squared: bool,
    dense: bool | None = None,
    tuning: CPUTuning | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    x = emb.detach().clone().requires_grad_(True)
    loss_fn = TripletLoss(margin=margin, mining=mining, squared=squared, cpu_tuning=tuning)
    loss_fn.semihard = _impl(dense)
    loss, stats = loss_fn(x, labels)
    loss.backward()
    return loss, x.grad, stats


def _unit(b: int, dim: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(b, dim, generator=g, dtype=torch.float64), dim=1).to(
        dtype
    )


def _pk(p: int, k: int) -> torch.Tensor:
    return torch.arange(p).repeat_interleave(k)


def _random_labels(b: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, classes, (b,), generator=torch.Generator().manual_seed(seed))


LAYOUTS = {
    "pk4x3": lambda seed: _pk(4, 3),
    "pk5x4_shuffled": lambda seed: _pk(5, 4)[
        torch.randperm(20, generator=torch.Generator().manual_seed(seed))
    ],
    "random_multiset": lambda seed: _random_labels(22, 6, seed),
    "few_classes": lambda seed: _random_labels(16, 2, seed),
}
# (mining, dense): "semihard" is checked in both its implementations (compact = CPU default, dense = accelerators).
IMPLS = [("semihard", None), ("semihard", True), ("batch_hard", None), ("batch_all", None)]


def _check_against_reference(emb, labels, margin, mining, squared, dense, grad_rtol=1e-4, tuning=None):
    loss, grad, stats = _run(emb, labels, margin, mining, squared, dense, tuning)
    ref_loss, ref_grad, ref_stats = reference(emb, labels, margin, mining, squared)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    scale = max(ref_grad.abs().max().item(), 1e-3)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=grad_rtol, atol=grad_rtol * scale)
    assert set(stats) == STAT_KEYS
    for key, value in stats.items():
        assert value.dim() == 0 and value.dtype == torch.float32 and not value.requires_grad, key
        assert value.item() == pytest.approx(ref_stats[key], rel=1e-5, abs=1e-6), key


# ----------------------------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mining", "dense"), IMPLS)
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_brute_force(mining, dense, squared, layout, dtype):
    for seed in range(2):
        labels = LAYOUTS[layout](seed)
        emb = _unit(labels.numel(), 6, seed=100 * seed + len(layout), dtype=dtype)
        _check_against_reference(emb, labels, 0.2, mining, squared, dense)


@pytest.mark.parametrize(("mining", "dense"), IMPLS)
def test_matches_brute_force_larger_margin_unnormalised(mining, dense):
    labels = _pk(8, 4)
    emb = 3.0 * torch.randn(32, 5, generator=torch.Generator().manual_seed(7))
    _check_against_reference(emb, labels, 1.5, mining, True, dense)
    _check_against_reference(emb, labels, 1.5, mining, False, dense)


@pytest.mark.parametrize(("mining", "dense"), IMPLS)
def test_bf16_input_is_cast_up(mining, dense):
    labels = _pk(4, 4)
    emb = _unit(16, 8, seed=3, dtype=torch.bfloat16)
    loss, grad, _ = _run(emb, labels, 0.2, mining, True, dense)
    ref_loss, ref_grad, _ = reference(emb.float(), labels, 0.2, mining, True)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert loss.item() == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-2, atol=1e-2 * ref_grad.abs().max().item())


@pytest.mark.parametrize("mining", MINING_MODES)
def test_autocast_does_not_change_the_result(mining):
    labels = _pk(4, 4)
    emb = _unit(16, 8, seed=5)
    plain, _, _ = _run(emb, labels, 0.2, mining, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _, _ = _run(emb, labels, 0.2, mining, True)
    assert auto.dtype == torch.float32
    assert auto.item() == plain.item()


def test_dense_and_compact_semihard_agree_on_a_large_batch():
    # Large enough for the threaded CPU sort (16 rows a thread); a shuffled P x K batch plus a few singletons.
    tuning = CPUTuning(min_rows_per_thread=16)
    labels = torch.cat([_pk(40, 7), torch.arange(100, 110)])
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    emb = _unit(labels.numel(), 16, seed=11)
    for squared in (True, False):
        compact = _run(emb, labels, 0.2, "semihard", squared, dense=False, tuning=tuning)
        dense = _run(emb, labels, 0.2, "semihard", squared, dense=True, tuning=tuning)
        torch.testing.assert_close(compact[0], dense[0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(compact[1], dense[1], rtol=1e-4, atol=1e-7)
        for key in STAT_KEYS:
            torch.testing.assert_close(compact[2][key], dense[2][key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("ratio", [0, 10**9], ids=["sparse", "dense"])
@pytest.mark.parametrize("mining", ["semihard", "batch_hard"])
def test_pair_gradient_matches_brute_force_with_sparse_and_dense_s(ratio, mining):
    # The gradient built from the selected pairs (no backward through the B x B matrix), both ways of forming S.
    tuning = CPUTuning(dense_pair_grad_ratio=ratio)
    labels = _pk(6, 4)[torch.randperm(24, generator=torch.Generator().manual_seed(3))]
    emb = _unit(24, 6, seed=21)
    for squared in (True, False):
        _check_against_reference(emb, labels, 0.2, mining, squared, None, tuning=tuning)


def test_threaded_sort_matches_numpy():
    keys = torch.randint(0, 2**62, (37, 29), generator=torch.Generator().manual_seed(0))
    expected = np.sort(keys.numpy(), axis=1)
    assert np.array_equal(sort_rows(keys.clone(), min_rows_per_thread=1, threads=3).numpy(), expected)


# ----------------------------------------------------------------------------------------------------------------
# Hand-built cases (1-D embeddings, squared distances, margin 0.2)
# ----------------------------------------------------------------------------------------------------------------
def _line(*xs: float) -> torch.Tensor:
    return torch.tensor([[x, 0.0] for x in xs])


def test_semihard_picks_nearest_farther_negative_and_falls_back_to_farthest():
    # a=0 and p=1 share a label; negatives (own labels) at 0.5, 1.2, 1.6.
    emb, labels = _line(0.0, 1.0, 0.5, 1.2, 1.6), torch.tensor([0, 0, 1, 2, 3])
    # (a, p): d_ap = 1; negatives at d = 0.25, 1.44, 2.56 -> semihard 1.44 -> max(1 - 1.44 + 0.2, 0) = 0.
    # (p, a): d_pa = 1; negatives at d = 0.25, 0.04, 0.36 -> none farther -> farthest 0.36 -> 0.84.
    loss, stats = TripletLoss(0.2, "semihard")(emb, labels)
    assert loss.item() == pytest.approx(0.42, abs=1e-6)
    assert stats["num_triplets"].item() == 2
    assert stats["frac_active"].item() == pytest.approx(0.5)
    assert stats["mean_pos_dist"].item() == pytest.approx(1.0)
    # Valid negative pairs: those of the two anchors that have a positive.
    assert stats["mean_neg_dist"].item() == pytest.approx(
        (0.25 + 1.44 + 2.56 + 0.25 + 0.04 + 0.36) / 6, abs=1e-6
    )
    # Same batch, the other modes: batch_hard uses the nearest negatives 0.25 and 0.04.
    loss, stats = TripletLoss(0.2, "batch_hard")(emb, labels)
    assert loss.item() == pytest.approx((0.95 + 1.16) / 2, abs=1e-6)
    assert stats["num_triplets"].item() == 2
    # batch_all: hinges 0.95, -0.24, -1.36 (anchor a) and 1.16, 0.84, 0.95 (anchor p): 4 of 6 active.
    loss, stats = TripletLoss(0.2, "batch_all")(emb, labels)
    assert loss.item() == pytest.approx((0.95 + 1.16 + 0.84 + 0.95) / 4, abs=1e-6)
    assert stats["num_triplets"].item() == 4
    assert stats["frac_active"].item() == pytest.approx(4 / 6)


@pytest.mark.parametrize("dense", [False, True])
def test_semihard_negative_must_be_strictly_farther(dense):
    # a=0, p=1 (d=1); negative -1 is exactly as far (d=1), negative 3 farther (d=9): the tie is not "farther".
    emb, labels = _line(0.0, 1.0, -1.0, 3.0), torch.tensor([0, 0, 1, 2])
    loss_fn = TripletLoss(0.2, "semihard")
    loss_fn.semihard = _impl(dense)
    loss, stats = loss_fn(emb, labels)
    # (a,p) -> n=3 (d=9): 0; (p,a) -> negatives at d=4 and d=4, both farther: 0. Picking the tie would give 0.1.
    assert loss.item() == 0.0
    assert stats["frac_active"].item() == 0.0


@pytest.mark.parametrize("dense", [False, True])
def test_semihard_fallback_when_no_negative_is_farther(dense):
    emb, labels = _line(0.0, 2.0, 1.0, -1.5), torch.tensor([0, 0, 1, 2])
    # (a,p): d_ap=4, negatives 1 and 2.25 -> farthest 2.25 -> 1.95. (p,a): negatives 1 and 12.25 -> 12.25 -> 0.
    loss_fn = TripletLoss(0.2, "semihard")
    loss_fn.semihard = _impl(dense)
    loss, _ = loss_fn(emb, labels)
    assert loss.item() == pytest.approx(1.95 / 2, abs=1e-6)


def test_semihard_gradient_goes_to_the_selected_negative_only():
    emb = _line(0.0, 1.0, 0.5, 1.2, 1.6).requires_grad_(True)
    loss, _ = TripletLoss(0.2, "semihard")(emb, torch.tensor([0, 0, 1, 2, 3]))
    loss.backward()
    # Only (p=1, a=0, n=1.6) is active: loss = (d(1,0) - d(1,1.6) + 0.2) / 2.
    assert emb.grad[2].abs().sum().item() == 0.0 and emb.grad[3].abs().sum().item() == 0.0
    # d/dx_n of -(x_p - x_n)^2 / 2 = (x_p - x_n) = -0.6
    assert emb.grad[4, 0].item() == pytest.approx(-0.6, abs=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Degenerate inputs
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("mining", "dense"), IMPLS)
@pytest.mark.parametrize("squared", [True, False])
def test_all_equal_embeddings(mining, dense, squared):
    emb = torch.ones(12, 4) / 2
    loss, grad, stats = _run(emb, _pk(3, 4), 0.2, mining, squared, dense)
    # Every distance is 0: every triplet has loss exactly the margin.
    assert loss.item() == pytest.approx(0.2)
    assert torch.isfinite(grad).all()
    assert stats["frac_active"].item() == 1.0
    assert stats["mean_pos_dist"].item() == 0.0 and stats["mean_neg_dist"].item() == 0.0


@pytest.mark.parametrize(("mining", "dense"), IMPLS)
@pytest.mark.parametrize("squared", [True, False])
def test_duplicate_embeddings(mining, dense, squared):
    base = _unit(6, 4, seed=2)
    emb = base[torch.tensor([0, 0, 1, 1, 2, 3, 3, 4, 5, 5, 0, 2])]  # duplicates within and across identities
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    loss, grad, stats = _run(emb, labels, 0.2, mining, squared, dense)
    ref_loss, _, ref_stats = reference(emb, labels, 0.2, mining, squared)
    assert torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(ref_loss, rel=1e-4, abs=1e-5)
    assert stats["num_triplets"].item() == ref_stats["num_triplets"]


@pytest.mark.parametrize(("mining", "dense"), IMPLS)
@pytest.mark.parametrize(
    "labels",
    [torch.zeros(6, dtype=torch.long), torch.arange(6), torch.tensor([3]), torch.zeros(0, dtype=torch.long)],
)
def test_no_valid_triplet_gives_zero_with_gradient(mining, dense, labels):
    emb = _unit(labels.numel(), 4, seed=1).requires_grad_(True)
    loss_fn = TripletLoss(0.2, mining)
    loss_fn.semihard = _impl(dense)
    loss, stats = loss_fn(emb, labels)
    assert loss.item() == 0.0 and loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    assert emb.grad is not None and (emb.grad == 0).all()
    assert {k: v.item() for k, v in stats.items()} == dict.fromkeys(STAT_KEYS, 0.0)


def test_single_identity_with_a_stranger_counts_only_valid_pairs():
    labels = torch.tensor([0, 0, 0, 1])
    emb = _unit(4, 3, seed=9)
    for mining in MINING_MODES:
        _check_against_reference(emb, labels, 0.2, mining, True, None)


def test_deterministic_algorithms_mode():
    emb, labels = _unit(16, 4, seed=4), _pk(4, 4)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for mining, dense in IMPLS:
            _run(emb, labels, 0.2, mining, True, dense)
    finally:
        torch.use_deterministic_algorithms(before)


# ----------------------------------------------------------------------------------------------------------------
# pairwise_distances
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_pairwise_distances_values_and_dtype(dtype):
    emb = torch.randn(20, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = _ref_distances(emb.double(), squared=True)
    for squared in (True, False):
        d = pairwise_distances(emb, squared=squared)
        assert d.dtype == torch.float32 and d.shape == (20, 20)
        assert (d >= 0).all() and (d.diagonal() == 0).all()
        expected = ref if squared else ref.sqrt()
        torch.testing.assert_close(d.double(), expected, rtol=1e-5, atol=1e-5)


def test_pairwise_distances_under_autocast_is_float32():
    emb = torch.randn(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = pairwise_distances(emb)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, pairwise_distances(emb))


@pytest.mark.parametrize("squared", [True, False])
def test_pairwise_distances_gradient_is_finite_at_zero(squared):
    emb = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0], [3.0, -1.0]], requires_grad=True)
    d = pairwise_distances(emb, squared=squared)
    assert d[0, 1].item() == 0.0 and d[2, 3].item() == 0.0
    d.sum().backward()
    assert torch.isfinite(emb.grad).all()


def test_pairwise_distances_rejects_non_matrix():
    with pytest.raises(ValueError, match="2-D"):
        pairwise_distances(torch.randn(4))


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("margin", [0, -0.1, float("nan"), float("inf"), "big", True, None])
def test_bad_margin(margin):
    with pytest.raises(ValueError, match="margin"):
        TripletLoss(margin=margin)


def test_bad_mining_names_value_and_choices():
    with pytest.raises(ValueError) as err:
        TripletLoss(mining="hardest")
    message = str(err.value)
    assert "'hardest'" in message and all(mode in message for mode in MINING_MODES)


def test_accepts_numpy_and_int_margins():
    assert TripletLoss(margin=np.float32(0.5)).margin == 0.5
    assert TripletLoss(margin=1).margin == 1.0


def test_bad_shapes():
    loss_fn = TripletLoss()
    with pytest.raises(ValueError, match="2-D"):
        loss_fn(torch.randn(4), torch.arange(4))
    with pytest.raises(ValueError, match="labels"):
        loss_fn(torch.randn(4, 2), torch.arange(3))
    with pytest.raises(ValueError, match="integers"):
        loss_fn(torch.randn(4, 2), torch.zeros(4))


# ----------------------------------------------------------------------------------------------------------------
# Memory: nothing B x B x B
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mining", MINING_MODES)
def test_memory_is_quadratic(mining):
    b = 512
    emb = _unit(b, 32, seed=0).requires_grad_(True)
    labels = _pk(b // 8, 8)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = TripletLoss(0.2, mining)(emb, labels)
        loss.backward()
    biggest = max(event.self_cpu_memory_usage for event in prof.events())
    # The largest tensors are B x B (+1) int64 keys; a B^3 float32 tensor would be 128x this bound.
    assert biggest <= 8 * b * (b + 1) * 2, biggest


@pytest.mark.parametrize("mining", MINING_MODES)
def test_batch_of_1024_is_fast(mining):
    emb = _unit(1024, 128, seed=0).requires_grad_(True)
    labels = _pk(128, 8)
    loss_fn = TripletLoss(0.2, mining)
    start = time.process_time()  # CPU time of this process: steady on a shared, busy machine
    loss, stats = loss_fn(emb, labels)
    loss.backward()
    # A B^3 implementation needs ~4 GB and many CPU-seconds here; the O(B^2 log B) one ~0.1 CPU-second.
    assert time.process_time() - start < 10.0
    assert torch.isfinite(loss) and stats["num_triplets"].item() > 0


# ----------------------------------------------------------------------------------------------------------------
# Property: any label multiset and any finite embeddings give a finite, non-negative loss and finite gradients
# ----------------------------------------------------------------------------------------------------------------
@st.composite
def _batches(draw):
    b = draw(st.integers(0, 14))
    dim = draw(st.integers(1, 5))
    labels = draw(st.lists(st.integers(0, 4), min_size=b, max_size=b))
    values = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
    # Mix in exact repeats: duplicates are the hard case for ties and sqrt.
    pool = draw(st.lists(st.lists(values, min_size=dim, max_size=dim), min_size=1, max_size=4))
    rows = draw(
        st.lists(
            st.one_of(st.sampled_from(pool), st.lists(values, min_size=dim, max_size=dim)),
            min_size=b,
            max_size=b,
        )
    )
    emb = torch.tensor(rows, dtype=torch.float32).reshape(b, dim)
    return emb, torch.tensor(labels, dtype=torch.long)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=_batches(), squared=st.booleans(), margin=st.sampled_from([0.2, 1.0]))
def test_property_finite_non_negative(batch, squared, margin):
    emb, labels = batch
    for mining, dense in IMPLS:
        loss, grad, stats = _run(emb, labels, margin, mining, squared, dense)
        assert torch.isfinite(loss) and loss.item() >= 0.0, (mining, dense)
        assert torch.isfinite(grad).all(), (mining, dense)
        assert 0.0 <= stats["frac_active"].item() <= 1.0
        assert all(torch.isfinite(v) and v.item() >= 0 for v in stats.values())


# ----------------------------------------------------------------------------------------------------------------
# The mining benchmark runs end to end (tiny sizes)
# ----------------------------------------------------------------------------------------------------------------
def test_bench_mining_smoke(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_mining.py"
    spec = importlib.util.spec_from_file_location("bench_mining_under_test", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--k", "4", "--no-pml", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)  # --quick runs on 1 thread
    table = capsys.readouterr().out
    assert "| B | floor ms |" in table and "semihard ms (x floor)" in table
    results = json.loads(out.read_text())["results"]
    assert {(r["size"], r["method"]) for r in results} == {
        (b, m) for b in (16, 32) for m in ("floor", "dist_fwd", *MINING_MODES)
    }


@pytest.mark.parametrize(("mining", "dense"), IMPLS)
@pytest.mark.parametrize("rows", [[5], list(range(16))], ids=["one_row", "all_rows"])
def test_nan_embeddings_give_a_nan_loss(mining, dense, rows):
    # The engine's non-finite policy needs a NaN loss when the model emits NaN: a NaN distance must never just
    # make its triplets look inactive (the pair gradient reads the distances of every pair, active or not).
    emb = _unit(16, 8, seed=2).clone()
    emb[rows] = float("nan")
    loss, _, _ = _run(emb, _pk(4, 4), 0.2, mining, True, dense)
    assert torch.isnan(loss)

"""P x K batch sampler: batch shape, seeding, resume, min_images / replacement rules, speed, properties."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from facenet_hf.data.sampler import PKBatchSampler


def _labels(seed: int = 0, n_ids: int = 40) -> np.ndarray:
    """A skewed label set: counts 1..30 (one identity with 1 image, some below k), shuffled."""
    rng = np.random.default_rng(seed)
    counts = np.r_[1, 2, 3, rng.integers(1, 31, n_ids - 3)]
    labels = np.repeat(np.arange(n_ids), counts)
    return labels[rng.permutation(labels.size)]


def _check_batches(labels: np.ndarray, sampler: PKBatchSampler, batches: list[list[int]]) -> None:
    p, k = sampler.p, sampler.k
    assert len(batches) == len(sampler)
    counts = np.bincount(labels)
    for batch in batches:
        assert len(batch) == p * k == sampler.batch_size
        lab = labels[np.asarray(batch)].reshape(p, k)
        assert (lab == lab[:, :1]).all(), "identity-major layout broken"
        assert len(set(lab[:, 0].tolist())) == p, "identities repeat within a batch"
        assert (counts[lab[:, 0]] >= sampler.min_images).all()
        if not sampler.replacement:
            assert len(set(batch)) == p * k, "an index repeats within a batch"
            assert (counts[lab[:, 0]] >= k).all()
        else:
            for row, ident in zip(np.asarray(batch).reshape(p, k), lab[:, 0], strict=True):
                # all distinct images of an identity come before any repeat
                assert len(set(row.tolist())) == min(k, counts[ident])


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize(("p", "k"), [(4, 2), (8, 4), (5, 3)])
def test_every_batch_is_p_identities_by_k(replacement, p, k):
    labels = _labels()
    sampler = PKBatchSampler(labels, p, k, seed=3, replacement=replacement)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        _check_batches(labels, sampler, list(sampler))


def test_attributes_length_and_usable_counts():
    labels = np.repeat(np.arange(6), [1, 2, 3, 4, 5, 10])
    s = PKBatchSampler(labels, 2, 4)
    assert s.batch_size == 8 and s.drop_last is True and (s.p, s.k) == (2, 4)
    assert s.num_usable_identities == 5 and s.num_usable_images == 24
    assert len(s) == 24 // 8
    s = PKBatchSampler(labels, 2, 4, replacement=False)
    assert s.num_usable_identities == 3 and s.num_usable_images == 19 and len(s) == 2
    assert len(PKBatchSampler(labels, 2, 4, num_batches=17)) == 17
    assert len(list(PKBatchSampler(labels, 2, 4, num_batches=17))) == 17
    assert len(PKBatchSampler(labels, 5, 4)) == 1  # at least one batch


def test_single_image_identities_never_appear():
    labels = np.r_[np.repeat(np.arange(5), 3), np.arange(100, 160)]  # 60 singletons
    for min_images in (2, 3):
        s = PKBatchSampler(labels, 3, 2, min_images=min_images, num_batches=50)
        used = np.unique(labels[np.concatenate(list(s))])
        assert set(used.tolist()) <= set(range(5))
    with pytest.raises(ValueError, match=r"only 0 of 65 identities \(75 labels\) have >= 4 images"):
        PKBatchSampler(labels, 3, 2, min_images=4)


def test_epochs_differ_and_seed_epoch_reproduce():
    labels = _labels()
    a = PKBatchSampler(labels, 4, 4, seed=7)
    b = PKBatchSampler(labels.tolist(), 4, 4, seed=7)
    e0 = list(a)
    assert a.epoch == 1  # the epoch advances by itself at the end of an iteration
    e1 = list(a)
    assert e0 != e1
    assert list(b) == e0 and list(b) == e1
    b.set_epoch(0)
    assert list(b) == e0
    assert list(PKBatchSampler(labels, 4, 4, seed=8)) != e0
    assert a.epoch_batches(1).tolist() == e1


def test_skip_and_state_dict_resume():
    labels = _labels()
    full = PKBatchSampler(labels, 4, 2, seed=1)
    full.set_epoch(5)
    expected = list(full)
    n = len(expected)
    assert n > 10

    s = PKBatchSampler(labels, 4, 2, seed=1)
    s.set_epoch(5)
    it = iter(s)
    head = [next(it) for _ in range(7)]
    state = s.state_dict()
    assert state == {"seed": 1, "epoch": 5, "skip": 7}

    resumed = PKBatchSampler(labels, 4, 2, seed=0)
    resumed.load_state_dict(state)
    assert head + list(resumed) == expected
    assert resumed.state_dict() == {"seed": 1, "epoch": 6, "skip": 0}

    again = PKBatchSampler(labels, 4, 2, seed=1)
    again.set_epoch(5)
    again.skip(3)
    again.set_epoch(5)  # same epoch (what accelerate does at each iteration): the skip stays
    assert list(again) == expected[3:]
    again.set_epoch(5)
    again.skip(4)
    again.set_epoch(6)  # another epoch: the skip is reset
    again.set_epoch(5)
    assert list(again) == expected
    with pytest.raises(ValueError, match=rf"skip must be an integer in 0..{n}"):
        again.skip(n + 1)
    with pytest.raises(KeyError, match="skip"):
        again.load_state_dict({"seed": 1, "epoch": 0})


def test_identities_in_proportion_to_images():
    labels = np.repeat(np.arange(20), np.r_[200, np.full(19, 20)])
    s = PKBatchSampler(labels, 4, 4, seed=0)
    used = np.bincount(labels[np.concatenate(list(s))], minlength=20)
    assert used.sum() == len(s) * 16
    # the big identity is in nearly every batch (at most once); the others about once each
    assert 0.75 * len(s) * 4 <= used[0] <= len(s) * 4
    assert (used[1:] >= 16).all() and used[1:].mean() >= 20


def test_works_with_a_torch_dataloader():
    torch = pytest.importorskip("torch")
    labels = _labels()
    sampler = PKBatchSampler(labels, 4, 2)
    loader = torch.utils.data.DataLoader(torch.arange(labels.size), batch_sampler=sampler)
    assert len(loader) == len(sampler)
    batches = [b.tolist() for b in loader]
    sampler.set_epoch(0)
    assert batches == list(sampler)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p": 1, "k": 2}, r"p must be an integer >= 2, got 1"),
        ({"p": 2, "k": 1}, r"k must be an integer >= 2, got 1"),
        ({"p": 2, "k": 2, "min_images": 0}, r"min_images must be an integer >= 1"),
        ({"p": 2, "k": 2, "seed": -1}, r"seed must be an integer >= 0"),
        ({"p": 2, "k": 2, "num_batches": 0}, r"num_batches must be None or an integer >= 1"),
        (
            {"p": 50, "k": 2},
            r"p=50 identities per batch, but only \d+ of 40 identities \(\d+ labels\) have >= 2 images",
        ),
        ({"p": 38, "k": 3, "replacement": False}, r"replacement=False needs >= k=3.*or allow replacement"),
    ],
)
def test_errors_up_front(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PKBatchSampler(_labels(), **kwargs)


def test_bad_labels():
    with pytest.raises(ValueError, match="integers, got dtype float64"):
        PKBatchSampler([0.0, 1.0], 2, 2)
    with pytest.raises(ValueError, match="one-dimensional"):
        PKBatchSampler(np.zeros((2, 2), dtype=int), 2, 2)
    with pytest.raises(ValueError, match="only 0 of 0 identities"):
        PKBatchSampler([], 2, 2)


@pytest.mark.slow
def test_vggface2_sized_epoch_is_fast():
    """3.3 M labels over 9,131 identities (VGGFace2-like counts): build + one epoch in well under 10 s."""
    rng = np.random.default_rng(0)
    counts = rng.integers(87, 640, 9131)
    counts = np.maximum(2, counts * 3_300_000 // counts.sum())
    labels = np.repeat(np.arange(9131), counts)[rng.permutation(int(counts.sum()))]
    t0 = time.perf_counter()
    sampler = PKBatchSampler(labels, 32, 4, seed=0)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    batches = sampler.epoch_batches(0)
    epoch = time.perf_counter() - t0
    assert batches.shape == (len(sampler), 128) and len(sampler) == labels.size // 128
    lab = labels[batches[:2000]].reshape(-1, 32, 4)
    assert (lab == lab[:, :, :1]).all()
    assert all(len(set(r.tolist())) == 32 for r in lab[:, :, 0])
    assert built + epoch < 10, (built, epoch)


@settings(max_examples=150, deadline=None)
@given(
    counts=st.lists(st.integers(1, 12), min_size=0, max_size=25),
    p=st.integers(1, 8),
    k=st.integers(1, 5),
    replacement=st.booleans(),
    min_images=st.integers(1, 4),
    num_batches=st.one_of(st.none(), st.integers(1, 12)),
    seed=st.integers(0, 2**32),
)
def test_property_valid_batches_or_clear_error(counts, p, k, replacement, min_images, num_batches, seed):
    labels = np.repeat(np.arange(len(counts)) * 3, counts)  # sparse label values
    labels = labels[np.random.default_rng(seed).permutation(labels.size)]
    need = min_images if replacement else max(min_images, k)
    usable = sum(c >= need for c in counts)
    try:
        sampler = PKBatchSampler(
            labels, p, k, seed=seed, replacement=replacement, min_images=min_images, num_batches=num_batches
        )
    except ValueError as err:
        assert p < 2 or k < 2 or usable < p, err
        assert str(p) in str(err) or str(k) in str(err)
        return
    assert p >= 2 and k >= 2 and usable >= p
    if num_batches is None:
        assert len(sampler) == max(1, sum(c for c in counts if c >= need) // (p * k))
    _check_batches(labels, sampler, list(sampler))

"""Triplet loss with online mining on a B x B distance matrix (FaceNet, Schroff et al. 2015).

Notation: ``d(i, j)`` is the distance between embeddings ``i`` and ``j`` of the batch; squared Euclidean when
``squared=True`` (FaceNet's choice), plain Euclidean otherwise. A *positive* of anchor ``a`` is any other sample
with the same label (``p != a``), a *negative* any sample with a different label. A triplet ``(a, p, n)`` is
*valid* when ``p`` is a positive and ``n`` a negative of ``a``; its loss is
``max(d(a, p) - d(a, n) + margin, 0)`` and it is *active* when that loss is > 0.

Mining modes (``MINING_MODES``), i.e. which triplets the loss averages over:

``"semihard"`` -- FaceNet's rule, identical to TF-Addons' ``triplet_semihard_loss``.
    Every anchor-positive pair ``(a, p)`` is used. Its negative is the *nearest negative that is farther than
    the positive*: the ``n`` minimising ``d(a, n)`` subject to ``d(a, n) > d(a, p)`` (strictly). When no
    negative is farther than the positive, the *farthest* negative (max ``d(a, n)``) is used instead. The loss
    is the mean over all such pairs (active or not); pairs whose anchor has no negative in the batch are
    excluded. ``num_triplets`` = number of pairs used; ``frac_active`` = fraction of them with loss > 0.
    This is NOT pytorch-metric-learning's ``TripletMarginMiner(type_of_triplets="semihard")``, which keeps
    *every* triplet with ``0 < d(a, n) - d(a, p) <= margin`` (and then averages over the kept triplets).

``"batch_hard"`` -- Hermans, Beyer & Leibe 2017 ("In Defense of the Triplet Loss").
    One triplet per anchor: its hardest positive (max ``d(a, p)``) and hardest negative (min ``d(a, n)``).
    Mean over the anchors that have at least one positive and one negative (``num_triplets`` of them);
    ``frac_active`` = fraction of those anchors whose triplet has loss > 0.

``"batch_all"`` -- every valid triplet (Hermans et al.'s "batch all").
    Loss = mean over the *active* valid triplets (0 when none is active); ``num_triplets`` = number of active
    triplets; ``frac_active`` = active / all valid triplets. Computed without a B x B x B tensor: per anchor,
    the negatives and the thresholds ``d(a, p) + margin`` are merged in one sort, so that for each pair the
    number of active negatives, and for each negative the number of pairs it is active for, come from
    cumulative counts.

Ties: an equal distance never counts as "farther" (semihard) and a hinge of exactly 0 is not active. When several
samples are equally near/far, which one is picked is deterministic but unspecified; it changes which sample
receives the gradient, never the loss value. Selection is made on the float32 distance matrix.

Gradients: after selection the loss is linear in the distances, ``sum_ij W_ij d(i, j)``, with ``W`` counting how
often each pair enters an active triplet with sign +1 (positive) or -1 (negative); its gradient is therefore
exactly the brute-force autograd gradient over the selected triplets (ReLU'(0) = 0). batch_all (and semihard's
accelerator variant) backpropagate through the whole B x B matrix. batch_hard and semihard on CPU, whose ``W``
has only O(B K) non-zeros, take the selected distances from the matrix but build the gradient from those pairs
alone (``_PairSum``: O(pairs x D), sparse on CPU), so their backward never touches the matrix. Memory is O(B^2).

Stats (detached 0-d float32 tensors): ``frac_active`` and ``num_triplets`` as above; ``mean_pos_dist`` and
``mean_neg_dist`` are the mean anchor-positive / anchor-negative distance over the *valid pairs*, i.e. the
ordered pairs that belong to at least one valid triplet (a positive pair whose anchor has a negative, a negative
pair whose anchor has a positive). A batch without any valid triplet gives loss 0 (still attached to the graph,
so ``backward()`` works and yields zero gradients) and all-zero stats.

The margin-softmax objectives (ArcFace, CosFace) are :class:`MarginSoftmaxLoss`, a classifier of the training
identities whose parameters train with the model (and stay out of the saved embedder); :class:`CombinedLoss`
adds one to the triplet loss with a weight.

All maths runs in float32 with autocast disabled, whatever the input dtype (bf16/fp16/float64 inputs are cast;
gradients flow back in the input dtype). The forward makes no ``.item()`` calls and, on accelerators, no host
syncs: every mode works on fixed-shape tensors there. Cost: one row-wise sort of B x B int64 keys for semihard
and batch_all, O(B^2 log B) time and O(B^2) memory; batch_hard needs only row-wise max/min. On CPU the sort runs
in NumPy (its SIMD sort is ~10x faster than ``torch.sort`` there) on ``torch.get_num_threads()`` threads, and
semihard switches to a variant that sorts only the negatives' keys and then works on the B*(K-1) positive pairs
in NumPy (dynamic shapes are free on CPU, and NumPy's per-call cost is a fraction of torch's on these small
arrays); both variants select the same triplets.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from facenet_hf.constants import MINING_MODES

__all__ = [
    "MARGIN_SOFTMAX_KINDS",
    "MINING_MODES",
    "SEMIHARD_IMPLS",
    "CPUTuning",
    "CombinedLoss",
    "MarginSoftmaxLoss",
    "TripletLoss",
    "pairwise_distances",
    "sort_rows",
]

_STAT_KEYS = ("frac_active", "mean_pos_dist", "mean_neg_dist", "num_triplets")

# Sort keys are int64: [31 bits: float32 distance bits][1 bit: tie-break][31 bits: column index] (dense semihard,
# batch_all), or [32 bits: float32 distance bits][32 bits: column index] (_plain_keys: semihard on CPU).
_COL_BITS = 31
_COL_MASK = (1 << _COL_BITS) - 1
_TIE_BIT = 1 << _COL_BITS
_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_LAST_KEY = 0x7FFFFFFF << 32  # + column: above every distance's key, NaN included
_TIE_BIT_I32 = -(1 << 31)  # bit 31 of the low word, as an int32
SEMIHARD_IMPLS = ("auto", "dense", "compact")


@dataclass(frozen=True)
class CPUTuning:
    """How the CPU paths split their work (the defaults are measured: docs/benchmarks.md)."""

    min_rows_per_thread: int = 256  # rows per thread of the threaded NumPy sort (fewer: one thread)
    dense_pair_grad_ratio: float = 32  # the pair gradient's S is dense while B^2 <= this x its non-zeros


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """A context that disables autocast on ``device`` (a no-op where autocast does not exist)."""
    try:
        return torch.autocast(device_type=device.type, enabled=False)
    except (RuntimeError, ValueError):  # pragma: no cover - exotic device types
        return contextlib.nullcontext()


def _distances(emb: Tensor, squared: bool) -> Tensor:
    """B x B distances in float32 (autocast must already be off)."""
    emb = emb.float()
    sq = emb.pow(2).sum(dim=1)
    d = torch.addmm(sq.unsqueeze(0), emb, emb.t(), alpha=-2.0)
    d = d + sq.unsqueeze(1)
    d = d.clamp_min(0.0)
    d = d.fill_diagonal_(0.0)
    if not squared:
        zero = d == 0
        # sqrt is evaluated at 1 where d == 0, then masked: exact zeros and zero (not NaN) gradients there.
        d = torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, d)))
    return d


def pairwise_distances(emb: Tensor, squared: bool = True) -> Tensor:
    """B x B (squared) Euclidean distances of the rows of ``emb``, in float32, >= 0, exact zeros on the diagonal.

    bf16/fp16 (and float64) inputs are cast to float32 and autocast is disabled, so the result is always float32.
    The non-squared distance has finite gradients everywhere (zero where the distance is exactly zero).
    """
    if emb.dim() != 2:
        raise ValueError(f"emb must be 2-D [B, D], got shape {tuple(emb.shape)}")
    with _no_autocast(emb.device):
        return _distances(emb, squared)


def _pack_keys(values: Tensor, tie: Tensor) -> Tensor:
    """int64 sort keys ordering each row by ``values`` (>= 0, +inf allowed), then ``tie``, then column.

    Layout: high word = float32 bits of ``values`` with the sign cleared (maps -0.0 to +0.0), low word =
    ``tie`` << 31 | column. Both words are written in place through an int32 view (two passes).
    """
    b = values.shape[1]
    col = torch.arange(b, device=values.device, dtype=torch.int32).unsqueeze(0)
    bits = values.contiguous().view(torch.int32)
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        low = torch.where(tie, col.long() + _TIE_BIT, col.long())
        return ((bits.long() & _ABS_MASK) << 32) | low
    key = torch.empty(values.shape, dtype=torch.int64, device=values.device)
    words = key.view(torch.int32).view(*values.shape, 2)
    torch.bitwise_and(bits, _ABS_MASK, out=words[..., 1])
    torch.where(tie, col | _TIE_BIT_I32, col, out=words[..., 0])
    return key


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (pid, workers, pool), rebuilt after fork


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-local pool of ``workers`` threads for the CPU sort (NumPy releases the GIL while sorting)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] != workers:
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="facenet_hf_sort"))
    return _POOL[2]


def sort_rows(key: Tensor, *, min_rows_per_thread: int = 256, threads: int | None = None) -> Tensor:
    """Sort each row of an int64 key matrix in place (keys are unique, so the order is deterministic).

    On CPU the rows are split over ``threads`` (default: torch's thread count) NumPy sorts, at least
    ``min_rows_per_thread`` rows each."""
    if key.device.type != "cpu":
        return torch.sort(key, dim=1).values
    # On CPU NumPy's SIMD sort is ~10x faster than torch.sort; rows are sorted in place, in torch's thread count.
    out = key.numpy()
    rows = out.shape[0]
    workers = min(threads or torch.get_num_threads(), rows // max(1, min_rows_per_thread))
    if workers <= 1:
        out.sort(axis=1)
    else:
        bounds = [rows * i // workers for i in range(workers + 1)]
        chunks = [out[lo:hi] for lo, hi in itertools.pairwise(bounds)]
        list(_thread_pool(workers).map(lambda chunk: chunk.sort(axis=1), chunks))
    return key


def _set_diagonal_keys(key: Tensor, tie: bool) -> None:
    """Give every self pair (a, a) the key (+inf, tie, a): it sorts last and is never selected."""
    rows = torch.arange(key.shape[0], device=key.device, dtype=torch.int64)
    key.diagonal().copy_(rows + ((_INF_BITS << 32) | (_TIE_BIT if tie else 0)))


def _tie_flags(ks: Tensor) -> Tensor:
    """Boolean matrix of the tie bits of sorted keys."""
    if sys.byteorder != "little":  # pragma: no cover
        return (ks & _TIE_BIT) != 0
    return ks.view(torch.int32).view(*ks.shape, 2)[..., 0] < 0  # bit 31 of the low word is its sign


def _linear_loss(w: Tensor, d: Tensor, offset: Tensor) -> Tensor:
    """``sum(w * d) + offset`` with gradient ``w``, its forward value clamped at 0 against rounding."""
    lin = torch.dot(w.reshape(-1), d.reshape(-1)) + offset
    value = lin.detach()
    return lin + (value.clamp_min(0.0) - value)


class _PairSum(torch.autograd.Function):
    """``max(sum_k w_k d(i_k, j_k) + offset, 0)`` over a list of pairs, differentiable w.r.t. the embeddings.

    The clamp only guards the value against rounding (a sum of active hinges is > 0); the gradient is that of
    the linear sum. The forward takes the pair distances ``dist`` as given (read from the B x B matrix, so
    selection and loss see the same numbers); the backward builds the gradient from the pairs alone,
    ``O(pairs x D)`` instead of the ``O(B^2 x D)`` of backpropagating through the matrix: with
    ``c_k = dL/dd_k * dd_k/ds_k`` (``s`` the squared distance), ``dL/de = 2 (diag(S 1) E - S E)`` for the
    symmetric sparse ``S`` holding ``c_k`` at ``(i_k, j_k)`` and ``(j_k, i_k)``.
    (The ``forward(ctx, ...)`` form: with a separate ``setup_context`` torch binds the arguments through
    ``inspect`` on every call.)
    """

    @staticmethod
    def forward(ctx, emb, dist, i, j, w, offset, squared, dense_ratio):
        ctx.save_for_backward(emb, dist, i, j, w)
        ctx.squared = squared
        ctx.dense_ratio = dense_ratio
        return (torch.dot(w, dist) + offset).clamp_min(0.0)

    @staticmethod
    def backward(ctx, grad):
        emb, dist, i, j, w = ctx.saved_tensors
        c = w * grad
        if not ctx.squared:  # d = sqrt(s): dd/ds = 1 / (2 d), and 0 where d = 0 (as the matrix's gradient)
            c = torch.where(dist > 0, c / (2 * torch.where(dist > 0, dist, 1.0)), 0.0)
        b = emb.shape[0]
        rows, cols = torch.cat([i, j]), torch.cat([j, i])
        cc = torch.cat([c, c])
        degree = torch.zeros(b, dtype=emb.dtype, device=emb.device).index_add_(0, rows, cc)
        if emb.device.type == "cpu" and b * b > ctx.dense_ratio * rows.numel():  # large and sparse
            s = torch.sparse_coo_tensor(torch.stack([rows, cols]), cc, (b, b), check_invariants=False)
            s_e = torch.sparse.mm(s, emb)
        else:  # S as a dense B x B matrix: faster for small B, and on accelerators (no host sync)
            s = torch.zeros(b * b, dtype=emb.dtype, device=emb.device).index_add_(0, rows * b + cols, cc)
            s_e = s.view(b, b) @ emb
        return 2 * (degree.unsqueeze(1) * emb - s_e), None, None, None, None, None, None, None


def _label_counts(labels: Tensor) -> Tensor:
    """How many samples of the batch share each sample's label (itself included), in O(B log B)."""
    ordered = labels.sort().values
    return torch.searchsorted(ordered, labels, right=True) - torch.searchsorted(ordered, labels)


class _Mined(NamedTuple):
    """What a miner hands back: the loss is ``loss_sum / max(n_loss, 1)``."""

    loss_sum: Tensor  # differentiable
    n_loss: Tensor  # denominator of the mean
    n_active: Tensor  # triplets with positive loss
    n_considered: Tensor  # denominator of frac_active
    num_triplets: Tensor


def _semihard_sorted(dd: Tensor, same: Tensor, tuning: CPUTuning) -> Tensor:
    """Rows of int64 keys sorted by distance, negatives before positives on ties, self last.

    So a negative that comes after a positive is strictly farther than it. Tie bit set = positive.
    """
    key = _pack_keys(dd, same)
    _set_diagonal_keys(key, tie=False)  # self: an infinitely far negative, never reached
    return sort_rows(key, min_rows_per_thread=tuning.min_rows_per_thread)


def _semihard_dense(
    d: Tensor, dd: Tensor, same: Tensor, n_neg: Tensor, margin: float, tuning: CPUTuning
) -> _Mined:
    """Semihard selection with fixed-shape B x B tensors only (no host sync: for accelerators)."""
    b = d.shape[0]
    ks = _semihard_sorted(dd, same, tuning)
    col_s = ks & _COL_MASK
    is_pos_s = _tie_flags(ks)
    is_neg_s = ~is_pos_s
    neg_rank = is_neg_s.cumsum(dim=1)  # at a positive: number of negatives not farther than it
    # Column of the r-th nearest negative of each row (slot b collects the positives, unused).
    neg_col_by_rank = torch.zeros(b, b + 1, dtype=torch.int64, device=d.device)
    neg_col_by_rank.scatter_(1, torch.where(is_neg_s, neg_rank - 1, b), col_s)
    # Nearest farther negative = rank neg_rank; none -> farthest negative (rank n_neg - 1).
    rank = torch.minimum(neg_rank, (n_neg - 1).clamp_min(0).unsqueeze(1))
    neg_col = neg_col_by_rank.gather(1, rank)
    used = is_pos_s & (n_neg > 0).unsqueeze(1)
    hinge = dd.gather(1, col_s) - dd.gather(1, neg_col) + margin
    active = used & (hinge > 0)
    act = active.to(d.dtype)
    # The loss is linear in d given the selection: +1 on each active (a, p), -1 on its (a, n).
    w = torch.zeros_like(d)
    w.scatter_(1, col_s, act)
    w.scatter_add_(1, neg_col, -act)
    n_used = used.sum()
    n_active = active.sum()
    return _Mined(_linear_loss(w, d, margin * n_active.to(d.dtype)), n_used, n_active, n_used, n_used)


def _plain_keys(dd: Tensor) -> Tensor:
    """int64 keys ``float32 bits << 32 | column`` (distances >= 0, so bit order is value order; -0.0 sorts first)."""
    b = dd.shape[1]
    col = torch.arange(b, device=dd.device, dtype=torch.int32).expand(dd.shape)
    if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
        return (dd.contiguous().view(torch.int32).long() << 32) | col.long()
    return torch.stack((col, dd.contiguous().view(torch.int32)), dim=2).view(torch.int64).squeeze(2)


def _groups_np(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(counts, anchors, positives)``: how many samples share each sample's label (itself included), and every
    (a, p) pair with the same label and p != a, anchor-major, then by index."""
    b = labels.size
    order = np.argsort(labels, kind="stable")
    ordered = labels[order]
    first = np.searchsorted(ordered, labels)
    counts = np.searchsorted(ordered, labels, "right") - first
    anchors = np.repeat(np.arange(b), counts)
    within = np.arange(anchors.size) - (np.cumsum(counts) - counts)[anchors]
    members = order[first[anchors] + within]
    keep = members != anchors
    return counts, anchors[keep], members[keep]


def _semihard_compact(
    emb: Tensor, dd: Tensor, labels: Tensor, margin: float, squared: bool, tuning: CPUTuning
) -> tuple[Tensor, dict[str, Tensor]]:
    """Semihard loss and stats on CPU: one sort of the negatives, then work on the anchor-positive pairs only.

    The positives and the anchor itself get a key above every distance, so the first ``n_neg`` entries of each
    sorted row are the anchor's negatives; the number of them not farther than ``d(a, p)`` is a binary search,
    and is also the sorted position of the nearest farther one. The index work on the pairs and the stats run in
    NumPy (whose per-call cost is a fraction of torch's: at B = 256 torch's calls cost more than the sort); the loss reads the selected distances from the matrix and its gradient comes from the pairs
    (``_PairSum``). Same rules, stats and result as the dense path (``_semihard_dense`` + ``_stats``).
    """
    b = dd.shape[0]
    counts, a, p = _groups_np(labels.numpy())
    n_pos, n_neg = counts - 1, b - counts
    ap = a * b + p
    key = _plain_keys(dd)
    flat = key.numpy().reshape(-1)
    diag = np.arange(b)
    flat[ap] = _LAST_KEY + p
    flat[diag * (b + 1)] = _LAST_KEY + diag
    ks = sort_rows(key, min_rows_per_thread=tuning.min_rows_per_thread)
    d = dd.numpy()
    d_ap = d.reshape(-1)[ap]
    # Keys below (bits(d_ap) + 1) << 32 are the negatives with d <= d_ap (+ 0.0 turns a -0.0 into +0.0).
    query = ((d_ap + np.float32(0.0)).view(np.int32).astype(np.int64) + 1) << 32
    slot = np.arange(a.size) - (np.cumsum(n_pos) - n_pos)[a]
    queries = np.zeros((b, max(int(n_pos.max()), 1)), dtype=np.int64)
    queries[a, slot] = query
    not_farther = torch.searchsorted(ks, torch.from_numpy(queries)).numpy()[a, slot]
    rank = np.minimum(not_farther, np.maximum(n_neg[a] - 1, 0))  # nearest farther negative, else the farthest
    n = flat[a * b + rank] & _COL_MASK
    d_an = d.reshape(-1)[a * b + n]
    used = n_neg[a] > 0
    w = (used & (d_ap - d_an + np.float32(margin) > 0)).astype(np.float32)  # active triplets
    n_active, n_used = int(np.count_nonzero(w)), int(np.count_nonzero(used))
    loss_sum = _PairSum.apply(
        emb,
        torch.from_numpy(np.concatenate([d_ap, d_an])),
        torch.from_numpy(np.concatenate([a, a])),
        torch.from_numpy(np.concatenate([p, n])),
        torch.from_numpy(np.concatenate([w, -w])),
        margin * n_active,
        squared,
        tuning.dense_pair_grad_ratio,
    )
    # Stats, as _stats computes them.
    has_neg, has_pos = n_neg > 0, n_pos > 0
    row_same = np.bincount(a, weights=d_ap, minlength=b)
    row_diff = np.maximum(d.sum(axis=1) - row_same, 0.0)
    stats = np.array(
        [
            n_active / max(n_used, 1),
            row_same[has_neg].sum() / max(int(n_pos[has_neg].sum()), 1),
            row_diff[has_pos & has_neg].sum() / max(int(n_neg[has_pos].sum()), 1),
            n_used,
        ],
        dtype=np.float32,
    )
    return loss_sum / max(n_used, 1), dict(zip(_STAT_KEYS, torch.from_numpy(stats).unbind(), strict=True))


def _batch_hard(
    emb: Tensor,
    dd: Tensor,
    same: Tensor,
    n_pos: Tensor,
    n_neg: Tensor,
    margin: float,
    squared: bool,
    tuning: CPUTuning,
) -> _Mined:
    """Hardest positive and hardest negative of each anchor; the gradient flows through those 2B pairs only."""
    b = dd.shape[0]
    hp = torch.where(same, dd, -1.0).argmax(dim=1)  # self (d = 0) only if no positive
    hn = torch.where(same, torch.inf, dd).argmin(dim=1)
    rows = torch.arange(b, device=dd.device)
    d_p, d_n = dd.gather(1, hp.unsqueeze(1)).squeeze(1), dd.gather(1, hn.unsqueeze(1)).squeeze(1)
    used = (n_pos > 0) & (n_neg > 0)
    active = used & (d_p - d_n + margin > 0)
    w = active.to(dd.dtype)
    n_active = active.sum()
    loss_sum = _PairSum.apply(
        emb,
        torch.cat([d_p, d_n]),
        torch.cat([rows, rows]),
        torch.cat([hp, hn]),
        torch.cat([w, -w]),
        margin * n_active.to(dd.dtype),
        squared,
        tuning.dense_pair_grad_ratio,
    )
    n_used = used.sum()
    return _Mined(loss_sum, n_used, n_active, n_used, n_used)


def _batch_all(
    d: Tensor, dd: Tensor, same: Tensor, n_pos: Tensor, n_neg: Tensor, margin: float, tuning: CPUTuning
) -> _Mined:
    """All valid triplets, averaged over the active ones, in O(B^2) memory."""
    # Merge, per row, the thresholds d(a,p) + margin of the positives with the distances d(a,n) of the negatives.
    # (a,p,n) is active iff d(a,n) < d(a,p) + margin: on ties the threshold sorts first (tie bit 0 = positive).
    values = torch.where(same, dd + margin, dd)
    key = _pack_keys(values, ~same)
    _set_diagonal_keys(key, tie=True)  # self: an infinitely far "negative", active for no pair
    ks = sort_rows(key, min_rows_per_thread=tuning.min_rows_per_thread)
    col_s = ks & _COL_MASK
    is_neg_s = _tie_flags(ks)
    is_pos_s = ~is_neg_s
    negs_before = is_neg_s.cumsum(dim=1)  # at a positive: its number of active negatives
    pos_before = is_pos_s.cumsum(dim=1)  # at a negative: positives whose threshold it does not exceed
    # Weight of d(a, j) in the (linear) loss: +#active negatives for a positive, -#pairs it is active for.
    w_s = torch.where(is_pos_s, negs_before, pos_before - n_pos.unsqueeze(1))
    w = torch.empty_like(d)
    w.scatter_(1, col_s, w_s.to(d.dtype))
    n_active = torch.where(is_pos_s, negs_before, 0).sum()
    loss_sum = _linear_loss(w, d, margin * n_active.to(d.dtype))
    n_valid = (n_pos * n_neg).sum()
    return _Mined(loss_sum, n_active, n_active, n_valid, n_active)


class TripletLoss(nn.Module):
    """Triplet loss ``max(d(a,p) - d(a,n) + margin, 0)`` with online mining inside the batch.

    See the module docstring for the exact rule of each mining mode and the meaning of the stats.
    """

    def __init__(
        self,
        margin: float = 0.2,
        mining: str = "semihard",
        squared: bool = True,
        *,
        semihard: str = "auto",
        cpu_tuning: CPUTuning | None = None,
    ) -> None:
        super().__init__()
        try:
            margin_f = float(margin)
        except (TypeError, ValueError):
            margin_f = math.nan
        if isinstance(margin, bool) or not (math.isfinite(margin_f) and margin_f > 0):
            raise ValueError(f"margin must be a finite number > 0, got {margin!r}")
        if mining not in MINING_MODES:
            raise ValueError(f"mining must be one of {MINING_MODES}, got {mining!r}")
        self.margin = margin_f
        self.mining = mining
        self.squared = bool(squared)
        if semihard not in SEMIHARD_IMPLS:
            raise ValueError(f"semihard must be one of {SEMIHARD_IMPLS}, got {semihard!r}")
        # "auto": by device (compact on CPU, dense elsewhere); both select the same triplets
        self.semihard = semihard
        self.cpu_tuning = cpu_tuning or CPUTuning()

    def extra_repr(self) -> str:
        extra = f", semihard={self.semihard!r}" if self.semihard != "auto" else ""
        return f"margin={self.margin}, mining={self.mining!r}, squared={self.squared}{extra}"

    def forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss (0-d float32) and detached stats for ``embeddings`` [B, D] with integer ``labels`` [B]."""
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be 2-D [B, D], got shape {tuple(embeddings.shape)}")
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must be 1-D with {embeddings.shape[0]} entries, got shape {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = labels.to(device=embeddings.device, dtype=torch.int64)
        with _no_autocast(embeddings.device):
            return self._forward(embeddings, labels)

    def _forward(self, embeddings: Tensor, labels: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        b = embeddings.shape[0]
        emb = embeddings.float()
        m = self.margin
        if b == 0:  # nothing to mine (and argmax/argmin reject empty rows)
            zero = torch.zeros((), dtype=torch.float32, device=emb.device)
            return emb.sum(), dict.fromkeys(_STAT_KEYS, zero)
        tuning = self.cpu_tuning
        dense = emb.device.type != "cpu" if self.semihard == "auto" else self.semihard == "dense"
        if self.mining == "semihard" and not dense:
            with torch.no_grad():
                dd = _distances(emb, self.squared)
            return _semihard_compact(emb, dd, labels, m, self.squared, tuning)
        counts = _label_counts(labels)
        n_pos = counts - 1
        n_neg = b - counts
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        if self.mining == "batch_hard":
            with torch.no_grad():
                dd = _distances(emb, self.squared)
            mined = _batch_hard(emb, dd, same, n_pos, n_neg, m, self.squared, tuning)
        else:
            d = _distances(emb, self.squared)
            dd = d.detach()
            if self.mining == "semihard":
                mined = _semihard_dense(d, dd, same, n_neg, m, tuning)
            else:
                mined = _batch_all(d, dd, same, n_pos, n_neg, m, tuning)
        loss = mined.loss_sum / mined.n_loss.clamp_min(1).to(torch.float32)
        return loss.float(), _stats(dd, same, n_pos, n_neg, mined)


def _stats(dd: Tensor, same: Tensor, n_pos: Tensor, n_neg: Tensor, mined: _Mined) -> dict[str, Tensor]:
    """Detached 0-d float32 stats (see the module docstring)."""
    with torch.no_grad():
        f32 = torch.float32
        has_neg = n_neg > 0
        has_pos = n_pos > 0
        row_same = torch.where(same, dd, 0.0).sum(dim=1)  # the diagonal is 0
        row_diff = (dd.sum(dim=1) - row_same).clamp_min(0.0)
        pos_pairs = torch.where(has_neg, n_pos, 0).sum().clamp_min(1).to(f32)
        neg_pairs = torch.where(has_pos, n_neg, 0).sum().clamp_min(1).to(f32)
        values = (
            mined.n_active.to(f32) / mined.n_considered.clamp_min(1).to(f32),
            torch.where(has_neg, row_same, 0.0).sum() / pos_pairs,
            torch.where(has_pos & has_neg, row_diff, 0.0).sum() / neg_pairs,
            mined.num_triplets.to(f32),
        )
        return dict(zip(_STAT_KEYS, values, strict=True))


# ------------------------------------------------------------------------------------------- margin softmax

MARGIN_SOFTMAX_KINDS = ("arcface", "cosface")
DEFAULT_MARGINS = {"arcface": 0.5, "cosface": 0.35}


class MarginSoftmaxLoss(nn.Module):
    """ArcFace / CosFace: softmax cross-entropy over a classifier of the training identities, with a margin.

    ``weight`` (``num_classes x embedding_dim``) holds one row per identity; rows and embeddings are
    L2-normalised, so ``cos[i, j]`` is the cosine between embedding ``i`` and class ``j`` (clamped to [-1, 1]).
    Only the target logit ``cos[i, y_i] = cos(theta)`` changes, then every logit is multiplied by ``scale``:

    - ``"arcface"`` (Deng et al. 2019, additive angular margin): ``cos(theta + m)`` computed as
      ``cos(theta) cos(m) - sin(theta) sin(m)`` with ``sin(theta) = sqrt(1 - cos(theta)^2)`` while
      ``cos(theta) > cos(pi - m)``, i.e. ``theta + m < pi``; beyond that ``cos(theta) - m sin(m)``, which keeps the
      target logit decreasing in ``theta``. This is insightface's ``arcface_torch`` ``ArcFace`` (``losses.py``,
      ``easy_margin=False``) on the clamped cosines of its ``PartialFC_V2``, and pytorch-metric-learning's
      ``ArcFaceLoss`` (which takes the margin in degrees and computes ``cos(acos(c) + m)``);
    - ``"cosface"`` (Wang et al. 2018, additive cosine margin): ``cos(theta) - m`` (insightface's ``CosFace``,
      pytorch-metric-learning's ``CosFaceLoss``).

    The loss is the mean cross-entropy over the batch. ``sin(theta)`` has a zero (not infinite) gradient where
    ``cos(theta)`` is exactly +-1. The weights start as ``N(0, 0.01^2)`` (insightface's initialisation) drawn from
    ``generator``. All maths runs in float32 (float64 inputs stay float64) with autocast off. Stats:
    ``margin_softmax_loss`` and ``classifier_accuracy`` (the fraction whose nearest class, without margin, is
    their own).

    ``local`` (a bool mask over the rows, or None = all) is for embeddings gathered from several processes whose
    other rows carry no gradient: only the rows this process owns give the classifier its gradient (the others'
    logits see a detached weight), so that after DDP averages, and with the ``x num_processes`` the training step
    applies to a loss over the gathered batch, the classifier gets the gradient of the global batch exactly once.
    """

    accepts_local_rows = True  # train_step passes ``local=`` with loss.global_mining

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        *,
        kind: str = "arcface",
        margin: float | None = None,
        scale: float = 64.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_classes", num_classes), ("embedding_dim", embedding_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if kind not in MARGIN_SOFTMAX_KINDS:
            raise ValueError(f"kind must be one of {MARGIN_SOFTMAX_KINDS}, got {kind!r}")
        margin = DEFAULT_MARGINS[kind] if margin is None else margin
        hi = math.pi / 2 if kind == "arcface" else 1.0
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0.0 <= margin <= hi:
            unit = "radians" if kind == "arcface" else "a cosine"
            raise ValueError(f"{kind} margin must be a number in [0, {hi:.4g}] ({unit}), got {margin!r}")
        if (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not (math.isfinite(scale) and scale > 0)
        ):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self.num_classes, self.embedding_dim = num_classes, embedding_dim
        self.kind, self.margin, self.scale = kind, float(margin), float(scale)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        with torch.no_grad():
            self.weight.normal_(0.0, 0.01, generator=generator)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, kind={self.kind!r}, "
            f"margin={self.margin}, scale={self.scale}"
        )

    def cosines(self, embeddings: Tensor, local: Tensor | None = None) -> Tensor:
        """``[B, num_classes]`` cosines between the normalised embeddings and classifier rows, in [-1, 1]."""
        dtype = torch.promote_types(embeddings.dtype, torch.float32)
        e = nn.functional.normalize(embeddings.to(dtype), dim=1)
        w = nn.functional.normalize(self.weight.to(dtype), dim=1)
        cos = e @ w.t()
        if local is not None:
            cos = torch.where(
                local.to(device=cos.device, dtype=torch.bool).unsqueeze(1), cos, e @ w.detach().t()
            )
        return cos.clamp(-1.0, 1.0)

    def target_logit(self, cos_target: Tensor) -> Tensor:
        """The target class's cosine with the margin applied (before the scale)."""
        m = self.margin
        if self.kind == "cosface":
            return cos_target - m
        sin_sq = 1.0 - cos_target * cos_target
        positive = sin_sq > 0
        sin = torch.where(positive, torch.sqrt(torch.where(positive, sin_sq, 1.0)), 0.0)
        cos_theta_m = cos_target * math.cos(m) - sin * math.sin(m)
        return torch.where(
            cos_target > math.cos(math.pi - m), cos_theta_m, cos_target - math.sin(math.pi - m) * m
        )

    def logits(self, embeddings: Tensor, labels: Tensor, local: Tensor | None = None) -> Tensor:
        """The scaled logits with the target margin: ``scale * cos``, the target entry replaced."""
        cos = self.cosines(embeddings, local)
        target = self.target_logit(cos.gather(1, labels.unsqueeze(1)))
        return self.scale * cos.scatter(1, labels.unsqueeze(1), target)

    def forward(
        self, embeddings: Tensor, labels: Tensor, *, local: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean cross-entropy (0-d) and detached stats for ``embeddings`` [B, D] with labels in 0..num_classes-1."""
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings must be [B, {self.embedding_dim}], got shape {tuple(embeddings.shape)}"
            )
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must be 1-D with {embeddings.shape[0]} entries, got shape {tuple(labels.shape)}"
            )
        if labels.is_floating_point() or labels.is_complex():
            raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
        labels = labels.to(device=embeddings.device, dtype=torch.int64)
        # checked on CPU only: on an accelerator the check would cost a host sync every step
        if (
            labels.device.type == "cpu"
            and labels.numel()
            and (int(labels.min()) < 0 or int(labels.max()) >= self.num_classes)
        ):
            raise ValueError(
                f"labels must be in 0..{self.num_classes - 1} (the classifier's classes), got "
                f"{int(labels.min())}..{int(labels.max())}"
            )
        with _no_autocast(embeddings.device):
            if embeddings.shape[0] == 0:  # attached zero: backward works and every parameter gets a gradient
                zero = self.weight.sum() * 0.0 + embeddings.sum() * 0.0
                return zero.float(), {
                    "margin_softmax_loss": zero.detach().float(),
                    "classifier_accuracy": zero.detach().float(),
                }
            logits = self.logits(embeddings, labels, local)
            loss = nn.functional.cross_entropy(logits, labels)
            with torch.no_grad():
                # argmax of the scaled logits without the margin = of the cosines
                plain = self.cosines(embeddings.detach())
                accuracy = (plain.argmax(dim=1) == labels).float().mean()
        return loss, {"margin_softmax_loss": loss.detach().float(), "classifier_accuracy": accuracy}


class CombinedLoss(nn.Module):
    """``triplet(emb, labels) + weight * margin_softmax(emb, labels)``; either part may be None (not both).

    Stats: the triplet loss's (plus ``triplet_loss``) and the margin softmax's. ``local`` is handed to the margin
    softmax (see :class:`MarginSoftmaxLoss`); the triplet loss mines the whole batch it is given.
    """

    accepts_local_rows = True

    def __init__(
        self,
        triplet: TripletLoss | None,
        margin_softmax: MarginSoftmaxLoss | None,
        *,
        weight: float = 1.0,
    ) -> None:
        super().__init__()
        if triplet is None and margin_softmax is None:
            raise ValueError("CombinedLoss needs a triplet loss, a margin softmax, or both")
        if (
            isinstance(weight, bool)
            or not isinstance(weight, (int, float))
            or not (math.isfinite(weight) and weight > 0)
        ):
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")
        self.triplet = triplet
        self.margin_softmax = margin_softmax
        self.weight = float(weight)

    def extra_repr(self) -> str:
        return f"weight={self.weight}"

    def forward(
        self, embeddings: Tensor, labels: Tensor, *, local: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        stats: dict[str, Tensor] = {}
        total: Tensor | None = None
        if self.triplet is not None:
            total, stats = self.triplet(embeddings, labels)
            stats = {**stats, "triplet_loss": total.detach()}
        if self.margin_softmax is not None:
            ms, ms_stats = self.margin_softmax(embeddings, labels, local=local)
            stats.update(ms_stats)
            part = self.weight * ms
            total = part if total is None else total + part
        return total, stats

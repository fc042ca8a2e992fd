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
exactly the brute-force autograd gradient over the selected triplets (ReLU'(0) = 0). Memory is O(B^2).

Stats (detached 0-d float32 tensors): ``frac_active`` and ``num_triplets`` as above; ``mean_pos_dist`` and
``mean_neg_dist`` are the mean anchor-positive / anchor-negative distance over the *valid pairs*, i.e. the
ordered pairs that belong to at least one valid triplet (a positive pair whose anchor has a negative, a negative
pair whose anchor has a positive). A batch without any valid triplet gives loss 0 (still attached to the graph,
so ``backward()`` works and yields zero gradients) and all-zero stats.

All maths runs in float32 with autocast disabled, whatever the input dtype (bf16/fp16/float64 inputs are cast;
gradients flow back in the input dtype). The forward makes no ``.item()`` calls and, on accelerators, no host
syncs: every mode works on fixed-shape B x B tensors. Cost: one row-wise sort of B x B int64 keys for semihard
and batch_all, O(B^2 log B) time and O(B^2) memory; batch_hard needs only row-wise max/min. On CPU the sort runs
in NumPy (its SIMD sort is ~10x faster than ``torch.sort`` there) on ``torch.get_num_threads()`` threads, and
semihard switches to a variant that, after the sort, only touches the B*(K-1) positive pairs (dynamic shapes are
free on CPU); both variants select the same triplets.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["MINING_MODES", "TripletLoss", "pairwise_distances"]

MINING_MODES = ("semihard", "batch_hard", "batch_all")

# Sort keys are int64: [31 bits: float32 distance bits][1 bit: tie-break][31 bits: column index].
_COL_BITS = 31
_COL_MASK = (1 << _COL_BITS) - 1
_TIE_BIT = 1 << _COL_BITS
_ABS_MASK = 0x7FFFFFFF
_INF_BITS = 0x7F800000
_TIE_BIT_I32 = -(1 << 31)  # bit 31 of the low word, as an int32
_MIN_ROWS_PER_THREAD = 128


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


def _sort_rows(key: Tensor) -> Tensor:
    """Sort each row of an int64 key matrix (keys are unique, so the order is deterministic)."""
    if key.device.type != "cpu":
        return torch.sort(key, dim=1).values
    # On CPU NumPy's SIMD sort is ~10x faster than torch.sort; rows are sorted in place, in torch's thread count.
    out = key.numpy()
    rows = out.shape[0]
    workers = min(torch.get_num_threads(), rows // _MIN_ROWS_PER_THREAD)
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


def _semihard_sorted(dd: Tensor, same: Tensor) -> Tensor:
    """Rows of int64 keys sorted by distance, negatives before positives on ties, self last.

    So a negative that comes after a positive is strictly farther than it. Tie bit set = positive.
    """
    key = _pack_keys(dd, same)
    _set_diagonal_keys(key, tie=False)  # self: an infinitely far negative, never reached
    return _sort_rows(key)


def _semihard_dense(d: Tensor, dd: Tensor, same: Tensor, n_neg: Tensor, margin: float) -> _Mined:
    """Semihard selection with fixed-shape B x B tensors only (no host sync: for accelerators)."""
    b = d.shape[0]
    ks = _semihard_sorted(dd, same)
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


def _semihard_compact(
    d: Tensor, dd: Tensor, same: Tensor, n_pos: Tensor, n_neg: Tensor, margin: float
) -> tuple[_Mined, Tensor]:
    """Semihard selection touching only the positive pairs after the sort (CPU: dynamic shapes are free).

    Returns the mined result and the per-anchor sums of d over positives (for the stats).
    """
    b = d.shape[0]
    ks = _semihard_sorted(dd, same)
    q = _tie_flags(ks).reshape(-1).nonzero().squeeze(1)  # flat sorted positions of the positives, row-major
    a = q // b
    j = q - a * b
    start = n_pos.cumsum(0) - n_pos
    k = torch.arange(q.numel(), device=q.device) - start[a]  # index of the positive among its row's
    rank = j - k  # negatives not farther than the positive (self sorts last, so it is never counted)
    r = torch.minimum(rank, (n_neg[a] - 1).clamp_min(0))  # nearest farther negative, else the farthest
    # Sorted position of the r-th negative = r + number of the row's positives with rank <= r.
    row_key = a * (b + 1)
    n_before = torch.searchsorted(row_key + rank, row_key + r, right=True) - start[a]
    ks_flat = ks.reshape(-1)
    base = a * b
    p_col = ks_flat[q] & _COL_MASK
    n_col = ks_flat[base + r + n_before] & _COL_MASK
    vals = d.reshape(-1)[torch.cat([base + p_col, base + n_col])]
    d_ap = vals[: q.numel()]
    hinge = d_ap - vals[q.numel() :] + margin
    used = n_neg[a] > 0
    loss_sum = torch.where(used, torch.relu(hinge), 0.0).sum()
    n_used = used.sum()
    n_active = (used & (hinge.detach() > 0)).sum()
    row_same = torch.zeros(b, dtype=d.dtype, device=d.device).index_add_(0, a, d_ap.detach())
    return _Mined(loss_sum, n_used, n_active, n_used, n_used), row_same


def _batch_hard(d: Tensor, dd: Tensor, same: Tensor, n_pos: Tensor, n_neg: Tensor, margin: float) -> _Mined:
    """Hardest positive and hardest negative of each anchor."""
    hp_idx = torch.where(same, dd, -1.0).argmax(dim=1, keepdim=True)  # self (d = 0) only if no positive
    hn_idx = torch.where(same, torch.inf, dd).argmin(dim=1, keepdim=True)
    hinge = (d.gather(1, hp_idx) - d.gather(1, hn_idx)).squeeze(1) + margin
    used = (n_pos > 0) & (n_neg > 0)
    loss_sum = torch.where(used, torch.relu(hinge), 0.0).sum()
    n_used = used.sum()
    n_active = (used & (hinge.detach() > 0)).sum()
    return _Mined(loss_sum, n_used, n_active, n_used, n_used)


def _batch_all(d: Tensor, dd: Tensor, same: Tensor, n_pos: Tensor, n_neg: Tensor, margin: float) -> _Mined:
    """All valid triplets, averaged over the active ones, in O(B^2) memory."""
    # Merge, per row, the thresholds d(a,p) + margin of the positives with the distances d(a,n) of the negatives.
    # (a,p,n) is active iff d(a,n) < d(a,p) + margin: on ties the threshold sorts first (tie bit 0 = positive).
    values = torch.where(same, dd + margin, dd)
    key = _pack_keys(values, ~same)
    _set_diagonal_keys(key, tie=True)  # self: an infinitely far "negative", active for no pair
    ks = _sort_rows(key)
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

    def __init__(self, margin: float = 0.2, mining: str = "semihard", squared: bool = True) -> None:
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
        # Semihard implementation: None = by device (compact on CPU, dense elsewhere); tests force either.
        self._semihard_dense: bool | None = None

    def extra_repr(self) -> str:
        return f"margin={self.margin}, mining={self.mining!r}, squared={self.squared}"

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
        d = _distances(embeddings, self.squared)
        dd = d.detach()
        same = labels.unsqueeze(0) == labels.unsqueeze(1)
        m = self.margin
        if b == 0:  # nothing to mine (and argmax/argmin reject empty rows)
            zero = torch.zeros((), dtype=torch.float32, device=d.device)
            return d.sum(), dict.fromkeys(
                ("frac_active", "mean_pos_dist", "mean_neg_dist", "num_triplets"), zero
            )
        n_pos = _label_counts(labels) - 1
        n_neg = b - 1 - n_pos
        row_same = None
        dense = self._semihard_dense if self._semihard_dense is not None else d.device.type != "cpu"
        if self.mining == "semihard" and not dense:
            mined, row_same = _semihard_compact(d, dd, same, n_pos, n_neg, m)
        elif self.mining == "semihard":
            mined = _semihard_dense(d, dd, same, n_neg, m)
        elif self.mining == "batch_hard":
            mined = _batch_hard(d, dd, same, n_pos, n_neg, m)
        else:
            mined = _batch_all(d, dd, same, n_pos, n_neg, m)
        loss = mined.loss_sum / mined.n_loss.clamp_min(1).to(d.dtype)
        return loss.float(), _stats(dd, same, n_pos, n_neg, mined, row_same)


def _stats(
    dd: Tensor, same: Tensor, n_pos: Tensor, n_neg: Tensor, mined: _Mined, row_same: Tensor | None
) -> dict[str, Tensor]:
    """Detached 0-d float32 stats (see the module docstring); ``row_same``: per-anchor sums of d over positives."""
    with torch.no_grad():
        f32 = torch.float32
        has_neg = n_neg > 0
        has_pos = n_pos > 0
        if row_same is None:
            row_same = torch.where(same, dd, 0.0).sum(dim=1)  # the diagonal is 0
        row_diff = (dd.sum(dim=1) - row_same).clamp_min(0.0)
        pos_pairs = torch.where(has_neg, n_pos, 0).sum().clamp_min(1).to(f32)
        neg_pairs = torch.where(has_pos, n_neg, 0).sum().clamp_min(1).to(f32)
        return {
            "frac_active": mined.n_active.to(f32) / mined.n_considered.clamp_min(1).to(f32),
            "mean_pos_dist": torch.where(has_neg, row_same, 0.0).sum() / pos_pairs,
            "mean_neg_dist": torch.where(has_pos & has_neg, row_diff, 0.0).sum() / neg_pairs,
            "num_triplets": mined.num_triplets.to(f32),
        }

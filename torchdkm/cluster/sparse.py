"""Top-m sparse DKM: the op of :mod:`torchdkm.cluster.op` with each row's attention on its nearest centroids.

At the temperatures DKM trains with, a row of ``A = softmax_j(-|x_i - c_j|^2 / tau)``
has almost all its mass on 1-3 centroids.  Here each row keeps a *set* ``S_i``
of centroids and its attention is the softmax over ``S_i`` only, renormalised:

    A~_ij = exp(-|x_i - c_j|^2 / tau) / sum_{l in S_i} exp(-|x_i - c_l|^2 / tau)   (j in S_i; else 0).

``S_i`` is the row's ``top`` nearest centroids, or its nearest alone (a *hard*
row, ``A~`` one-hot) when the mass on every other centroid is provably below
``eps * exp(-HARD_MARGIN)`` (``eps`` of the dtype): ~90% of the rows of 4-bit
Gaussian weights.  A hard row costs nothing per iteration (its share of
``A~^T m x`` and ``A~^T m`` is constant, summed once), one gather for the
output and one scatter in the backward.  The other rows work on
``(top x rows)`` maps with gathers of centroids and scatter-adds into them:
the update ``F~``, the output ``A~ c``, the backward's output gradient and
direct term, the Gram sums of ``dF~/dc`` (per kept entry, and per pair of kept
entries of a row for the off-diagonal ``sum_i w_i A~_ij A~_il``) and the
adjoint pass.  ``F~``, its fixed point and its implicit gradient are those of
:mod:`.op` with ``A~`` for ``A``: the backward is the exact gradient of the
sparse forward (the sets are piecewise constant in ``x``), with the same
structure (two chunked passes, one ``(k d) x (k d)`` solve, formed in float64),
saving ``x, m, c*, tau``, the sets (one byte per kept entry for ``k <= 256``),
a flag per row and the hard rows' sums of ``m, m x``, independent of the
iterations.

Approximation.  Per row, the mass the dense softmax puts outside ``S_i`` is

    dropped_i = sum_{j not in S_i} A_ij <= (k - |S_i|) exp(-(L_i - D_i) / tau)

where ``D_i`` is the squared distance to the nearest centroid and ``L_i`` a
lower bound on the squared distance to every centroid outside ``S_i`` (at
selection, the ``(|S_i| + 1)``-th smallest, so the bound is at most ``(k - top)
exp(-gap_i / tau)``, ``gap_i`` between the nearest and the first dropped
centroid, and at most the looser ``(k - top) exp(-(d_(top+1) - d_(top)) /
tau)``).  ``A~`` differs from ``A`` by at most ``2 dropped_i`` in L1 per row,
so an output row moves by at most ``2 dropped_i max_j |c_j|``.  Entries
below ``eps^2`` of their row's largest are set to 0 (that keeps subnormals,
very slow on CPUs, out of every product).  :func:`dkm_sparse`
returns, per group, a bound on ``dropped_i`` over the real rows
(multiplicity > 0) and every attention evaluation of the call.

Selection.  The sets come from one ``(k x rows)`` pass of squared distances (a
matmul for vectors, exact differences for scalars) whose float bits carry the
centroid index in their lowest ``ceil(log2 k)`` bits (used for ranking only; the
bounds use the packed values rounded the safe way), and a bitonic min/max
tournament that finds each row's ``top + 1`` smallest with elementwise ops (no
sort, no strided ``topk``).  The kept logits are then recomputed exactly from
``x_i - c_j``.  The sets are chosen at the centroids the call starts from and
kept while the centroids move: moves of at most ``delta`` lower ``L_i`` to
``(sqrt(L_i) - delta)^2`` and raise ``D_i`` to ``(sqrt(D_i) + delta)^2``, so
each row has a *slack*, the move after which its bound could exceed both
``eps`` and ``exp(RESELECT)`` times its value when chosen.  Before each
evaluation, the rows whose slack the centroids have outrun are chosen again at
the current centroids (a few percent of the rows per iteration when k-means
is still drifting; none when the centroids have settled).

With ``top >= k`` every centroid is kept: the result is the dense op's up to
rounding, and the dropped mass is 0.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import op
from .op import EMPTY_MASS, MAX_AMPLIFICATION, _chunks, _gram_terms, _jacobian

#: An evaluation is redone on new sets when the centroids' moves have raised the dropped-mass
#: bound above ``exp(RESELECT)`` times its value at selection (and above the float resolution).
RESELECT = 1.0
#: A row is one-hot ("hard") when, at selection, its mass off the nearest centroid is provably
#: below ``eps * exp(-HARD_MARGIN)``: the margin lets the centroids move before that bound reaches ``eps``.
HARD_MARGIN = 8.0
#: Soft rows per chunk at most: a chunk's temporaries then stay in cache.
MAX_ROWS = 16384
_INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}


def _floor(dtype: torch.dtype) -> float:
    """``log(eps^2)``: the smallest attention entry (and bound) relative to the row's largest."""
    return 2.0 * math.log(torch.finfo(dtype).eps)


@dataclass
class Selection:
    """Each row's candidate centroids and how far the centroids may move before they need choosing again.

    A row's set is its ``top`` nearest centroids (``index``, nearest first),
    or its nearest alone when the row is ``hard`` (one-hot).  While no
    centroid is farther than ``slack`` from ``ref``, the row's dropped-mass
    bound stays below ``eps`` or below ``exp(RESELECT)`` times its value when
    chosen (``slack`` is infinite for padding rows).  ``base`` is the largest
    bound over the rows when chosen.
    """

    index: Tensor  # (G, top, n) centroid indices (uint8 when k <= 256)
    hard: Tensor  # (G, n) bool
    slack: Tensor  # (G, n)
    ref: Tensor  # (G, k, d)
    hard_sums: Tensor  # (1 + d, G * k) float64: the hard rows' m and m x summed per centroid
    base: Tensor  # (G,)
    rebased: bool = False  # some rows were chosen at centroids other than ``ref``

    @property
    def top(self) -> int:
        return self.index.shape[1]

    @property
    def dense(self) -> bool:
        return self.top >= self.ref.shape[1]

    def moved(self, c: Tensor) -> Tensor:
        """``(G, 1)`` the largest move of any centroid from ``ref``."""
        return (c - self.ref).norm(dim=-1).amax(1, keepdim=True)


@dataclass
class _Data:
    """One call's vectors, coordinate-major ``(d, G, n)`` so that every op runs along rows.

    ``budget`` is the memory the caller's ``rows`` grants the dense op's chunk
    (the inverse of :func:`op.rows_per_chunk`); what the backward keeps across
    chunks stays within it.
    """

    x: Tensor
    m: Tensor | None
    xf: Tensor
    rows: int
    budget: int

    @staticmethod
    def of(x: Tensor, m: Tensor | None, k: int, rows: int) -> _Data:
        g, _, d = x.shape
        budget = rows * g * ((6 + _gram_terms(d)) * k + 4 * d) * x.element_size()
        return _Data(x, m, x.permute(2, 0, 1).contiguous(), max(1, min(rows, MAX_ROWS)), budget)


# -- selection ------------------------------------------------------------------------


def _index_bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


@dataclass
class _Packed:
    """Squared distances ``(G, k, r)`` as integers (their float bits) whose low bits hold the centroid index.

    Integers order like the floats they hold where those are >= 0; the few
    below 0 (rounding around 0) come first.  :meth:`lower` / :meth:`upper`
    read a packed value back as a bound on the true squared distance.
    """

    values: Tensor
    mask: int
    rel: float  # relative rounding of the value itself
    spread: Tensor | None  # (G, r) for vectors: 3 e |x|^2, e the matmul's error per unit of |x|^2 + |c|^2
    grow: float  # 2 e

    def _floats(self, p: Tensor) -> tuple[Tensor, Tensor]:
        dtype = torch.float32 if p.dtype == torch.int32 else torch.float64
        a, b = (p & ~self.mask).view(dtype), (p | self.mask).view(dtype)
        return torch.minimum(a, b), torch.maximum(a, b)

    def lower(self, p: Tensor) -> Tensor:
        low = self._floats(p)[0]
        low = low - self.rel * low.abs()
        if self.spread is not None:
            low = (low - self.spread) / (1 + self.grow)
        return low.clamp_min_(0)

    def upper(self, p: Tensor) -> Tensor:
        high = self._floats(p)[1]
        high = high + self.rel * high.abs()
        if self.spread is not None:
            high = (high + self.spread) / (1 - self.grow)
        return high.clamp_min_(0)


def _packed_distances(xt: Tensor, c: Tensor) -> _Packed:
    """The squared distances from ``xt`` (G, d, r) to ``c``, packed (see :class:`_Packed`).

    Vectors take one matmul, ``|c|^2 - 2 c.x + |x|^2`` over ``[x, |x|^2]``,
    whose error is below ``e (|x|^2 + |c_j|^2)`` with ``e = (3 d + 6) eps``;
    as ``|c_j|^2 <= 2 |x - c_j|^2 + 2 |x|^2``, a computed value ``D'`` bounds
    the true one within ``(D' -+ 3 e |x|^2) / (1 +- 2 e)``, whatever the
    centroid (an outlying centroid costs the other rows no precision).
    Scalars take exact differences, within a few ulps.
    """
    g, k, d = c.shape
    eps = torch.finfo(c.dtype).eps
    if d == 1:
        dist = (c - xt).square_()
        spread, grow = None, 0.0
    else:
        xx = (xt * xt).sum(1, keepdim=True)  # (G, 1, r)
        lhs = torch.cat([-2.0 * c, torch.ones_like(c[..., :1])], -1)
        dist = torch.baddbmm((c * c).sum(-1, keepdim=True), lhs, torch.cat([xt, xx], 1))
        e = (3 * d + 6) * eps
        spread, grow = (3 * e) * xx.squeeze(1), 2 * e
    mask = (1 << _index_bits(k)) - 1
    packed = dist.view(_INT_OF[c.dtype])
    ids = torch.arange(k, device=c.device, dtype=packed.dtype).view(1, k, 1)
    packed.bitwise_and_(~mask).bitwise_or_(ids)
    return _Packed(packed, mask, 8 * eps, spread, grow)


def _sort_pair(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    return torch.minimum(a, b), torch.maximum(a, b)


def _bitonic_sort(lists: list[Tensor]) -> list[Tensor]:
    """Sort ``len(lists)`` (a power of two) tensors elementwise, ascending."""
    p = len(lists)
    lists = list(lists)
    size = 2
    while size <= p:
        stride = size // 2
        while stride >= 1:
            for i in range(p):
                j = i ^ stride
                if j > i:
                    lo, hi = _sort_pair(lists[i], lists[j])
                    lists[i], lists[j] = (hi, lo) if i & size else (lo, hi)
            stride //= 2
        size *= 2
    return lists


def _bitonic_clean(lists: list[Tensor]) -> list[Tensor]:
    """Sort a bitonic sequence of ``len(lists)`` (a power of two) tensors, ascending."""
    p = len(lists)
    stride = p // 2
    while stride >= 1:
        for i in range(p):
            if not i & stride:
                lists[i], lists[i + stride] = _sort_pair(lists[i], lists[i + stride])
        stride //= 2
    return lists


def _smallest(packed: Tensor, top: int) -> tuple[Tensor, Tensor]:
    """The ``top`` smallest entries along dim 1 of ``(G, k, r)``, ascending, and the ``(top + 1)``-th.

    A tournament of elementwise ``minimum``/``maximum`` over whole rows: ``k / p``
    blocks of ``p`` (the power of two >= ``top``) are sorted by a bitonic
    network, then merged pairwise keeping the ``p`` smallest (a bitonic merge
    cut in half) and the smallest of what was cut.  Falls back to ``topk``
    when ``k`` is not a power of two or ``p >= k``.
    """
    g, k, r = packed.shape
    p = 1 << (top - 1).bit_length()
    if k & (k - 1) or p >= k:
        found = torch.topk(packed, top + 1, dim=1, largest=False, sorted=True).values
        return found[:, :top], found[:, top]
    blocks = packed.view(g, p, k // p, r)
    lists = _bitonic_sort([blocks[:, i] for i in range(p)])  # each (G, B, r): the blocks' sorted members
    rest: Tensor | None = None
    count = k // p
    while count > 1:
        half = count // 2
        a = [t[:, :half] for t in lists]
        b = [t[:, half:] for t in lists]
        lo = [torch.minimum(a[i], b[p - 1 - i]) for i in range(p)]
        cut = torch.maximum(a[0], b[p - 1])
        for i in range(1, p):
            cut = torch.minimum(cut, torch.maximum(a[i], b[p - 1 - i]))
        if rest is not None:
            cut = torch.minimum(cut, torch.minimum(rest[:, :half], rest[:, half:]))
        rest = cut
        lists = _bitonic_clean(lo)
        count = half
    assert rest is not None
    kept = torch.cat(lists, 1)  # (G, p, r)
    return kept[:, :top], kept[:, top] if top < p else rest[:, 0]


def _first_weights(xt: Tensor, m: Tensor | None) -> Tensor:
    """``(1 + d, ..., r)``: ``m, m x_a`` for ``xt`` ``(d, ..., r)``, the first terms of :func:`op._gram_weights`."""
    ones = torch.ones_like(xt[0]) if m is None else m
    return torch.stack([ones, *(xt if m is None else m * xt)], 0)


def _second_weights(xt: Tensor, m: Tensor | None) -> Tensor:
    """``(d (d + 1) / 2, ..., r)``: ``m x_a x_b (a <= b)``, the last terms of :func:`op._gram_weights`."""
    d = xt.shape[0]
    xs = xt if m is None else m * xt
    return torch.stack([xs[a] * xt[b] for a in range(d) for b in range(a, d)], 0)


def _gram_weights(xt: Tensor, m: Tensor | None) -> Tensor:
    """``(P, ..., r)``: the terms of :func:`op._gram_weights`, ``m, m x_a, m x_a x_b (a <= b)``."""
    return torch.cat([_first_weights(xt, m), _second_weights(xt, m)], 0)


def _scatter(sums: Tensor, keys: Tensor, src: Tensor) -> None:
    """``sums[col, keys[i]] += src[col, i]`` for every column of ``sums`` (C, bins), in float64.

    A scatter-add adds in sequence: in float32, thousands of items on one
    centroid would lose digits (the mean of copies of one value would not
    be that value to float32 precision).
    """
    cols = sums.shape[0]
    sums.scatter_add_(1, keys.expand(cols, -1), src.reshape(cols, -1).to(sums.dtype))


def _hard_part(data: _Data, sel: Selection, pos: slice | Tensor, sign: float) -> None:
    """Add (``sign`` 1) or remove (-1) the hard rows at positions ``pos`` from ``sel.hard_sums``."""
    g, k = sel.hard.shape[0], sel.ref.shape[1]
    hard = sel.hard[:, pos]
    m = hard.to(data.xf.dtype) if data.m is None else data.m[:, pos] * hard
    weights = _first_weights(data.xf[:, :, pos], m)  # (1 + d, G, r)
    keys = sel.index[:, 0, pos].long() + (torch.arange(g, device=hard.device) * k).view(g, 1)
    _scatter(sel.hard_sums, keys.view(-1), weights if sign > 0 else weights.neg_())


def _choose(data: _Data, sel: Selection, c: Tensor, tau: Tensor, pos: slice | Tensor) -> None:
    """Choose the sets of the rows at positions ``pos`` (in every group) at centroids ``c``.

    With ``near`` / ``root`` the square roots of an upper bound on the
    squared distance to the nearest centroid and of a lower bound on those
    outside the set, a row's score (``-log`` of its bound) is
    ``(root^2 - near^2) / tau - log(centroids outside)``.  Centroids that
    moved by at most ``delta`` lower it to ``((root - delta)^2 - (near +
    delta)^2) / tau - ...``, linear in ``delta``: ``slack`` is the ``delta``
    that brings it down to ``min(-log eps, score - RESELECT)``.
    """
    k, top = c.shape[1], sel.top
    mask = (1 << _index_bits(k)) - 1
    eps = torch.finfo(c.dtype).eps
    xt = data.xf[:, :, pos].transpose(0, 1)  # (G, d, r)
    packed = _packed_distances(xt, c)
    kept, nxt = _smallest(packed.values, top)
    low = packed.lower(nxt)
    second = low if top == 1 else packed.lower(kept[:, 1])
    nearest = packed.upper(kept[:, 0])
    inv_tau = (1.0 / tau).view(-1, 1)
    log_soft, log_hard = math.log(k - top), math.log(k - 1)
    # hard: the mass off the nearest is below eps exp(-HARD_MARGIN)
    hard = (second - nearest) * inv_tau - log_hard >= HARD_MARGIN - math.log(eps)
    bound_sq = torch.where(hard, second, low)
    score = (bound_sq - nearest).mul_(inv_tau).sub_(torch.where(hard, log_hard, log_soft))
    room = (score + math.log(eps)).clamp_min_(RESELECT)  # score less the floor it may drop to
    root = bound_sq.sqrt_()
    slack = torch.minimum(room.div_(inv_tau).div_((root + nearest.sqrt_()).mul_(2.0)), root)
    if data.m is not None:
        pad = data.m[:, pos] <= 0
        slack.masked_fill_(pad, math.inf)
        score.masked_fill_(pad, math.inf)
    sel.index[:, :, pos] = (kept & mask).to(sel.index.dtype)
    sel.hard[:, pos] = hard
    sel.slack[:, pos] = slack
    sel.base = torch.maximum(sel.base, _dropped(score))
    _hard_part(data, sel, pos, 1.0)


def _select(data: _Data, c: Tensor, tau: Tensor, top: int) -> Selection:
    d, g, n = data.xf.shape
    k = c.shape[1]
    top = min(top, k)
    index_dtype = torch.uint8 if k <= 256 else torch.int32
    hard_sums = torch.zeros(1 + d, g * k, dtype=torch.float64, device=c.device)
    hard = torch.zeros(g, n, dtype=torch.bool, device=c.device)
    slack = c.new_full((g, n), math.inf)
    if top >= k:  # every centroid kept: the dense op
        index = torch.arange(k, device=c.device, dtype=index_dtype).view(1, k, 1).expand(g, k, n)
        return Selection(index, hard, slack, c, hard_sums, c.new_zeros(g))
    index = torch.empty(g, top, n, dtype=index_dtype, device=c.device)
    sel = Selection(index, hard, slack, c, hard_sums, c.new_zeros(g))
    for s in _chunks(n, data.rows):
        _choose(data, sel, c, tau, s)
    return sel


def select(x: Tensor, m: Tensor | None, c: Tensor, tau: Tensor, top: int, rows: int) -> Selection:
    """Each row's set at centroids ``c`` (see :class:`Selection`)."""
    return _select(_Data.of(x, m, c.shape[1], rows), c, tau, top)


def _dropped(score: Tensor) -> Tensor:
    """``(G,)`` the largest dropped-mass bound ``exp(-score)`` over the rows, floored at ``eps^2``."""
    low = score.amin(1).clamp_max(-_floor(score.dtype))
    return torch.where(low == math.inf, 0.0, (-low).exp().clamp_max(1.0))


def _check(sel: Selection, c: Tensor) -> tuple[Tensor, Tensor | None]:
    """The bound at ``c``: ``(dropped (G,), stale rows (G, n) or None)``.

    Rows within their slack keep a bound below ``eps`` or below
    ``exp(RESELECT)`` times their bound when chosen, so below
    ``max(eps, exp(RESELECT) base)``; the others are stale (and their group's
    bound is 1 until they are chosen again).
    """
    if sel.dense:
        return c.new_zeros(c.shape[0]), None
    delta = sel.moved(c)
    if not sel.rebased and not bool(delta.any()):
        return sel.base, None
    stale = delta > sel.slack
    dropped = (sel.base * math.exp(RESELECT)).clamp_(torch.finfo(c.dtype).eps, 1.0)
    if not bool(stale.any()):
        return dropped, None
    return torch.where(stale.any(1), 1.0, dropped), stale  # no bound for groups with stale rows


def _repair(data: _Data, sel: Selection, c: Tensor, tau: Tensor, stale: Tensor) -> Selection:
    """Move ``sel``'s reference to ``c`` and choose the stale rows' sets again there.

    By the triangle inequality a row keeps its guarantee up to a move of
    ``slack - |c - ref|`` from the new reference; the stale rows (every group
    at their positions) get fresh sets and slacks.
    """
    sel.slack.sub_(sel.moved(c))
    sel.ref, sel.rebased = c, True
    pos = stale.any(0).nonzero().squeeze(1)
    for s in _chunks(pos.numel(), data.rows):
        _hard_part(data, sel, pos[s], -1.0)
        _choose(data, sel, c, tau, pos[s])
    return sel


def _current(
    data: _Data, sel: Selection, soft: list[_Soft] | None, c: Tensor, tau: Tensor
) -> tuple[Selection, list[_Soft], Tensor]:
    """The selection and soft rows to evaluate at ``c`` (stale rows chosen again) and the dropped-mass bound there."""
    dropped, stale = _check(sel, c)
    if stale is not None:
        sel = _repair(data, sel, c, tau, stale)  # every row is now within its slack
        dropped = _check(sel, c)[0]
        soft = None
    if soft is None:
        soft = _soft_layout(data, sel.index, sel.hard, c.shape[1], tau)
    return sel, soft, dropped


# -- the flat layout of one selection -------------------------------------------------


@dataclass
class _Soft:
    """A chunk of soft rows, flat over groups."""

    rows: Tensor  # (r,) flat row ``g * n + i``
    keys: Tensor  # (T, r) flat centroid ``g * k + j``
    xt: Tensor  # (d, r)
    m: Tensor | None  # (r,)
    inv_tau: Tensor  # (r,) or (1,)


def _keys(rows: Tensor, slots: Tensor, n: int, k: int, groups: int) -> Tensor:
    """Flat centroid keys ``g * k + j`` of flat rows ``g * n + i`` holding centroid ``j`` (any shape)."""
    return slots.long() + (rows // n) * k if groups > 1 else slots.long()


def _soft_layout(data: _Data, index: Tensor, hard: Tensor, k: int, tau: Tensor) -> list[_Soft]:
    """The soft rows, flat over groups, in chunks."""
    d, g, n = data.xf.shape
    top = index.shape[1]
    rows_all = (~hard).reshape(-1).nonzero().squeeze(1)
    ids = index.transpose(0, 1).reshape(top, g * n)
    xf = data.xf.view(d, g * n)
    mf = None if data.m is None else data.m.reshape(-1)
    inv_tau = 1.0 / tau
    soft = []
    for s in _chunks(rows_all.numel(), data.rows):
        rows = rows_all[s]
        soft.append(
            _Soft(
                rows,
                _keys(rows, ids[:, rows], n, k, g),
                xf[:, rows],
                None if mf is None else mf[rows],
                inv_tau if g == 1 else inv_tau[rows // n],
            )
        )
    return soft


@dataclass
class _Layout:
    soft: list[_Soft]
    hard_rows: Tensor  # (R,) flat rows
    hard_keys: Tensor  # (R,) flat centroids
    hard_m: Tensor | None


def _layout(data: _Data, index: Tensor, hard: Tensor, k: int, tau: Tensor, soft: list[_Soft] | None = None) -> _Layout:
    """Soft rows (``soft`` if already laid out) and hard rows."""
    if soft is None:
        soft = _soft_layout(data, index, hard, k, tau)
    return _Layout(soft, *_hard_layout(data, index, hard, k))


def _hard_layout(data: _Data, index: Tensor, hard: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """The hard rows, flat over groups: ``(rows, their centroid keys, their multiplicities)``."""
    g, n = hard.shape
    rows = hard.reshape(-1).nonzero().squeeze(1)
    keys = _keys(rows, index[:, 0].reshape(-1)[rows], n, k, g)
    return rows, keys, None if data.m is None else data.m.reshape(-1)[rows]


# -- the sparse attention -------------------------------------------------------------


def _table(c: Tensor) -> Tensor:
    """Centroids as a flat ``(d, G * k)`` table."""
    return c.permute(2, 0, 1).reshape(c.shape[2], -1)


def _attend(ch: _Soft, ct: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(a, dcx)``: the renormalised softmax over each row's set (T, r), into ``out`` if given,
    and ``dcx = c_j - x_i`` (d, T, r)."""
    t, r = ch.keys.shape
    dcx = ct.index_select(1, ch.keys.view(-1)).view(-1, t, r).sub_(ch.xt.unsqueeze(1))
    dist = dcx[0].square()
    for q in range(1, dcx.shape[0]):
        dist.addcmul_(dcx[q], dcx[q])
    # entries below exp(floor) = eps^2 of the row's largest are exact zeros: that mass is below rounding,
    # and it keeps exp's underflow (subnormal results, very slow on CPUs) out of every product
    floor = _floor(ct.dtype)
    logit = dist.sub_(dist.amin(0, keepdim=True)).mul_(-ch.inv_tau)
    e = logit.clamp_min(floor).exp_().masked_fill_(logit <= floor, 0.0)
    z = e.sum(0, keepdim=True)
    a = torch.div(e, z, out=out) if out is not None else e.div_(z)
    return a, dcx


# -- forward --------------------------------------------------------------------------


def _update(soft: list[_Soft], c: Tensor, sel: Selection) -> tuple[Tensor, Tensor]:
    g, k, d = c.shape
    ct = _table(c)
    sums = sel.hard_sums.clone()  # A~^T m, A~^T m x: the hard rows' part is constant
    for ch in soft:
        src = c.new_empty(1 + d, *ch.keys.shape)
        _attend(ch, ct, out=src[0])
        if ch.m is not None:
            src[0].mul_(ch.m)
        torch.mul(src[0].unsqueeze(0), ch.xt.unsqueeze(1), out=src[1:])
        _scatter(sums, ch.keys.view(-1), src)
    den, num = sums[0].view(g, k), sums[1:].view(d, g, k).permute(1, 2, 0)
    full = den > EMPTY_MASS
    mean = (num / den.clamp_min(EMPTY_MASS).unsqueeze(-1)).to(c.dtype)
    return torch.where(full.unsqueeze(-1), mean, c).contiguous(), den.to(c.dtype)


def update(
    x: Tensor, m: Tensor | None, c: Tensor, tau: Tensor, sel: Selection, rows: int
) -> tuple[Tensor, Tensor, Tensor]:
    """One sparse DKM iteration on ``sel``'s sets: ``(F~(c), A~^T m, dropped)``, ``dropped`` (G,) the bound at ``c``."""
    data = _Data.of(x, m, c.shape[1], rows)
    new, den = _update(_soft_layout(data, sel.index, sel.hard, c.shape[1], tau), c, sel)
    return new, den, _check(sel, c)[0]


def _iterate(
    data: _Data, c: Tensor, tau: Tensor, max_iters: int, tol: Tensor, top: int
) -> tuple[Tensor, int, Selection, list[_Soft], Tensor]:
    dropped = c.new_zeros(c.shape[0])
    sel = _select(data, c, tau, top)
    soft = None
    for done in range(1, max_iters + 1):
        sel, soft, step_dropped = _current(data, sel, soft, c, tau)
        new, _ = _update(soft, c, sel)
        dropped = torch.maximum(dropped, step_dropped)
        moved = (new - c).abs().amax(dim=(1, 2))
        c = new
        if bool((moved <= tol).all()):
            return c, done, sel, soft, dropped
    assert soft is not None
    return c, max_iters, sel, soft, dropped


def iterate(
    x: Tensor, m: Tensor | None, c: Tensor, tau: Tensor, max_iters: int, tol: Tensor, rows: int, top: int
) -> tuple[Tensor, int, Selection, Tensor]:
    """Iterate ``c <- F~(c)`` as :func:`op.iterate`: ``(c, iterations, selection, largest dropped mass)``."""
    c, done, sel, _, dropped = _iterate(_Data.of(x, m, c.shape[1], rows), c, tau, max_iters, tol, top)
    return c, done, sel, dropped


def _soft_output(data: _Data, lay: _Layout, c: Tensor) -> Tensor:
    d, g, n = data.xf.shape
    ct = _table(c)
    out = c.new_empty(d, g * n)
    out.index_copy_(1, lay.hard_rows, ct.index_select(1, lay.hard_keys))
    for ch in lay.soft:
        a, dcx = _attend(ch, ct)
        # A~ c = x + sum_j A~_ij (c_j - x_i): the rows of A~ sum to 1
        out.index_copy_(1, ch.rows, (a.unsqueeze(0) * dcx).sum(1).add_(ch.xt))
    return out.view(d, g, n).permute(1, 2, 0).contiguous()


def soft_output(
    x: Tensor, m: Tensor | None, c: Tensor, tau: Tensor, sel: Selection, rows: int
) -> tuple[Tensor, Tensor]:
    """``A~(c) c`` for every vector on ``sel``'s sets, and the dropped-mass bound at ``c``."""
    data = _Data.of(x, m, c.shape[1], rows)
    out = _soft_output(data, _layout(data, sel.index, sel.hard, c.shape[1], tau), c)
    return out, _check(sel, c)[0]


# -- backward -------------------------------------------------------------------------


def _pairs(top: int) -> list[tuple[int, int]]:
    return [(u, v) for u in range(top) for v in range(u + 1, top)]


def backward(
    x: Tensor,
    m: Tensor | None,
    c: Tensor,
    tau: Tensor,
    index: Tensor,
    hard: Tensor,
    grad_w: Tensor | None,
    grad_c: Tensor | None,
    rows: int,
    *,
    max_terms: int,
    tol: float,
    hard_sums: Tensor | None = None,
    prepared: tuple[_Data, _Layout] | None = None,
) -> Tensor:
    """Gradient into ``x`` of ``(w, c*)`` for the sparse op: :func:`op.backward` with ``A~`` for ``A``.

    Pass 1 scatter-adds, per kept entry, the Gram sums ``sum_i w_i A~_ij``
    (``w`` = ``m, m x_a, m x_a x_b``) and, per pair of kept entries of a row,
    the off-diagonal ``sum_i w_i A~_ij A~_il``; the diagonal follows from
    ``sum_l A~_il = 1``, and ``dF~/dc`` is :func:`op._jacobian` of them.  As
    ``sum_j A~_ij = 1``, the terms in ``c_j`` become terms in ``c_j - x_i``:
    the output's gradient into ``c*`` is ``sum_i A~_ij g_i - (2/tau) sum_i
    s_ij (c_j - x_i)`` and its direct term ``(2/tau) sum_j s_ij (c_j - x_i)``,
    ``s`` the gradient into the logits, 0 for hard rows.  ``hard_sums`` are
    the hard rows' sums of ``m, m x`` (:attr:`Selection.hard_sums`) and ``prepared`` the forward's data and layout
    (both recomputed when not given).
    """
    g, k, d = c.shape
    data, lay = prepared if prepared is not None else _prepare(x, m, index, hard, k, tau, rows)
    n, top = x.shape[1], index.shape[1]
    p_terms = _gram_terms(d)
    explicit = k * p_terms <= op.EXPLICIT_LIMIT
    ct = _table(c)
    dx = c.new_zeros(d, g * n)
    pairs = _pairs(top) if explicit else []
    gf = None if grad_w is None else grad_w.permute(2, 0, 1).reshape(d, g * n)
    # per centroid: the P Gram sums, then (with grad_w) A~^T g (d) and sum_i s_ij (c_j - x_i) (d)
    cols = p_terms + (2 * d if gf is not None else 0)
    sums = torch.zeros(cols, g * k, dtype=torch.float64, device=c.device)
    sums[:p_terms] += _hard_sums(data, lay, g * k, hard_sums)
    if gf is not None:
        _scatter(sums[p_terms : p_terms + d], lay.hard_keys, gf.index_select(1, lay.hard_rows))
    pair_sums = torch.zeros(p_terms, g * k * k, dtype=torch.float64, device=c.device) if pairs else None
    kept_bytes = sum(ch.keys.numel() for ch in lay.soft) * (d + 1) * c.element_size()
    kept: list[tuple[Tensor, Tensor]] | None = [] if kept_bytes <= data.budget else None

    for ch in lay.soft:
        a, dcx = _attend(ch, ct)
        if kept is not None:
            kept.append((a, dcx))
        weights = _gram_weights(ch.xt, ch.m)  # (P, r)
        src = c.new_empty(cols, *a.shape)
        torch.mul(a.unsqueeze(0), weights.unsqueeze(1), out=src[:p_terms])
        if gf is not None:
            gs = gf[:, ch.rows].unsqueeze(1)  # (d, 1, r)
            gd = (gs * dcx).sum(0)  # (T, r): g_i . (c_j - x_i)
            sa = a * (gd - (a * gd).sum(0, keepdim=True))  # dL/dlogits
            torch.mul(a.unsqueeze(0), gs, out=src[p_terms : p_terms + d])
            torch.mul(sa.unsqueeze(0), dcx, out=src[p_terms + d :])
            dx.index_add_(1, ch.rows, src[p_terms + d :].sum(1).mul_(2.0 * ch.inv_tau))
        _scatter(sums, ch.keys.view(-1), src)
        if pair_sums is not None:
            first = torch.stack([ch.keys[u] for u, _ in pairs])  # (Q, r)
            second = torch.stack([ch.keys[v] for _, v in pairs]) % k
            prod = torch.stack([a[u] * a[v] for u, v in pairs])
            _scatter(pair_sums, (first * k + second).view(-1), prod.unsqueeze(0) * weights.unsqueeze(1))

    # the small (G, k, ...) algebra runs in float64: dF~/dc cancels large terms (S_j - D_j c_j c_j^T, ...)
    # and the solve amplifies what is left
    two_over_tau = (2.0 / tau).double().view(-1, 1, 1)
    totals = sums.view(cols, g, k).permute(1, 2, 0)  # (G, k, cols)
    gram_sums = totals[..., :p_terms]
    gc = torch.zeros_like(c, dtype=torch.float64) if grad_c is None else grad_c.double()
    if gf is not None:
        gc = gc + totals[..., p_terms : p_terms + d] - two_over_tau * totals[..., p_terms + d :]

    den = gram_sums[..., 0]
    full = (den > EMPTY_MASS).unsqueeze(-1)
    inv_den = torch.where(full, 1.0 / den.clamp_min(EMPTY_MASS).unsqueeze(-1), torch.zeros_like(gc)).to(c.dtype)
    done = False
    if explicit:
        grams = _grams(gram_sums, pair_sums, k)
        jacobian = _jacobian(grams, gram_sums, c.double(), two_over_tau.view(-1))
        eye = torch.eye(k * d, dtype=torch.float64, device=c.device)
        v = torch.linalg.solve((eye - jacobian).transpose(1, 2), gc.reshape(g, k * d, 1)).view(g, k, d)
        if bool(torch.isfinite(v).all()) and float(v.norm()) <= MAX_AMPLIFICATION * float(gc.norm()) + 1e-30:
            _adjoint_pass(lay, c, v.to(c.dtype) * inv_den, dx, kept)
            done = True
    if not done:
        u = gc.to(c.dtype) * inv_den
        first_norm = float(u.norm())
        for _ in range(max_terms):
            if first_norm == 0.0:
                break
            next_gc = _adjoint_pass(lay, c, u, dx, kept, want_next=True)
            assert next_gc is not None
            u = next_gc * inv_den
            if float(u.norm()) <= tol * first_norm:
                break
    return dx.view(d, g, n).permute(1, 2, 0).contiguous()


def _prepare(
    x: Tensor, m: Tensor | None, index: Tensor, hard: Tensor, k: int, tau: Tensor, rows: int
) -> tuple[_Data, _Layout]:
    data = _Data.of(x, m, k, rows)
    return data, _layout(data, index, hard, k, tau)


def _layout_bytes(data: _Data, lay: _Layout) -> int:
    """What keeping ``data`` and ``lay`` from forward to backward costs, beyond the saved tensors."""
    soft = sum(ch.keys.numel() * 8 + ch.rows.numel() * 8 + ch.xt.numel() * ch.xt.element_size() for ch in lay.soft)
    return data.xf.numel() * data.xf.element_size() + soft + 16 * lay.hard_rows.numel()


def _hard_sums(data: _Data, lay: _Layout, bins: int, first: Tensor | None) -> Tensor:
    """``(P, bins)`` float64: the hard rows' Gram weights summed per centroid (the first ``1 + d`` given as ``first``)."""
    d = data.xf.shape[0]
    sums = torch.zeros(_gram_terms(d), bins, dtype=torch.float64, device=data.xf.device)
    if first is not None:
        sums[: 1 + d] = first
    part = sums[1 + d :] if first is not None else sums
    weights = _second_weights if first is not None else _gram_weights
    xf = data.xf.view(d, -1)
    for s in _chunks(lay.hard_rows.numel(), data.rows):
        rows = lay.hard_rows[s]
        _scatter(part, lay.hard_keys[s], weights(xf[:, rows], None if lay.hard_m is None else lay.hard_m[s]))
    return sums


def _grams(sums: Tensor, pair_sums: Tensor | None, k: int) -> Tensor:
    """``(G, P, k, k)`` Gram matrices ``sum_i w_i A~_ij A~_il`` from the per-centroid and off-diagonal pair sums."""
    g, _, p_terms = sums.shape
    grams = sums.new_zeros(g, p_terms, k, k)
    if pair_sums is not None:
        pair = pair_sums.view(p_terms, g, k, k).transpose(0, 1)  # [j, l]: pairs met with j in the earlier slot
        grams = pair + pair.transpose(-1, -2)
    idx = torch.arange(k, device=sums.device)
    # sum_l A~_il = 1: the diagonal is the per-centroid sum less the row's off-diagonal entries
    grams[:, :, idx, idx] = sums.permute(0, 2, 1) - grams.sum(-1)
    return grams


def _adjoint_pass(
    lay: _Layout,
    c: Tensor,
    u: Tensor,
    dx: Tensor,
    kept: list[tuple[Tensor, Tensor]] | None,
    want_next: bool = False,
) -> Tensor | None:
    """Add ``(dF~/dx)^T v`` to ``dx`` (d, G n) for ``u = v / D``; optionally return ``(dF~/dc)^T v``.

    With ``q_ij = (x_i - c_j) . u_j m_i`` and ``t = A~ (q - sum_j A~_ij q_ij)``
    (whose rows sum to 0; 0 for hard rows): ``dx_i = m_i sum_j A~_ij u_j +
    (2/tau) sum_j t_ij (c_j - x_i)`` and ``(dF~/dc)^T v = -(2/tau) sum_i t_ij (c_j - x_i)``.
    """
    g, k, d = c.shape
    ct, ut = _table(c), _table(u)
    sums = torch.zeros(d, g * k, dtype=torch.float64, device=c.device) if want_next else None
    hard = ut.index_select(1, lay.hard_keys)
    dx.index_add_(1, lay.hard_rows, hard if lay.hard_m is None else hard.mul_(lay.hard_m))
    for i, ch in enumerate(lay.soft):
        a, dcx = kept[i] if kept is not None else _attend(ch, ct)
        t, r = ch.keys.shape
        ug = ut.index_select(1, ch.keys.view(-1)).view(d, t, r)
        q = (dcx * ug).sum(0).neg_()  # (T, r): (x_i - c_j) . u_j
        if ch.m is not None:
            q = q * ch.m
        tt = a * (q - (a * q).sum(0, keepdim=True))
        tdcx = tt.unsqueeze(0) * dcx  # (d, T, r)
        if sums is not None:
            _scatter(sums, ch.keys.view(-1), tdcx.mul(ch.inv_tau))
        dxs = (a.unsqueeze(0) * ug).sum(1)  # (d, r)
        if ch.m is not None:
            dxs = dxs * ch.m
        dx.index_add_(1, ch.rows, dxs.add_(tdcx.sum(1).mul_(2.0 * ch.inv_tau)))
    if sums is None:
        return None
    return -2.0 * sums.to(c.dtype).view(d, g, k).permute(1, 2, 0)


# -- the autograd function ------------------------------------------------------------


def _no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the distances must be in the compute dtype for the bounds (and the bit packing) to hold."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()


class SparseDKMFunction(torch.autograd.Function):
    """``(w, c*, dropped) = dkm_sparse(x, m, c0)``; saves ``x, m, c*, tau`` and the sets for backward."""

    @staticmethod
    def forward(ctx, x, m, c0, tau, top, max_iters, tol, rows, grad_tol):  # type: ignore[override]
        k = c0.shape[1]
        with _no_autocast(x.device):
            data = _Data.of(x, m, k, rows)
            c, iters, sel, soft, dropped = _iterate(data, c0, tau, max_iters, tol, top)
            sel, soft, out_dropped = _current(data, sel, soft, c, tau)
            lay = _layout(data, sel.index, sel.hard, k, tau, soft)
            w = _soft_output(data, lay, c)
        dropped = torch.maximum(dropped, out_dropped)
        # the flat layout is kept for backward when it fits the chunk budget (else rebuilt there)
        ctx.prepared = (data, lay) if _layout_bytes(data, lay) <= data.budget else None
        ctx.save_for_backward(x, m, c, tau, sel.index, sel.hard, sel.hard_sums)
        ctx.rows, ctx.max_terms, ctx.grad_tol = rows, max(max_iters, 1), grad_tol
        ctx.iters = iters
        ctx.mark_non_differentiable(dropped)
        ctx.set_materialize_grads(False)
        return w, c, dropped

    @staticmethod
    def backward(ctx, grad_w, grad_c, _grad_dropped):  # type: ignore[override]
        x, m, c, tau, index, hard, hard_sums = ctx.saved_tensors
        with _no_autocast(x.device):
            dx = backward(
                x, m, c, tau, index, hard, grad_w, grad_c, ctx.rows,
                max_terms=ctx.max_terms, tol=ctx.grad_tol, hard_sums=hard_sums, prepared=ctx.prepared,
            )  # fmt: skip
        ctx.prepared = None
        return dx, None, None, None, None, None, None, None, None


def dkm_sparse(
    x: Tensor,
    m: Tensor | None,
    c0: Tensor,
    tau: Tensor,
    *,
    top: int,
    max_iters: int,
    tol: Tensor,
    rows: int,
    grad_tol: float = 1e-4,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`op.dkm` with each row's attention on its ``top`` nearest centroids.

    Returns ``(w, c*, dropped)``: ``dropped`` (G,) bounds the attention mass
    any real row (multiplicity > 0) leaves out, in any evaluation of the call
    (see the module docstring; 0 when ``top >= k``).  ``w`` and ``c*`` are
    differentiable into ``x``; ``c0`` and ``tau`` are constants.
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    top = min(top, c0.shape[1])
    return SparseDKMFunction.apply(x, m, c0.detach(), tau.detach(), top, max_iters, tol, rows, grad_tol)

"""Top-m sparse DKM: the op of :mod:`torchdkm.cluster.op` with each row's attention on its nearest centroids.

At the temperatures DKM trains with, a row of ``A = softmax_j(-|x_i - c_j|^2 / tau)``
has almost all its mass on 1-3 centroids.  Here each row keeps a *set* ``S_i``
of centroids and its attention is the softmax over ``S_i`` only, renormalised:

    A~_ij = exp(-|x_i - c_j|^2 / tau) / sum_{l in S_i} exp(-|x_i - c_l|^2 / tau)   (j in S_i; else 0).

``S_i`` is the row's ``top`` nearest centroids, or its nearest alone (a *hard*
row, ``A~`` one-hot) when the mass on every other centroid is provably below
``eps * exp(-HARD_MARGIN)`` (``eps`` of the dtype): ~90% of the rows of 4-bit
Gaussian weights.  A hard row costs nothing per iteration (its share of
``A~^T m x`` and ``A~^T m``, and of the backward's Gram sums, is constant,
summed once when it is chosen), one gather for the output and one scatter in
the backward, all in row order (a spare key takes the soft rows).  The other rows work on
``(top x rows)`` maps with gathers of centroids and scatter-adds into them:
the update ``F~``, the output ``A~ c``, the backward's output gradient and
direct term, the Gram sums of ``dF~/dc`` (per kept entry, and per pair of kept
entries of a row for the off-diagonal ``sum_i w_i A~_ij A~_il``) and the
adjoint pass.  ``F~``, its fixed point and its implicit gradient are those of
:mod:`.op` with ``A~`` for ``A``: the backward is the exact gradient of the
sparse forward (the sets are piecewise constant in ``x``), with the same
structure (two chunked passes, one ``(k d) x (k d)`` solve, formed in float64),
saving ``x, m, c*, tau``, the sets (one byte per kept entry for ``k <= 256``),
a flag per row and the hard rows' Gram sums, independent of the iterations.

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
bounds use the packed values rounded the safe way), and rounds of an ``amin``
along the centroid axis, each followed by an integer rotation that sends what
it found to the top (no sort, no strided ``topk``): two rounds for every row
decide which rows are hard, ``top + 1`` for the others.  The nearest two are
what the layer's temperature reads too (:func:`rank`, passed in as
``ranked``).  The kept logits are then recomputed exactly from ``x_i - c_j``.  The sets are chosen at the centroids the call starts from and
kept while the centroids move: moves of at most ``delta`` lower ``L_i`` to
``(sqrt(L_i) - delta)^2`` and raise ``D_i`` to ``(sqrt(D_i) + delta)^2``, so
each row has a *slack*, the move after which its bound could exceed both
``eps`` and ``exp(RESELECT)`` times its value when chosen.  Before each
evaluation, the rows whose slack the centroids have outrun are chosen again at
the current centroids (a few percent of the rows per iteration when k-means
is still drifting; none when the centroids have settled).  The soft rows are
laid out for the evaluations as they are chosen (the rows chosen again leave
their chunks), so no evaluation gathers them from the whole layer.

With ``top >= k`` every centroid is kept: the result is the dense op's up to
rounding, and the dropped mass is 0.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import native, op
from .op import EMPTY_MASS, MAX_AMPLIFICATION, _chunks, _gram_terms, _jacobian

#: An evaluation is redone on new sets when the centroids' moves have raised the dropped-mass
#: bound above ``exp(RESELECT)`` times its value at selection (and above the float resolution).
RESELECT = 1.0
#: A row is one-hot ("hard") when, at selection, its mass off the nearest centroid is provably
#: below ``eps * exp(-HARD_MARGIN)``: the margin lets the centroids move before that bound reaches ``eps``.
HARD_MARGIN = 8.0
#: Rows per chunk at most (per-row work: selection scores, soft rows' attention).
MAX_ROWS = 65536
#: Soft rows per chunk at most: the ``(top x rows)`` maps of a chunk then stay in cache.
SOFT_ROWS = 16384
#: Items per piece of a float64 scatter-add (see :func:`_scatter`).
SCATTER_ITEMS = 8192
#: Rows per ``(k x rows)`` block of squared distances in the selection: the block stays in cache.
SELECT_ROWS = 16384
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

    index: Tensor  # (G, top, n) centroid indices (uint8 when k <= 256); a hard row uses its first only
    hard: Tensor  # (G, n) bool
    slack: Tensor  # (G, n)
    ref: Tensor  # (G, k, d)
    hard_sums: Tensor  # (P, G * k) float64: the hard rows' Gram weights (m, m x, m x x^T) summed per centroid
    base: Tensor  # (G,)
    rebased: bool = False  # some rows were chosen at centroids other than ``ref``
    soft: list[_Soft] | None = None  # the soft rows laid out as they were chosen (None: lay them out from the flags)

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
    """One call's vectors: ``xf`` coordinate-major ``(d, G, n)``, so that every op runs along rows.

    ``flat`` is the same vectors as ``(G n, d)`` rows (the caller's layout):
    gathers of rows go through it (along dim 0), and per-vector results are
    written in that layout.  ``xf`` is the one transposed copy (elementwise
    ops on the strided view cost several times more).  ``budget`` is the memory
    the caller's ``rows`` grants the dense op's chunk (the inverse of
    :func:`op.rows_per_chunk`); what the backward keeps across chunks stays
    within it.
    """

    x: Tensor
    m: Tensor | None
    xf: Tensor
    flat: Tensor
    rows: int
    budget: int

    @staticmethod
    def of(x: Tensor, m: Tensor | None, k: int, rows: int, xf: Tensor | None = None) -> _Data:
        """``xf``: :func:`coordinate_major` ``(x)``, if already made."""
        g, n, d = x.shape
        budget = rows * g * ((6 + _gram_terms(d)) * k + 4 * d) * x.element_size()
        xf = coordinate_major(x) if xf is None else xf
        return _Data(x, m, xf, x.reshape(g * n, d), max(1, min(rows, MAX_ROWS)), budget)

    def at(self, pos: slice | Tensor) -> Tensor:
        """``(d, G, r)``: the vectors at positions ``pos`` of every group (a view for a slice)."""
        if isinstance(pos, slice):
            return self.xf[:, :, pos]
        d, g, n = self.xf.shape
        rows = pos if g == 1 else (pos + n * torch.arange(g, device=pos.device).view(g, 1)).view(-1)
        return _rows(self.flat, rows).view(g, -1, d).permute(2, 0, 1)

    def rows_of(self, rows: Tensor) -> Tensor:
        """``(d, r)``: the vectors at flat rows ``rows``, coordinate-major."""
        return _rows(self.flat, rows).t().contiguous()


def _rows(table: Tensor, index: Tensor) -> Tensor:
    """``table[index]`` for a ``(B, d)`` table: ``(len(index), d)``.

    Pairs (``d == 2``) go as one complex number each, whose gather is several
    times faster than ``index_select`` of short rows; other widths a
    coordinate at a time.
    """
    d = table.shape[1]
    if d == 1:
        return table[:, 0].index_select(0, index).unsqueeze(1)
    if d == 2 and table.dtype in (torch.float32, torch.float64):
        return torch.view_as_real(torch.view_as_complex(table.contiguous()).index_select(0, index))
    out = table.new_empty(index.numel(), d)
    for a in range(d):
        torch.index_select(table[:, a], 0, index, out=out[:, a])
    return out


def coordinate_major(x: Tensor) -> Tensor:
    """``x`` (G, n, d) as a contiguous ``(d, G, n)``: one strided copy per coordinate (a ``permute(...).contiguous()``
    of a few coordinates is several times slower)."""
    g, n, d = x.shape
    if d > 16:
        return x.permute(2, 0, 1).contiguous()
    out = x.new_empty(d, g, n)
    for a in range(d):
        out[a].copy_(x[..., a])
    return out


# -- selection ------------------------------------------------------------------------


def _index_bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


@dataclass
class _Packed:
    """Reads squared distances packed as integers (their float bits, the centroid index in the low bits) as bounds.

    The packed floats are >= 0 (:func:`_packed_distances`), so the integers
    order like the floats they hold.  :meth:`lower` / :meth:`upper` read a
    packed value back as a bound on the true squared distance.
    """

    mask: int
    rel: float  # relative rounding of the value itself
    spread: Tensor | None  # (G, r) for vectors: 3 e |x|^2, e the matmul's error per unit of |x|^2 + |c|^2
    grow: float  # 2 e

    def _dtype(self, p: Tensor) -> torch.dtype:
        return torch.float32 if p.dtype == torch.int32 else torch.float64

    def lower(self, p: Tensor) -> Tensor:
        """A lower bound on the true value: the packed values are >= 0, so clearing the index bits rounds down."""
        low = (p & ~self.mask).view(self._dtype(p)).mul_(1 - self.rel)
        if self.spread is not None:
            low = low.sub_(self.spread).div_(1 + self.grow)
        return low.clamp_min_(0)

    def upper(self, p: Tensor) -> Tensor:
        """An upper bound on the true value: setting the index bits rounds up."""
        high = (p | self.mask).view(self._dtype(p)).mul_(1 + self.rel)
        if self.spread is not None:
            high = high.add_(self.spread).div_(1 - self.grow)
        return high


def _packed_distances(xt: Tensor, c: Tensor, lhs: Tensor | None = None) -> Tensor:
    """The squared distances ``(G, k, r)`` from ``xt`` (G, d, r) to ``c``, packed (see :class:`_Packed`).

    Vectors take one matmul, ``[-2 c, |c|^2, 1] [x; 1; |x|^2]``, whose error is
    below ``e (|x|^2 + |c_j|^2)`` with ``e = (3 d + 6) eps``; as ``|c_j|^2 <=
    2 |x - c_j|^2 + 2 |x|^2``, a computed value ``D'`` bounds the true one
    within ``(D' -+ 3 e |x|^2) / (1 +- 2 e)``, whatever the centroid (an
    outlying centroid costs the other rows no precision).  Computed values
    below 0 are raised to 0 (the true value's floor: the bounds still hold), so
    every packed value is a non-negative integer.  Scalars take exact
    differences, within a few ulps.  ``lhs``: :func:`_lhs` ``(c)``, if already made.
    """
    g, k, d = c.shape
    if d == 1:
        dist = (c - xt).square_()
    else:
        xx = (xt * xt).sum(1, keepdim=True)  # (G, 1, r)
        lhs = _lhs(c) if lhs is None else lhs
        dist = torch.bmm(lhs, torch.cat([xt, torch.ones_like(xx), xx], 1)).clamp_min_(0)
    mask = (1 << _index_bits(k)) - 1
    packed = dist.view(_INT_OF[c.dtype])
    ids = torch.arange(k, device=c.device, dtype=packed.dtype).view(1, k, 1)
    return packed.bitwise_and_(~mask).bitwise_or_(ids)


def _lhs(c: Tensor) -> Tensor:
    """``(G, k, d + 2)``: ``[-2 c, |c|^2, 1]``, the centroids' side of :func:`_packed_distances`' matmul."""
    return torch.cat([-2.0 * c, (c * c).sum(-1, keepdim=True), torch.ones_like(c[..., :1])], -1)


def _bounds(xt: Tensor, k: int) -> _Packed:
    """How to read the packed distances of the rows ``xt`` (G, d, r) back as bounds (see :func:`_packed_distances`)."""
    d = xt.shape[1]
    eps = torch.finfo(xt.dtype).eps
    mask = (1 << _index_bits(k)) - 1
    if d == 1:
        return _Packed(mask, 8 * eps, None, 0.0)
    e = (3 * d + 6) * eps
    return _Packed(mask, 8 * eps, (3 * e) * (xt * xt).sum(1), 2 * e)


def _smallest(packed: Tensor, top: int, out: Tensor | None = None) -> Tensor:
    """The ``top + 1`` smallest entries along dim 1 of ``(G, k, r)``, ascending: ``(G, top + 1, r)`` (into ``out``).

    The entries are distinct integers in ``[0, 2^(b-1))`` (``b`` bits).  Each
    order statistic is one ``amin`` along the short centroid axis, after which
    the entries are rotated: subtracting ``found + 1`` and keeping the low
    ``b - 1`` bits sends what was found to the top and keeps the order of the
    rest (a rotation of a rotation is one), so the next ``amin`` finds the
    next one.  ``packed`` is overwritten.
    """
    g, k, r = packed.shape
    limit = torch.iinfo(packed.dtype).max
    found = packed.new_empty(g, top + 1, r) if out is None else out
    step = packed.amin(1, keepdim=True)
    found[:, :1] = step
    for t in range(1, top + 1):  # entries now hold (value - found[t - 1] - 1) mod 2^(b-1)
        packed.sub_(step.add_(1)).bitwise_and_(limit)
        step = packed.amin(1, keepdim=True)
        found[:, t : t + 1] = (step + found[:, t - 1 : t]).add_(1)
    return found


def _gram_weights(xt: Tensor, m: Tensor | None) -> Tensor:
    """``(P, ..., r)``: the terms of :func:`op._gram_weights`, ``m, m x_a, m x_a x_b (a <= b)``, for ``xt`` ``(d, ..., r)``.

    Written in place into one buffer (``stack``/``cat`` of the terms cost several times more).
    """
    d = xt.shape[0]
    out = xt.new_empty(_gram_terms(d), *xt.shape[1:])
    if m is None:
        out[0].fill_(1.0)
        out[1 : 1 + d].copy_(xt)
    else:
        out[0].copy_(m)
        torch.mul(m, xt, out=out[1 : 1 + d])
    pos = 1 + d
    for a in range(d):  # m x_a x_b for b >= a
        torch.mul(out[1 + a], xt[a:], out=out[pos : pos + d - a])
        pos += d - a
    return out


def _second_weights(xt: Tensor, m: Tensor | None) -> Tensor:
    """``(d (d + 1) / 2, ..., r)``: ``m x_a x_b (a <= b)``, the last terms of :func:`_gram_weights`."""
    return _gram_weights(xt, m)[1 + xt.shape[0] :]


def _take(t: Tensor, pos: slice | Tensor) -> Tensor:
    """``t[..., pos]``: a view for a slice; for an index, a gather through a 2-D view of ``t``.

    (``index_select`` along the last dim of a 3-D tensor, or advanced indexing,
    is tens of times slower than along dim 1 of a 2-D one.)
    """
    if isinstance(pos, slice):
        return t[..., pos]
    return t.reshape(-1, t.shape[-1]).index_select(1, pos).view(*t.shape[:-1], -1)


def _put(t: Tensor, pos: slice | Tensor, value: Tensor) -> None:
    """``t[..., pos] = value`` for a contiguous ``t`` (see :func:`_take`)."""
    if isinstance(pos, slice):
        t[..., pos] = value
    else:
        t.view(-1, t.shape[-1]).index_copy_(1, pos, value.reshape(-1, pos.numel()).to(t.dtype))


def _scatter(sums: Tensor, keys: Tensor, src: Tensor) -> None:
    """``sums[col, keys[i]] += src[col, i]`` for every column of ``sums`` (C, bins), in float64.

    A scatter-add adds in sequence: in float32, thousands of items on one
    centroid would lose digits (the mean of copies of one value would not
    be that value to float32 precision).  On the CPU one native loop adds
    them (:func:`.native.scatter`); elsewhere the items go in pieces of
    ``SCATTER_ITEMS``: their float64 copies then stay small (a large
    temporary costs page faults on every call, more than the scatter itself).
    """
    cols, items = sums.shape[0], keys.numel()
    src = src.reshape(cols, -1)
    if native.scatter(sums, keys, src):  # (one loop, float64 sums, no copies)
        return
    buffer = sums.new_empty(cols, min(items, SCATTER_ITEMS))  # one float64 piece, reused
    for start in range(0, items, SCATTER_ITEMS):
        part = slice(start, start + SCATTER_ITEMS)
        piece = buffer[:, : min(SCATTER_ITEMS, items - start)]
        sums.scatter_add_(1, keys[part].long().expand(cols, -1), piece.copy_(src[:, part]))


def _hard_part(
    data: _Data,
    sel: Selection,
    pos: slice | Tensor,
    vectors: Tensor,
    hard: Tensor,
    near: Tensor,
    old: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Add the hard rows at positions ``pos`` to ``sel.hard_sums`` (and remove them as they were, ``old``).

    Every Gram weight (:func:`_gram_weights`) is summed here, once per
    selection: the iterations use the first ``1 + d``, the backward all.
    ``vectors`` (d, G, r) are the rows', ``hard`` / ``near`` (G, r) their
    flags and nearest centroids, ``old`` the flags and nearest centroids
    they had.  The soft rows' terms go to a spare bin, dropped.
    """
    g, k = sel.hard.shape[0], sel.ref.shape[1]
    weights = _gram_weights(vectors, None if data.m is None else _take(data.m, pos))  # (P, G, r)
    bins = sel.hard_sums.shape[0], g * k + 1
    for (flags, nearest), sign in [((hard, near), 1.0)] + ([] if old is None else [(old, -1.0)]):
        keys = nearest.long()
        if g > 1:
            keys = keys + (torch.arange(g, device=keys.device) * k).view(g, 1)
        sums = torch.zeros(bins, dtype=sel.hard_sums.dtype, device=keys.device)
        _scatter(sums, keys.masked_fill_(~flags, g * k).view(-1), weights)
        sel.hard_sums.add_(sums[:, : g * k], alpha=sign)


def _choose(
    data: _Data,
    sel: Selection,
    c: Tensor,
    tau: Tensor,
    pos: slice | Tensor,
    found: Tensor | None = None,
    again: bool = False,
) -> None:
    """Choose the sets of the rows at positions ``pos`` (in every group) at centroids ``c``.

    With ``near`` / ``root`` the square roots of an upper bound on the
    squared distance to the nearest centroid and of a lower bound on those
    outside the set, a row's score (``-log`` of its bound) is
    ``(root^2 - near^2) / tau - log(centroids outside)``.  Centroids that
    moved by at most ``delta`` lower it to ``((root - delta)^2 - (near +
    delta)^2) / tau - ...``, linear in ``delta``: ``slack`` is the ``delta``
    that brings it down to ``min(-log eps, score - RESELECT)``.

    The nearest two (``found``, the rows' :func:`rank` at ``c`` if already
    known) decide which rows are hard; only the others are ranked further.
    ``again``: the rows were chosen before (their hard rows leave the sums).
    """
    k, top = c.shape[1], sel.top
    mask = (1 << _index_bits(k)) - 1
    eps = torch.finfo(c.dtype).eps
    vectors = data.at(pos)
    xt = vectors.transpose(0, 1)  # (G, d, r)
    old = (_take(sel.hard, pos).clone(), _take(sel.index[:, 0], pos).clone()) if again else None
    if found is None:
        found = _rank(xt, c, 1)
    packed = _bounds(xt, k)
    second = packed.lower(found[:, 1])
    nearest = packed.upper(found[:, 0])
    inv_tau = (1.0 / tau).view(-1, 1)
    log_soft, log_hard = math.log(k - top), math.log(k - 1)
    # every row as if hard (the set its nearest alone, the first centroid left out the second nearest) ...
    score = (second - nearest).mul_(inv_tau).sub_(log_hard)
    # hard: the mass off the nearest is below eps exp(-HARD_MARGIN)
    hard = score >= HARD_MARGIN - math.log(eps)
    slack = _slack(score, second, nearest, inv_tau, eps)
    near = found[:, 0] & mask
    _put(sel.index[:, 0], pos, near)
    soft = (~hard).any(0).nonzero().squeeze(1)
    if soft.numel():  # ... then the rows soft in some group: their top nearest, scored on the (top + 1)-th
        xs = _take(xt, soft)
        at = soft + pos.start if isinstance(pos, slice) else _take(pos, soft)
        full = _take(found, soft)
        if top > 1:
            full = _rank(xs, c, top)
            hard_s, second_s, nearest_s = _take(hard, soft), _take(second, soft), _take(nearest, soft)
            bound_s = torch.where(hard_s, second_s, _bounds(xs, k).lower(full[:, top]))
            score_s = (bound_s - nearest_s).mul_(inv_tau).sub_(torch.where(hard_s, log_hard, log_soft))
            score.index_copy_(1, soft, score_s)
            slack.index_copy_(1, soft, _slack(score_s, bound_s, nearest_s, inv_tau, eps))
            for t in range(1, top):  # (the hard rows' other slots are not read)
                _put(sel.index[:, t], at, full[:, t] & mask)
        if sel.soft is not None:
            sel.soft.append(_chosen(data, _take(hard, soft), at, xs, full[:, :top] & mask, k, tau))
    if data.m is not None:
        pad = _take(data.m, pos) <= 0
        slack.masked_fill_(pad, math.inf)
        score.masked_fill_(pad, math.inf)
    _put(sel.hard, pos, hard)
    _put(sel.slack, pos, slack)
    sel.base = torch.maximum(sel.base, _dropped(score))
    _hard_part(data, sel, pos, vectors, hard, near, old)


def _chosen(data: _Data, hard: Tensor, at: Tensor, xs: Tensor, slots: Tensor, k: int, tau: Tensor) -> _Soft:
    """The soft rows among columns ``at`` (hard flags ``hard`` (G, s), vectors ``xs`` (G, d, s), sets ``slots``
    (G, top, s)) as a :class:`_Soft` chunk: what :func:`_soft_layout` would gather for them."""
    g, n = data.xf.shape[1], data.xf.shape[2]
    s = at.numel()
    pick = (~hard).view(-1).nonzero().squeeze(1)  # flat (group, column) pairs, group-major like the rows
    group = pick.div(s, rounding_mode="floor") if g > 1 else None
    col = pick - group * s if group is not None else pick
    rows = at.index_select(0, col) + (group * n if group is not None else 0)
    keys = slots.permute(1, 0, 2).reshape(slots.shape[1], g * s).index_select(1, pick).long()
    if group is not None:
        keys += group * k
    xt = xs.permute(1, 0, 2).reshape(xs.shape[1], g * s).index_select(1, pick)
    m = None if data.m is None else data.m.reshape(-1).index_select(0, rows)
    inv_tau = 1.0 / tau
    return _Soft(rows, keys, xt, m, inv_tau if group is None else inv_tau.index_select(0, group))


def _drop(soft: list[_Soft], pos: Tensor, g: int, n: int) -> list[_Soft]:
    """``soft`` without the rows at positions ``pos`` (of any group)."""
    gone = torch.zeros(n, dtype=torch.bool, device=pos.device)
    gone[pos] = True
    kept = []
    for ch in soft:
        keep = ~gone.index_select(0, ch.rows % n if g > 1 else ch.rows)
        if bool(keep.all()):
            kept.append(ch)
            continue
        idx = keep.nonzero().squeeze(1)
        if idx.numel():
            kept.append(
                _Soft(
                    ch.rows.index_select(0, idx),
                    ch.keys.index_select(1, idx),
                    ch.xt.index_select(1, idx),
                    None if ch.m is None else ch.m.index_select(0, idx),
                    ch.inv_tau if ch.inv_tau.numel() == 1 else ch.inv_tau.index_select(0, idx),
                )
            )
    return kept


def _slack(score: Tensor, bound_sq: Tensor, nearest: Tensor, inv_tau: Tensor, eps: float) -> Tensor:
    """The move after which a row's score could fall to ``max(-log eps, score - RESELECT)`` (see :func:`_choose`)."""
    room = (score + math.log(eps)).clamp_min_(RESELECT)  # score less the floor it may drop to
    root = bound_sq.sqrt()
    return torch.minimum(room.div_(inv_tau).div_((root + nearest.sqrt()).mul_(2.0)), root)


def _rank(xt: Tensor, c: Tensor, top: int) -> Tensor:
    """``(G, top + 1, r)``: the packed squared distances from ``xt`` (G, d, r) to the ``top + 1`` nearest of ``c``."""
    g, r = xt.shape[0], xt.shape[2]
    found = torch.empty(g, top + 1, r, dtype=_INT_OF[c.dtype], device=c.device)
    lhs = _lhs(c) if c.shape[2] > 1 else None
    for start in range(0, r, SELECT_ROWS):  # the (k x rows) distances stay in cache
        part = slice(start, min(start + SELECT_ROWS, r))
        _smallest(_packed_distances(xt[..., part], c, lhs), top, out=found[..., part])
    return found


@dataclass
class Ranking:
    """Each vector's two nearest centroids at ``c`` (``k >= 2``), from :func:`rank`.

    ``found`` (G, 2, n) holds the packed squared distances of
    :func:`_packed_distances` (the centroid index in the low bits), nearest
    first; ``xf`` is the vectors' :func:`coordinate_major` copy.  The layer
    reads the temperature's margins from it (:func:`nearest_two`), and
    :func:`dkm_sparse` takes it as ``ranked`` instead of ranking the same
    vectors at the same centroids again.
    """

    found: Tensor
    xf: Tensor
    c: Tensor


def rank(x: Tensor, c: Tensor) -> Ranking:
    """The :class:`Ranking` of the vectors ``x`` (G, n, d) at the centroids ``c`` (G, k >= 2, d)."""
    xf = coordinate_major(x)
    with _no_autocast(x.device):
        return Ranking(_rank(xf.transpose(0, 1), c, 1), xf, c)


def nearest_two(ranked: Ranking) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`hard.nearest_two` read from a :class:`Ranking`: ``(index, distance, second distance)``, each ``(G, n)``.

    The distances are the packed ones with the index bits cleared (truncated towards 0).
    """
    mask = (1 << _index_bits(ranked.c.shape[1])) - 1
    found = ranked.found
    dtype = torch.float32 if found.dtype == torch.int32 else torch.float64
    first, second = found[:, 0], found[:, 1]
    return first & mask, (first & ~mask).view(dtype), (second & ~mask).view(dtype)


def _select(data: _Data, c: Tensor, tau: Tensor, top: int, ranked: Ranking | None = None) -> Selection:
    d, g, n = data.xf.shape
    k = c.shape[1]
    top = min(top, k)
    index_dtype = torch.uint8 if k <= 256 else torch.int32
    hard_sums = torch.zeros(_gram_terms(d), g * k, dtype=torch.float64, device=c.device)
    hard = torch.zeros(g, n, dtype=torch.bool, device=c.device)
    slack = c.new_full((g, n), math.inf)
    if top >= k:  # every centroid kept: the dense op
        index = torch.arange(k, device=c.device, dtype=index_dtype).view(1, k, 1).expand(g, k, n)
        return Selection(index, hard, slack, c, hard_sums, c.new_zeros(g))
    index = torch.zeros(g, top, n, dtype=index_dtype, device=c.device)
    sel = Selection(index, hard, slack, c, hard_sums, c.new_zeros(g), soft=[])
    for s in _chunks(n, data.rows):
        _choose(data, sel, c, tau, s, None if ranked is None else ranked.found[..., s])
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
    dropped = _rebased_bound(sel, c)
    if not bool(stale.any()):
        return dropped, None
    return torch.where(stale.any(1), 1.0, dropped), stale  # no bound for groups with stale rows


def _rebased_bound(sel: Selection, c: Tensor) -> Tensor:
    """``(G,)`` the bound of :func:`_check` when no row is stale: ``max(eps, exp(RESELECT) base)``."""
    return (sel.base * math.exp(RESELECT)).clamp_(torch.finfo(c.dtype).eps, 1.0)


def _repair(data: _Data, sel: Selection, c: Tensor, tau: Tensor, stale: Tensor) -> Selection:
    """Move ``sel``'s reference to ``c`` and choose the stale rows' sets again there.

    By the triangle inequality a row keeps its guarantee up to a move of
    ``slack - |c - ref|`` from the new reference; the stale rows (every group
    at their positions) get fresh sets and slacks.
    """
    sel.slack.sub_(sel.moved(c))
    sel.ref, sel.rebased = c, True
    pos = stale.any(0).nonzero().squeeze(1)
    if sel.soft is not None:
        sel.soft = _drop(sel.soft, pos, *sel.hard.shape)
    for s in _chunks(pos.numel(), data.rows):
        _choose(data, sel, c, tau, pos[s], again=True)
    return sel


def _current(
    data: _Data, sel: Selection, soft: list[_Soft] | None, c: Tensor, tau: Tensor
) -> tuple[Selection, list[_Soft], Tensor]:
    """The selection and soft rows to evaluate at ``c`` (stale rows chosen again) and the dropped-mass bound there."""
    dropped, stale = _check(sel, c)
    if stale is not None:
        # every row is now within its slack: the chosen ones have slack >= 0 at ``ref = c``, the others
        # kept slack - |c - ref| >= 0 (float subtraction is monotone), so :func:`_check` would find none stale
        sel = _repair(data, sel, c, tau, stale)
        dropped = _rebased_bound(sel, c)
        soft = None
    if soft is None:
        soft = list(sel.soft) if sel.soft is not None else _soft_layout(data, sel.index, sel.hard, c.shape[1], tau)
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


def _soft_layout(
    data: _Data, index: Tensor, hard: Tensor, k: int, tau: Tensor, order: list[Tensor] | None = None
) -> list[_Soft]:
    """The soft rows, flat over groups, in chunks (the flat rows of each chunk given as ``order``, or in row order)."""
    d, g, n = data.xf.shape
    top = index.shape[1]
    ids = index.transpose(0, 1).reshape(top, g * n)
    mf = None if data.m is None else data.m.reshape(-1)
    inv_tau = 1.0 / tau
    if order is None:
        rows_all = (~hard).reshape(-1).nonzero().squeeze(1)
        order = [rows_all[s] for s in _chunks(rows_all.numel(), min(data.rows, SOFT_ROWS))]
    soft = []
    for rows in order:
        soft.append(
            _Soft(
                rows,
                _keys(rows, ids.index_select(1, rows), n, k, g),
                data.rows_of(rows),
                None if mf is None else mf.index_select(0, rows),
                inv_tau if g == 1 else inv_tau.index_select(0, rows // n),
            )
        )
    return soft


@dataclass
class _Layout:
    """Soft rows in chunks; every row's key for the hard rows' one-hot attention.

    ``hard_keys`` holds, for every flat row, its centroid's flat key ``g * k + j``
    when the row is hard and the spare key ``G * k`` when it is soft: gathers
    from a centroid table with one extra (zero) column and scatters into sums
    with one extra (discarded) bin then treat the hard rows in row order, with
    no list of them to gather through.
    """

    soft: list[_Soft]
    hard_keys: Tensor  # (G n,) int32
    hard_m: Tensor | None  # (G n,) the multiplicities (every row's)


def _layout(
    data: _Data,
    index: Tensor,
    hard: Tensor,
    k: int,
    tau: Tensor,
    soft: list[_Soft] | None = None,
    order: list[Tensor] | None = None,
) -> _Layout:
    """Soft rows (``soft`` if already laid out, else in chunks of ``order``) and hard rows."""
    if soft is None:
        soft = _soft_layout(data, index, hard, k, tau, order)
    return _Layout(soft, _hard_keys(index, hard, k), None if data.m is None else data.m.reshape(-1))


def _hard_keys(index: Tensor, hard: Tensor, k: int) -> Tensor:
    """``(G n,)``: each hard row's flat centroid key, ``G * k`` for the soft rows (see :class:`_Layout`)."""
    g, n = hard.shape
    keys = index[:, 0].to(torch.int32)  # (int32: half the bytes; :func:`_scatter` widens it a piece at a time)
    if g > 1:
        keys = keys + (torch.arange(g, device=hard.device, dtype=torch.int32) * k).view(g, 1)
    return keys.masked_fill_(~hard, g * k).view(-1)


def _spare(table: Tensor) -> Tensor:
    """``(C, bins + 1)``: ``table`` with a zero column for the spare key of the soft rows."""
    return torch.cat([table, table.new_zeros(table.shape[0], 1)], 1)


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
    sums = sel.hard_sums[: 1 + d].clone()  # A~^T m, A~^T m x: the hard rows' part is constant
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
    data: _Data, c: Tensor, tau: Tensor, max_iters: int, tol: Tensor, top: int, ranked: Ranking | None = None
) -> tuple[Tensor, int, Selection, list[_Soft], Tensor]:
    dropped = c.new_zeros(c.shape[0])
    sel = _select(data, c, tau, top, ranked)
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
    out = _rows(_spare(ct).t(), lay.hard_keys)  # (G n, d); soft rows overwritten below
    for ch in lay.soft:
        a, dcx = _attend(ch, ct)
        # A~ c = x + sum_j A~_ij (c_j - x_i): the rows of A~ sum to 1
        out.index_copy_(0, ch.rows, (a.unsqueeze(0) * dcx).sum(1).add_(ch.xt).t())
    return out.view(g, n, d)


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
    dx_rows = c.new_zeros(g * n, d)
    dx = dx_rows.t()  # (d, G n), a view: the result needs no transpose
    pairs = _pairs(top) if explicit else []
    grad_rows = None if grad_w is None else grad_w.reshape(g * n, d)
    gf = None if grad_rows is None else grad_rows.t()
    # per centroid: the P Gram sums, then (with grad_w) A~^T g (d) and sum_i s_ij (c_j - x_i) (d)
    cols = p_terms + (2 * d if gf is not None else 0)
    spare = torch.zeros(cols, g * k + 1, dtype=torch.float64, device=c.device)  # + the soft rows' spare bin
    sums = spare[:, : g * k]
    sums[:p_terms] += _hard_sums(data, lay, g * k, hard_sums)
    if gf is not None:
        _scatter(spare[p_terms : p_terms + d], lay.hard_keys, gf)
    pair_sums = torch.zeros(p_terms, g * k * k, dtype=torch.float64, device=c.device) if pairs else None
    pair_u = torch.tensor([u for u, _ in pairs], dtype=torch.long, device=c.device)
    pair_v = torch.tensor([v for _, v in pairs], dtype=torch.long, device=c.device)
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
            gs = _rows(grad_rows, ch.rows).t().unsqueeze(1)  # (d, 1, r)
            gd = (gs * dcx).sum(0)  # (T, r): g_i . (c_j - x_i)
            sa = a * (gd - (a * gd).sum(0, keepdim=True))  # dL/dlogits
            torch.mul(a.unsqueeze(0), gs, out=src[p_terms : p_terms + d])
            torch.mul(sa.unsqueeze(0), dcx, out=src[p_terms + d :])
            dx.index_add_(1, ch.rows, src[p_terms + d :].sum(1).mul_(2.0 * ch.inv_tau))
        _scatter(sums, ch.keys.view(-1), src)
        if pair_sums is not None:
            first = ch.keys.index_select(0, pair_u)  # (Q, r)
            second = ch.keys.index_select(0, pair_v)
            if g > 1:
                second = second % k
            prod = a.index_select(0, pair_u).mul_(a.index_select(0, pair_v))
            # out=: a broadcast product allocated by torch itself gets a layout many times slower to write
            src = c.new_empty(p_terms, *prod.shape)
            torch.mul(prod.unsqueeze(0), weights.unsqueeze(1), out=src)
            _scatter(pair_sums, first.mul_(k).add_(second).view(-1), src)

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
    return dx_rows.view(g, n, d)


def _prepare(
    x: Tensor,
    m: Tensor | None,
    index: Tensor,
    hard: Tensor,
    k: int,
    tau: Tensor,
    rows: int,
    order: list[Tensor] | None = None,
) -> tuple[_Data, _Layout]:
    data = _Data.of(x, m, k, rows)
    return data, _layout(data, index, hard, k, tau, order=order)


def _layout_bytes(data: _Data, lay: _Layout) -> int:
    """What keeping ``data`` and ``lay`` from forward to backward costs, beyond the saved tensors."""
    soft = sum(ch.keys.numel() * 8 + ch.rows.numel() * 8 + ch.xt.numel() * ch.xt.element_size() for ch in lay.soft)
    return data.xf.numel() * data.xf.element_size() + soft + 4 * lay.hard_keys.numel()


def _hard_sums(data: _Data, lay: _Layout, bins: int, first: Tensor | None) -> Tensor:
    """``(P, bins)`` float64: the hard rows' Gram weights summed per centroid.

    ``first``: :attr:`Selection.hard_sums`, all ``P`` of them, or the first ``1 + d``.
    """
    d = data.xf.shape[0]
    p_terms = _gram_terms(d)
    if first is not None and first.shape[0] == p_terms:
        return first.clone()
    sums = torch.zeros(p_terms, bins + 1, dtype=torch.float64, device=data.xf.device)  # + the spare bin
    if first is not None:
        sums[: 1 + d, :bins] = first
    part = sums[1 + d :] if first is not None else sums
    weights = _second_weights if first is not None else _gram_weights
    xf = data.xf.reshape(d, -1)  # (the spare bin takes the soft rows' terms)
    for s in _chunks(lay.hard_keys.numel(), data.rows):
        _scatter(part, lay.hard_keys[s], weights(xf[:, s], None if lay.hard_m is None else lay.hard_m[s]))
    return sums[:, :bins]


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
    hard = _rows(_spare(ut).t(), lay.hard_keys)  # (G n, d), 0 for the soft rows
    dx.t().add_(hard if lay.hard_m is None else hard.mul_(lay.hard_m.unsqueeze(1)))
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
    def forward(ctx, x, m, c0, tau, top, max_iters, tol, rows, grad_tol, ranked):  # type: ignore[override]
        k = c0.shape[1]
        with _no_autocast(x.device):
            if ranked is not None and not (ranked.c is c0 or torch.equal(ranked.c, c0)):
                ranked = None  # ranked at other centroids
            data = _Data.of(x, m, k, rows, None if ranked is None else ranked.xf)
            c, iters, sel, soft, dropped = _iterate(data, c0, tau, max_iters, tol, top, ranked)
            sel, soft, out_dropped = _current(data, sel, soft, c, tau)
            lay = _layout(data, sel.index, sel.hard, k, tau, soft)
            w = _soft_output(data, lay, c)
        dropped = torch.maximum(dropped, out_dropped)
        # the flat layout is kept for backward when it fits the chunk budget (else rebuilt there)
        ctx.prepared = (data, lay) if _layout_bytes(data, lay) <= data.budget else None
        ctx.order = None
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
            prepared = ctx.prepared
            if prepared is None:  # (again in the forward's chunks, if known: a second backward gives the same bits)
                prepared = _prepare(x, m, index, hard, c.shape[1], tau, ctx.rows, ctx.order)
            dx = backward(
                x, m, c, tau, index, hard, grad_w, grad_c, ctx.rows,
                max_terms=ctx.max_terms, tol=ctx.grad_tol, hard_sums=hard_sums, prepared=prepared,
            )  # fmt: skip
        # the layout is dropped (it is rebuilt if backward runs again); its chunks' rows are small
        ctx.prepared, ctx.order = None, [ch.rows for ch in prepared[1].soft]
        return dx, None, None, None, None, None, None, None, None, None


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
    ranked: Ranking | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`op.dkm` with each row's attention on its ``top`` nearest centroids.

    Returns ``(w, c*, dropped)``: ``dropped`` (G,) bounds the attention mass
    any real row (multiplicity > 0) leaves out, in any evaluation of the call
    (see the module docstring; 0 when ``top >= k``).  ``w`` and ``c*`` are
    differentiable into ``x``; ``c0`` and ``tau`` are constants.  ``ranked``:
    :func:`rank` ``(x, c0)``, when the caller has it already (ignored if ranked at other centroids).
    """
    if top < 1:
        raise ValueError(f"top must be >= 1, got {top}")
    top = min(top, c0.shape[1])
    return SparseDKMFunction.apply(x, m, c0.detach(), tau.detach(), top, max_iters, tol, rows, grad_tol, ranked)

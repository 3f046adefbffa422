"""The sparse path's sets: which centroids each row attends to, and when the sets must be chosen again.

See :mod:`.sparse` for the guarantees.  A row's set is its ``top`` nearest
centroids, or its nearest alone (a *hard* row) when the mass on every other
centroid is provably below ``eps * exp(-HARD_MARGIN)``.  The sets come from one
pass of the layer's ``row_sets`` kernel (:mod:`torchdkm.kernels`: packed
ranking in torch, exact distances in the native loop); they are kept while the
centroids move within each row's *slack*, and the rows whose slack the
centroids outran are chosen again (:func:`current`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels.ranking import Ranking
from .problem import gram_terms, row_chunks
from .rows import Data, SoftChunk, attention_floor, merged, put, soft_layout, take, without_rows

#: An evaluation is redone on new sets when the centroids' moves have raised the dropped-mass
#: bound above ``exp(RESELECT)`` times its value at selection (and above the float resolution).
RESELECT = 1.0
#: A row is one-hot ("hard") when, at selection, its mass off the nearest centroid is provably
#: below ``eps * exp(-HARD_MARGIN)``: the margin lets the centroids move before that bound reaches ``eps``.
HARD_MARGIN = 8.0


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
    soft: list[SoftChunk] | None = None  # the soft rows laid out as they were chosen (None: lay them out from the flags)

    @property
    def top(self) -> int:
        return self.index.shape[1]

    @property
    def dense(self) -> bool:
        return self.top >= self.ref.shape[1]

    def moved(self, c: Tensor) -> Tensor:
        """``(G, 1)`` the largest move of any centroid from ``ref``."""
        return (c - self.ref).norm(dim=-1).amax(1, keepdim=True)


def add_hard_rows(
    data: Data,
    sel: Selection,
    pos: slice | Tensor,
    vectors: Tensor,
    hard: Tensor,
    near: Tensor,
    old: tuple[Tensor, Tensor] | None = None,
) -> None:
    """Add the hard rows at positions ``pos`` to ``sel.hard_sums`` (and remove them as they were, ``old``).

    Every Gram weight (the ``gram_scatter`` kernel's) is summed here, once
    per selection: the iterations use the first ``1 + d``, the backward all.
    ``vectors`` (d, G, r) are the rows', ``hard`` / ``near`` (G, r) their
    flags and nearest centroids, ``old`` the flags and nearest centroids
    they had.  The soft rows' terms go to a spare bin, dropped.
    """
    g, k = sel.hard.shape[0], sel.ref.shape[1]
    m = None if data.m is None else take(data.m, pos)
    bins = sel.hard_sums.shape[0], g * k + 1
    for (flags, nearest), sign in [((hard, near), 1.0)] + ([] if old is None else [(old, -1.0)]):
        keys = nearest.long()
        if g > 1:
            keys = keys + (torch.arange(g, device=keys.device) * k).view(g, 1)
        sums = torch.zeros(bins, dtype=sel.hard_sums.dtype, device=keys.device)
        data.kernels.gram_scatter(sums, keys.masked_fill_(~flags, g * k).view(-1), vectors, m, 0)
        sel.hard_sums.add_(sums[:, : g * k], alpha=sign)


def choose(
    data: Data,
    sel: Selection,
    c: Tensor,
    tau: Tensor,
    pos: slice | Tensor,
    two: tuple[Tensor, Tensor, Tensor] | None = None,
    again: bool = False,
) -> None:
    """Choose the sets of the rows at positions ``pos`` (in every group) at centroids ``c``.

    With ``near`` / ``root`` the square roots of an upper bound on the
    squared distance to the nearest centroid and of a lower bound on those
    outside the set, a row's score (``-log`` of its bound) is
    ``(root^2 - near^2) / tau - log(centroids outside)``.  Centroids that
    moved by at most ``delta`` lower it to ``((root - delta)^2 - (near +
    delta)^2) / tau - ...``, linear in ``delta``: ``slack`` is the ``delta``
    that brings it down to ``min(-log eps, score - RESELECT)``.  A row is hard
    when its score with the nearest alone reaches ``HARD_MARGIN - log eps``.
    The layer's ``row_sets`` kernel computes all four per row
    (:mod:`torchdkm.kernels`); ``two`` is the rows' nearest two at ``c`` if
    already known (the torch kernel reuses them).  ``again``: the rows were
    chosen before (their hard rows leave the sums).
    """
    k, top = c.shape[1], sel.top
    eps = torch.finfo(c.dtype).eps
    vectors = data.at(pos)
    xt = vectors.transpose(0, 1)  # (G, d, r)
    old = (take(sel.hard, pos).clone(), take(sel.index[:, 0], pos).clone()) if again else None
    pad = None if data.m is None else take(data.m, pos) <= 0  # padding rows weigh nothing: made hard
    inv_tau = (1.0 / tau).view(-1, 1)
    near = (None, None, None) if two is None else two
    hard_score = HARD_MARGIN - math.log(eps)
    index, hard, score, slack = data.kernels.row_sets(xt, c, inv_tau, top, pad, *near, hard_score, RESELECT)
    put(sel.index, pos, index)
    if sel.soft is not None:
        soft = (~hard).any(0).nonzero().squeeze(1)
        if soft.numel():
            at = soft + pos.start if isinstance(pos, slice) else take(pos, soft)
            sel.soft.append(soft_chunk_of(data, take(hard, soft), at, take(xt, soft), take(index, soft), k, tau))
    put(sel.hard, pos, hard)
    put(sel.slack, pos, slack)
    sel.base = torch.maximum(sel.base, dropped_bound(score))
    add_hard_rows(data, sel, pos, vectors, hard, index[:, 0], old)


def soft_chunk_of(data: Data, hard: Tensor, at: Tensor, xs: Tensor, slots: Tensor, k: int, tau: Tensor) -> SoftChunk:
    """The soft rows among columns ``at`` (hard flags ``hard`` (G, s), vectors ``xs`` (G, d, s), sets ``slots``
    (G, top, s)) as a :class:`SoftChunk` chunk: what :func:`soft_layout` would gather for them."""
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
    return SoftChunk(rows, keys, xt, m, inv_tau if group is None else inv_tau.index_select(0, group))


def select(data: Data, c: Tensor, tau: Tensor, top: int, ranked: Ranking | None = None) -> Selection:
    d, g, n = data.xf.shape
    k = c.shape[1]
    top = min(top, k)
    index_dtype = torch.uint8 if k <= 256 else torch.int32
    hard_sums = torch.zeros(gram_terms(d), g * k, dtype=torch.float64, device=c.device)
    hard = torch.zeros(g, n, dtype=torch.bool, device=c.device)
    slack = c.new_full((g, n), math.inf)
    if top >= k:  # every centroid kept: the dense op
        index = torch.arange(k, device=c.device, dtype=index_dtype).view(1, k, 1).expand(g, k, n)
        return Selection(index, hard, slack, c, hard_sums, c.new_zeros(g))
    index = torch.zeros(g, top, n, dtype=index_dtype, device=c.device)
    sel = Selection(index, hard, slack, c, hard_sums, c.new_zeros(g), soft=[])
    for s in row_chunks(n, data.rows):
        choose(data, sel, c, tau, s, None if ranked is None else tuple(t[..., s] for t in ranked.nearest_two()))
    return sel


def dropped_bound(score: Tensor) -> Tensor:
    """``(G,)`` the largest dropped-mass bound ``exp(-score)`` over the rows, floored at ``eps^2``."""
    low = score.amin(1).clamp_max(-attention_floor(score.dtype))
    return torch.where(low == math.inf, 0.0, (-low).exp().clamp_max(1.0))


def check(sel: Selection, c: Tensor) -> tuple[Tensor, Tensor | None]:
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
    dropped = rebased_bound(sel, c)
    if not bool(stale.any()):
        return dropped, None
    return torch.where(stale.any(1), 1.0, dropped), stale  # no bound for groups with stale rows


def rebased_bound(sel: Selection, c: Tensor) -> Tensor:
    """``(G,)`` the bound of :func:`check` when no row is stale: ``max(eps, exp(RESELECT) base)``."""
    return (sel.base * math.exp(RESELECT)).clamp_(torch.finfo(c.dtype).eps, 1.0)


def repair(data: Data, sel: Selection, c: Tensor, tau: Tensor, stale: Tensor) -> Selection:
    """Move ``sel``'s reference to ``c`` and choose the stale rows' sets again there.

    By the triangle inequality a row keeps its guarantee up to a move of
    ``slack - |c - ref|`` from the new reference; the stale rows (every group
    at their positions) get fresh sets and slacks.
    """
    sel.slack.sub_(sel.moved(c))
    sel.ref, sel.rebased = c, True
    pos = stale.any(0).nonzero().squeeze(1)
    if sel.soft is not None:
        sel.soft = without_rows(sel.soft, pos, *sel.hard.shape)
    for s in row_chunks(pos.numel(), data.rows):
        choose(data, sel, c, tau, pos[s], again=True)
    if sel.soft is not None:
        sel.soft = merged(sel.soft)
    return sel


def current(
    data: Data, sel: Selection, soft: list[SoftChunk] | None, c: Tensor, tau: Tensor
) -> tuple[Selection, list[SoftChunk], Tensor]:
    """The selection and soft rows to evaluate at ``c`` (stale rows chosen again) and the dropped-mass bound there."""
    dropped, stale = check(sel, c)
    if stale is not None:
        # every row is now within its slack: the chosen ones have slack >= 0 at ``ref = c``, the others
        # kept slack - |c - ref| >= 0 (float subtraction is monotone), so :func:`check` would find none stale
        sel = repair(data, sel, c, tau, stale)
        dropped = rebased_bound(sel, c)
        soft = None
    if soft is None:
        soft = list(sel.soft) if sel.soft is not None else soft_layout(data, sel.index, sel.hard, c.shape[1], tau)
    return sel, soft, dropped

"""The sparse path's flat row layout: its rows, chunks of soft rows, and the attention over each row's set.

A selection (:mod:`.selection`) splits the rows into *hard* rows (one-hot on
their nearest centroid) and *soft* rows (a renormalised softmax over their
``top`` nearest).  The soft rows are laid out flat over groups, in chunks
(:class:`SoftChunk`), as they are chosen; the hard rows are read through one
key per row (:class:`RowLayout`).  Everything here works coordinate-major,
``(d, ...)``, so that every op runs along rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import Kernels
from ..kernels.ranking import coordinate_major
from .problem import row_chunks, rows_for

#: Rows per chunk at most (per-row work: selection scores, soft rows' attention).
MAX_ROWS = 65536
#: Soft rows per chunk at most: the ``(top x rows)`` maps of a chunk then stay in cache.
SOFT_ROWS = 16384


def attention_floor(dtype: torch.dtype) -> float:
    """``log(eps^2)``: the smallest attention entry (and bound) relative to the row's largest."""
    return 2.0 * math.log(torch.finfo(dtype).eps)


@dataclass
class Data:
    """One call's vectors: ``xf`` coordinate-major ``(d, G, n)``, so that every op runs along rows.

    ``flat`` is the same vectors as ``(G n, d)`` rows (the caller's layout):
    gathers of rows go through it (along dim 0), and per-vector results are
    written in that layout.  ``xf`` is the one transposed copy (elementwise
    ops on the strided view cost several times more).  ``rows`` is the rows per
    chunk of a pass, ``budget`` the bytes of temporaries the problem allows
    (what the backward keeps across chunks stays within it), ``kernels`` the
    layer's (:mod:`torchdkm.kernels`: the float64 scatter-adds, the set choice).
    """

    x: Tensor
    m: Tensor | None
    xf: Tensor
    flat: Tensor
    rows: int
    budget: float
    kernels: Kernels

    @staticmethod
    def of(x: Tensor, m: Tensor | None, k: int, budget: float, kernels: Kernels, xf: Tensor | None = None) -> Data:
        """``xf``: :func:`coordinate_major` ``(x)``, if already made."""
        g, n, d = x.shape
        rows = max(1, min(rows_for(budget, g, k, d, x.element_size()), MAX_ROWS))
        xf = coordinate_major(x) if xf is None else xf
        return Data(x, m, xf, x.reshape(g * n, d), rows, budget, kernels)

    def at(self, pos: slice | Tensor) -> Tensor:
        """``(d, G, r)``: the vectors at positions ``pos`` of every group (a view for a slice)."""
        if isinstance(pos, slice):
            return self.xf[:, :, pos]
        d, g, n = self.xf.shape
        rows = pos if g == 1 else (pos + n * torch.arange(g, device=pos.device).view(g, 1)).view(-1)
        return gather_rows(self.flat, rows).view(g, -1, d).permute(2, 0, 1)

    def rows_of(self, rows: Tensor) -> Tensor:
        """``(d, r)``: the vectors at flat rows ``rows``, coordinate-major."""
        return gather_rows(self.flat, rows).t().contiguous()


def gather_rows(table: Tensor, index: Tensor) -> Tensor:
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


def take(t: Tensor, pos: slice | Tensor) -> Tensor:
    """``t[..., pos]``: a view for a slice; for an index, a gather through a 2-D view of ``t``.

    (``index_select`` along the last dim of a 3-D tensor, or advanced indexing,
    is tens of times slower than along dim 1 of a 2-D one.)
    """
    if isinstance(pos, slice):
        return t[..., pos]
    return t.reshape(-1, t.shape[-1]).index_select(1, pos).view(*t.shape[:-1], -1)


def put(t: Tensor, pos: slice | Tensor, value: Tensor) -> None:
    """``t[..., pos] = value`` for a contiguous ``t`` (see :func:`take`)."""
    if isinstance(pos, slice):
        t[..., pos] = value
    else:
        t.view(-1, t.shape[-1]).index_copy_(1, pos, value.reshape(-1, pos.numel()).to(t.dtype))


@dataclass
class SoftChunk:
    """A chunk of soft rows, flat over groups."""

    rows: Tensor  # (r,) flat row ``g * n + i``
    keys: Tensor  # (T, r) flat centroid ``g * k + j``
    xt: Tensor  # (d, r)
    m: Tensor | None  # (r,)
    inv_tau: Tensor  # (r,) or (1,)


def flat_keys(rows: Tensor, slots: Tensor, n: int, k: int, groups: int) -> Tensor:
    """Flat centroid keys ``g * k + j`` of flat rows ``g * n + i`` holding centroid ``j`` (any shape)."""
    return slots.long() + (rows // n) * k if groups > 1 else slots.long()


def soft_layout(
    data: Data, index: Tensor, hard: Tensor, k: int, tau: Tensor, order: list[Tensor] | None = None
) -> list[SoftChunk]:
    """The soft rows, flat over groups, in chunks (the flat rows of each chunk given as ``order``, or in row order)."""
    d, g, n = data.xf.shape
    top = index.shape[1]
    ids = index.transpose(0, 1).reshape(top, g * n)
    mf = None if data.m is None else data.m.reshape(-1)
    inv_tau = 1.0 / tau
    if order is None:
        rows_all = (~hard).reshape(-1).nonzero().squeeze(1)
        order = [rows_all[s] for s in row_chunks(rows_all.numel(), min(data.rows, SOFT_ROWS))]
    soft = []
    for rows in order:
        soft.append(
            SoftChunk(
                rows,
                flat_keys(rows, ids.index_select(1, rows), n, k, g),
                data.rows_of(rows),
                None if mf is None else mf.index_select(0, rows),
                inv_tau if g == 1 else inv_tau.index_select(0, rows // n),
            )
        )
    return soft


@dataclass
class RowLayout:
    """Soft rows in chunks; every row's key for the hard rows' one-hot attention.

    ``hard_keys`` holds, for every flat row, its centroid's flat key ``g * k + j``
    when the row is hard and the spare key ``G * k`` when it is soft: gathers
    from a centroid table with one extra (zero) column and scatters into sums
    with one extra (discarded) bin then treat the hard rows in row order, with
    no list of them to gather through.
    """

    soft: list[SoftChunk]
    hard_keys: Tensor  # (G n,) int32
    hard_m: Tensor | None  # (G n,) the multiplicities (every row's)


def row_layout(
    data: Data,
    index: Tensor,
    hard: Tensor,
    k: int,
    tau: Tensor,
    soft: list[SoftChunk] | None = None,
    order: list[Tensor] | None = None,
) -> RowLayout:
    """Soft rows (``soft`` if already laid out, else in chunks of ``order``) and hard rows."""
    if soft is None:
        soft = soft_layout(data, index, hard, k, tau, order)
    return RowLayout(soft, hard_keys(index, hard, k), None if data.m is None else data.m.reshape(-1))


def hard_keys(index: Tensor, hard: Tensor, k: int) -> Tensor:
    """``(G n,)``: each hard row's flat centroid key, ``G * k`` for the soft rows (see :class:`RowLayout`)."""
    g, n = hard.shape
    keys = index[:, 0].to(torch.int32)  # (int32: half the bytes; :func:`.kernels` widen it a piece at a time)
    if g > 1:
        keys = keys + (torch.arange(g, device=hard.device, dtype=torch.int32) * k).view(g, 1)
    return keys.masked_fill_(~hard, g * k).view(-1)


def with_spare(table: Tensor) -> Tensor:
    """``(C, bins + 1)``: ``table`` with a zero column for the spare key of the soft rows."""
    return torch.cat([table, table.new_zeros(table.shape[0], 1)], 1)


def centroid_table(c: Tensor) -> Tensor:
    """Centroids as a flat ``(d, G * k)`` table."""
    return c.permute(2, 0, 1).reshape(c.shape[2], -1)


def attend(ch: SoftChunk, ct: Tensor, out: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(a, dcx)``: the renormalised softmax over each row's set (T, r), into ``out`` if given,
    and ``dcx = c_j - x_i`` (d, T, r)."""
    t, r = ch.keys.shape
    dcx = ct.index_select(1, ch.keys.view(-1)).view(-1, t, r).sub_(ch.xt.unsqueeze(1))
    dist = dcx[0].square()
    for q in range(1, dcx.shape[0]):
        dist.addcmul_(dcx[q], dcx[q])
    # entries below exp(floor) = eps^2 of the row's largest are exact zeros: that mass is below rounding,
    # and it keeps exp's underflow (subnormal results, very slow on CPUs) out of every product
    floor = attention_floor(ct.dtype)
    logit = dist.sub_(dist.amin(0, keepdim=True)).mul_(-ch.inv_tau)
    e = logit.clamp_min(floor).exp_().masked_fill_(logit <= floor, 0.0)
    z = e.sum(0, keepdim=True)
    a = torch.div(e, z, out=out) if out is not None else e.div_(z)
    return a, dcx


def merged(soft: list[SoftChunk], limit: int = SOFT_ROWS) -> list[SoftChunk]:
    """``soft`` with consecutive chunks joined while a chunk holds at most ``limit`` rows.

    Every evaluation costs a few tensor ops per chunk, and each choice of
    stale rows adds one (small) chunk: joined, the rows and their order stay
    the same.
    """
    out: list[SoftChunk] = []
    run: list[SoftChunk] = []
    size = 0
    for ch in soft:
        if run and size + ch.rows.numel() > limit:
            out.append(_joined(run))
            run, size = [], 0
        run.append(ch)
        size += ch.rows.numel()
    if run:
        out.append(_joined(run))
    return out


def _joined(chunks: list[SoftChunk]) -> SoftChunk:
    if len(chunks) == 1:
        return chunks[0]
    if all(ch.inv_tau.numel() == 1 for ch in chunks):  # one group: one temperature
        inv_tau = chunks[0].inv_tau
    else:
        inv_tau = torch.cat([ch.inv_tau.expand(ch.rows.numel()) for ch in chunks])
    return SoftChunk(
        torch.cat([ch.rows for ch in chunks]),
        torch.cat([ch.keys for ch in chunks], 1),
        torch.cat([ch.xt for ch in chunks], 1),
        None if chunks[0].m is None else torch.cat([ch.m for ch in chunks]),
        inv_tau,
    )


def without_rows(soft: list[SoftChunk], pos: Tensor, g: int, n: int) -> list[SoftChunk]:
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
                SoftChunk(
                    ch.rows.index_select(0, idx),
                    ch.keys.index_select(1, idx),
                    ch.xt.index_select(1, idx),
                    None if ch.m is None else ch.m.index_select(0, idx),
                    ch.inv_tau if ch.inv_tau.numel() == 1 else ch.inv_tau.index_select(0, idx),
                )
            )
    return kept


def layout_bytes(data: Data, lay: RowLayout) -> int:
    """What keeping ``data`` and ``lay`` from forward to backward costs, beyond the saved tensors."""
    soft = sum(ch.keys.numel() * 8 + ch.rows.numel() * 8 + ch.xt.numel() * ch.xt.element_size() for ch in lay.soft)
    return data.xf.numel() * data.xf.element_size() + soft + 4 * lay.hard_keys.numel()

"""Ranking centroids by squared distance with integer ``amin`` s: the nearest, the second, the ``top`` nearest.

A squared distance ``>= 0`` in float32/float64 orders like its bits read as an
integer, so the centroid index can ride in the lowest ``ceil(log2 k)`` bits:
the nearest centroid is one ``amin`` along the (short) centroid axis, and after
an integer *rotation* (subtract ``found + 1``, keep the low ``b - 1`` bits:
what was found goes to the top, the rest keep their order) the next ``amin``
finds the next nearest.  No sort, no strided ``topk``, several times faster
than ``max`` with indices.  Near-ties (within ``2^-(mantissa - log2 k)``
relative) go to the lower index, and the distances lose those low bits
(truncated towards 0; an exact 0 stays 0).  :class:`Bounds` reads a packed
value back as a safe lower or upper bound on the true distance (the sparse
path's guarantees need that).

Used by :func:`torchdkm.cluster.hard.nearest_two` (the temperature's margins)
and by the torch kernel of the sparse path's set choice (:func:`.default.row_sets`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

INT_OF = {torch.float32: torch.int32, torch.float64: torch.int64}
#: Rows per ``(k x rows)`` block of squared distances: the block stays in cache.
BLOCK_ROWS = 16384


def index_bits(k: int) -> int:
    return max(1, (k - 1).bit_length())


def centroid_side(c: Tensor) -> Tensor:
    """``(G, k, d + 2)``: ``[-2 c, |c|^2, 1]``, the centroids' side of :func:`packed_distances`' matmul."""
    return torch.cat([-2.0 * c, (c * c).sum(-1, keepdim=True), torch.ones_like(c[..., :1])], -1)


def packed_distances(xt: Tensor, c: Tensor, lhs: Tensor | None = None) -> Tensor:
    """The squared distances ``(G, k, r)`` from ``xt`` (G, d, r) to ``c``, the centroid index in the low bits.

    Vectors take one matmul, ``[-2 c, |c|^2, 1] [x; 1; |x|^2]``, whose error is
    below ``e (|x|^2 + |c_j|^2)`` with ``e = (3 d + 6) eps``; as ``|c_j|^2 <=
    2 |x - c_j|^2 + 2 |x|^2``, a computed value ``D'`` bounds the true one
    within ``(D' -+ 3 e |x|^2) / (1 +- 2 e)``, whatever the centroid.  Computed
    values below 0 are raised to 0 (the true value's floor: the bounds still
    hold), so every packed value is a non-negative integer.  Scalars take exact
    differences, within a few ulps.  ``lhs``: :func:`centroid_side` ``(c)``, if already made.
    """
    g, k, d = c.shape
    if d == 1:
        dist = (c - xt).square_()
    else:
        xx = (xt * xt).sum(1, keepdim=True)  # (G, 1, r)
        lhs = centroid_side(c) if lhs is None else lhs
        dist = torch.bmm(lhs, torch.cat([xt, torch.ones_like(xx), xx], 1)).clamp_min_(0)
    mask = (1 << index_bits(k)) - 1
    packed = dist.view(INT_OF[c.dtype])
    ids = torch.arange(k, device=c.device, dtype=packed.dtype).view(1, k, 1)
    return packed.bitwise_and_(~mask).bitwise_or_(ids)


def smallest(packed: Tensor, top: int, out: Tensor | None = None) -> Tensor:
    """The ``top + 1`` smallest entries along dim 1 of ``(G, k, r)``, ascending: ``(G, top + 1, r)`` (into ``out``).

    The entries are distinct integers in ``[0, 2^(b-1))`` (``b`` bits); each
    order statistic is one ``amin`` followed by a rotation.  ``packed`` is overwritten.
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


def rank(xt: Tensor, c: Tensor, top: int, block: int = BLOCK_ROWS) -> Tensor:
    """``(G, top + 1, r)``: the packed squared distances from ``xt`` (G, d, r) to the ``top + 1`` nearest of ``c``."""
    g, r = xt.shape[0], xt.shape[2]
    found = torch.empty(g, top + 1, r, dtype=INT_OF[c.dtype], device=c.device)
    lhs = centroid_side(c) if c.shape[2] > 1 else None
    for start in range(0, r, block):  # the (k x rows) distances stay in cache
        part = slice(start, min(start + block, r))
        smallest(packed_distances(xt[..., part], c, lhs), top, out=found[..., part])
    return found


def nearest_two_packed(xt: Tensor, c: Tensor, block: int = BLOCK_ROWS) -> tuple[Tensor, Tensor, Tensor]:
    """``(index (G, r) int64, first, second)``: each row's nearest centroid and squared distances to the nearest
    two, from one :func:`rank` (near-ties to the lower index; distances truncated by ``ceil(log2 k)`` bits)."""
    k = c.shape[1]
    found = rank(xt, c, 1, block)
    index, first = unpack(found[:, 0], k)
    return index.long(), first, unpack(found[:, 1], k)[1]


def unpack(found: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``(index, distance)`` of packed values: the centroid index and the distance truncated towards 0."""
    mask = (1 << index_bits(k)) - 1
    dtype = torch.float32 if found.dtype == torch.int32 else torch.float64
    return found & mask, (found & ~mask).view(dtype)


@dataclass
class Bounds:
    """Reads packed squared distances (:func:`packed_distances`) back as bounds on the true values."""

    mask: int
    rel: float  # relative rounding of the value itself
    spread: Tensor | None  # (G, r) for vectors: 3 e |x|^2, e the matmul's error per unit of |x|^2 + |c|^2
    grow: float  # 2 e

    @staticmethod
    def of(xt: Tensor, k: int) -> Bounds:
        """How to read the packed distances of the rows ``xt`` (G, d, r)."""
        d = xt.shape[1]
        eps = torch.finfo(xt.dtype).eps
        mask = (1 << index_bits(k)) - 1
        if d == 1:
            return Bounds(mask, 8 * eps, None, 0.0)
        e = (3 * d + 6) * eps
        return Bounds(mask, 8 * eps, (3 * e) * (xt * xt).sum(1), 2 * e)

    def _dtype(self, p: Tensor) -> torch.dtype:
        return torch.float32 if p.dtype == torch.int32 else torch.float64

    def lower(self, p: Tensor) -> Tensor:
        """A lower bound on the true value: the packed values are >= 0, so clearing the index bits rounds down."""
        return self.below((p & ~self.mask).view(self._dtype(p)))

    def upper(self, p: Tensor) -> Tensor:
        """An upper bound on the true value: setting the index bits rounds up."""
        return self.above((p | self.mask).view(self._dtype(p)))

    def below(self, truncated: Tensor) -> Tensor:
        """A lower bound on the true value of a distance as :func:`unpack` reads it (truncated towards 0)."""
        low = truncated.mul(1 - self.rel)
        if self.spread is not None:
            low = low.sub_(self.spread).div_(1 + self.grow)
        return low.clamp_min_(0)

    def above(self, truncated: Tensor) -> Tensor:
        """An upper bound on the true value of a distance as :func:`unpack` reads it: its index bits set."""
        bits = truncated.view(INT_OF[truncated.dtype]) | self.mask
        high = bits.view(truncated.dtype).mul_(1 + self.rel)
        if self.spread is not None:
            high = high.add_(self.spread).div_(1 - self.grow)
        return high


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


@dataclass
class Ranking:
    """Each vector's nearest centroid and its squared distances to the nearest two at ``c`` (``k >= 2``).

    Made by :func:`rank_vectors` with a layer's ``nearest_two`` kernel; each
    of ``index``, ``first``, ``second`` is ``(G, n)``.  ``xf`` is the vectors'
    :func:`coordinate_major` copy.  The temperature reads its margins from it,
    and the sparse attention takes it instead of ranking the same vectors at
    the same centroids again.
    """

    index: Tensor
    first: Tensor
    second: Tensor
    xf: Tensor
    c: Tensor

    def nearest_two(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(index, distance, second distance)``, each ``(G, n)``."""
        return self.index, self.first, self.second


def rank_vectors(x: Tensor, c: Tensor, nearest_two: Callable) -> Ranking:
    """The :class:`Ranking` of the vectors ``x`` (G, n, d) at the centroids ``c`` (G, k >= 2, d) by the
    ``nearest_two`` kernel (:mod:`torchdkm.kernels`)."""
    xf = coordinate_major(x)
    with no_autocast(x.device):
        return Ranking(*nearest_two(xf.transpose(0, 1), c), xf, c)


def no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off: the distances must be in the compute dtype for the bounds (and the bit packing) to hold."""
    try:
        return torch.autocast(device.type, enabled=False)
    except RuntimeError:  # a device type autocast does not know
        return contextlib.nullcontext()

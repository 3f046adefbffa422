"""Uniquification: cluster scalars once per distinct 16-bit value (eDKM's idea, sort-free).

A 16-bit float has at most 65,536 bit patterns, and the pattern *is* an index:
``bincount`` of the patterns gives every distinct value's count in one pass,
and the patterns present, in order, give the distinct values.  DKM then runs on
the distinct values with their counts as multiplicities (cost
``O(distinct x k)``), and the result is gathered back to every weight
(``O(|W|)``).  No sort, no hashing.

The backward sums the weights' gradients per distinct value (one scatter-add),
runs the op's backward once on the distinct values, and hands each weight its
own share: ``g_i * (2/tau) Var_A(c)`` (the output's own slope, per weight) plus
``1/count`` of the distinct value's gradient through the centroids.  The
16-bit rounding is straight-through: the fp32 weight gets the gradient of its
rounded value.

Every pass over the weights (count, gather the output, sum the gradients,
gather each weight's share) reads the bit patterns again from the weight in the
16-bit dtype (the weight itself, or one 16-bit copy of a wider one): no int32
index is kept between forward and backward.  On the CPU each pass is one native
loop (:mod:`.native`); elsewhere, or without a C compiler, torch ops run it in
pieces of ``PIECE`` weights, so every temporary stays in cache.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from . import native, op
from .layout import Layout

#: Above this many groups, ``torch.unique`` replaces the ``bincount`` table.
MAX_TABLE_GROUPS = 64
PATTERNS = 1 << 16
#: Weights per piece of a gather over the weights: the piece's patterns and temporaries stay in cache.
PIECE = 1 << 17
#: Weights per piece of a count (``bincount``): larger, as each piece also writes and adds a whole table
#: (2**18 int32 patterns, 1 MiB, still stay in a core's cache).
COUNT_PIECE = 1 << 18
#: Weights per piece of a gradient sum: each piece is summed in the compute dtype, the pieces in float64.
SUM_PIECE = 1 << 17


@dataclass
class Distinct:
    """The distinct values of a weight, per group, padded to a ``(G, U)`` table of slots.

    Every weight has an ``index`` into a *table space* of ``table_size``
    entries, ``per_group`` per group: with few groups the table space is all
    65,536 bit patterns of each group, so a weight's index is its own bit
    pattern (int32, no gather needed to find it); with many groups it is the
    ``(G, U)`` slots themselves (``torch.unique``'s inverse).  ``slots`` maps
    each slot to its place in table space.
    """

    values: Tensor  # (G, U, 1) in the compute dtype
    counts: Tensor  # (G, U) float; 0 for padding slots
    keys: _Keys  # every weight's entry in table space, piece by piece
    slots: Tensor  # (G * U,) int64: every slot's entry in table space (0 for padding)
    table_size: int
    per_group: int

    @property
    def numel(self) -> int:
        return self.keys.numel

    @property
    def index(self) -> Tensor:
        """``(numel,)``: every weight's entry in table space, all at once."""
        return (
            torch.cat([self.keys.of(part) for part in self.keys.pieces()]) if self.numel else self.keys.of(slice(0, 0))
        )

    @functools.cached_property
    def live(self) -> tuple[Tensor, Tensor]:
        """The slots holding a value (count > 0), and their entries in table space."""
        live = torch.nonzero(self.counts.reshape(-1)).flatten()
        return live, self.slots[live]

    def to_table(self, per_slot: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``(table_size,)`` table holding each slot's value at its entry."""
        flat = per_slot.reshape(-1)
        table = flat.new_zeros(self.table_size, dtype=dtype or flat.dtype)
        live, entries = self.live
        table[entries] = flat[live].to(table.dtype)
        return table

    def expand(self, per_slot: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """Each weight's slot value: ``(numel,)``."""
        table = self.to_table(per_slot, dtype)
        fast = self.keys.native(table)
        out = None if fast is None else native.expand(*fast, table)
        if out is not None:
            return out
        out = table.new_empty(self.numel)
        bits, out_bits = _bits(table), _bits(out)
        for part in self.keys.pieces():
            torch.index_select(bits, 0, self.keys.of(part), out=out_bits[part])
        return out

    def sum_per_slot(self, per_weight: Tensor, dtype: torch.dtype) -> Tensor:
        """Sum of ``per_weight`` over the weights of each slot: ``(G, U)`` in ``dtype``.

        No sum runs over more than ~2**17 values in less than float64: the native loop adds blocks in
        float32 and carries them in float64; the torch code sums each piece in ``dtype`` (``bincount`` adds
        in sequence) and the pieces in float64.  Only the entries of slots holding a value are carried.
        """
        flat = per_weight.reshape(-1)
        live, entries = self.live
        fast = self.keys.native(flat)
        table = None if fast is None else native.sum_per_key(*fast, flat, entries, self.table_size)
        if table is not None:
            total = table[entries]
        else:
            total = torch.zeros(live.numel(), dtype=torch.float64, device=flat.device)
            for part in self.keys.pieces(SUM_PIECE):
                piece = torch.bincount(self.keys.of(part), weights=flat[part].to(dtype), minlength=self.table_size)
                total += piece[entries]
        out = torch.zeros(self.counts.numel(), dtype=dtype, device=flat.device)
        out[live] = total.to(dtype)
        return out.view_as(self.counts)

    def gather_affine(self, shift_per_slot: Tensor, slope_per_slot: Tensor, grad: Tensor) -> Tensor:
        """``shift[slot] + grad * slope[slot]`` for every weight, in ``grad``'s dtype."""
        flat = grad.reshape(-1)
        fast = self.keys.native(flat) if flat.dtype in native.AFFINE_LOOPS else None
        if fast is not None:  # float32 tables: the loop computes in float32 and rounds once
            shift, slope = (self.to_table(t, torch.float32) for t in (shift_per_slot, slope_per_slot))
            out = native.affine(*fast, shift, slope, flat)
            if out is not None:
                return out
        shift, slope = (self.to_table(t, grad.dtype) for t in (shift_per_slot, slope_per_slot))
        out = torch.empty_like(flat)
        shift_bits, slope_bits = _bits(shift), _bits(slope)
        for part in self.keys.pieces():
            keys = self.keys.of(part)
            a = shift_bits.index_select(0, keys).view(shift.dtype)
            b = slope_bits.index_select(0, keys).view(slope.dtype)
            torch.addcmul(a, flat[part], b, out=out[part])
        return out


@dataclass
class _Keys:
    """Every weight's entry in table space, given piece by piece.

    From the weight itself (``source``, flat, in ``dtype``): its 16-bit pattern
    plus ``PATTERNS`` times its group (``group_numel`` consecutive weights per
    group); or from a stored index (``stored``, the ``torch.unique`` route).
    """

    numel: int
    source: Tensor | None = None
    dtype: torch.dtype | None = None
    group_numel: int = 0
    grouped: bool = False
    stored: Tensor | None = None

    def pieces(self, size: int | None = None) -> list[slice]:
        size = size or PIECE  # (read at call time: tests make the pieces small)
        return [slice(start, min(start + size, self.numel)) for start in range(0, self.numel, size)]

    def native(self, *others: Tensor) -> tuple[Tensor, int] | None:
        """The 16-bit patterns and the weights per group, for :mod:`.native`; ``None`` where its loops cannot run."""
        if self.source is None or not self.numel or not native.usable(self.source, *others):
            return None
        source = self.source.contiguous().view(torch.uint16)
        return source, self.group_numel if self.grouped else self.numel

    def of(self, part: slice) -> Tensor:
        if self.stored is not None:
            return self.stored[part]
        assert self.source is not None and self.dtype is not None
        keys = patterns(self.source[part], self.dtype)
        if self.grouped:
            first = torch.arange(part.start, part.stop, device=keys.device, dtype=torch.int32)
            keys += first.div_(self.group_numel, rounding_mode="floor").mul_(PATTERNS)
        return keys


def _bits(table: Tensor) -> Tensor:
    """A 16-bit float tensor viewed as int16 (``index_select`` copies 16-bit integers faster), others as they are."""
    return table.view(torch.int16) if table.is_floating_point() and table.element_size() == 2 else table


def patterns(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """Each value's 16-bit pattern in ``dtype``, as int32 in ``[0, 65536)``."""
    return weight.reshape(-1).to(dtype).view(torch.uint16).to(torch.int32)


def distinct(weight: Tensor, layout: Layout, dtype: torch.dtype, compute: torch.dtype) -> Distinct:
    groups = layout.groups
    index: _Keys
    if groups <= MAX_TABLE_GROUPS:  # (int32 keys: 64 groups x 65,536 patterns)
        # the 16-bit copy is made once (a weight of another dtype would be converted in every pass)
        index = _Keys(layout.numel, weight.reshape(-1).to(dtype), dtype, layout.group_numel, groups > 1)
        fast = index.native()
        if fast is not None:
            table_counts = native.count(*fast, groups * PATTERNS)
            present = native.present(table_counts)
        else:
            table_counts = torch.zeros(groups * PATTERNS, dtype=torch.int64, device=weight.device)
            for part in index.pieces(COUNT_PIECE):
                table_counts += torch.bincount(index.of(part), minlength=groups * PATTERNS)
            present = torch.nonzero(table_counts).flatten()
        counts = table_counts[present]
        table_size, per_group = groups * PATTERNS, PATTERNS
    else:
        keys = patterns(weight, dtype)
        # int64: group * 65536 overflows int32 beyond 32,768 groups
        group_of_row = torch.arange(layout.out, device=weight.device) // layout.group_size
        keys = (keys.view(layout.out, layout.row_len) + (group_of_row * PATTERNS)[:, None]).reshape(-1)
        present, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
        table_size, per_group = 0, 0
    if groups == 1 and table_size:  # one group: the slots are the present patterns in order, no padding
        values = present.to(torch.int32).to(torch.uint16).view(dtype).to(compute)
        return Distinct(values.view(1, -1, 1), counts.to(compute).view(1, -1), index, present, table_size, per_group)
    group = present // PATTERNS
    per = torch.bincount(group, minlength=groups)
    width = int(per.max())
    start = per.cumsum(0) - per
    slot = group * width + (torch.arange(present.numel(), device=weight.device) - start[group])
    pattern = (present % PATTERNS).to(torch.int32).to(torch.uint16)
    values = torch.zeros(groups * width, dtype=compute, device=weight.device)
    values[slot] = pattern.view(dtype).to(compute)
    mass = torch.zeros(groups * width, dtype=compute, device=weight.device)
    mass[slot] = counts.to(compute)
    slots = torch.zeros(groups * width, dtype=torch.int64, device=weight.device)
    if table_size:
        slots[slot] = present
    else:  # torch.unique's inverse numbers the present keys in order: map them to slots
        index = _Keys(layout.numel, stored=slot[inverse])
        slots[slot] = slot
        table_size, per_group = groups * width, width
    return Distinct(values.view(groups, width, 1), mass.view(groups, width), index, slots, table_size, per_group)


class UniqueDKMFunction(torch.autograd.Function):
    """DKM over distinct values, gathered back to every weight."""

    @staticmethod
    def forward(ctx, weight, found, c0, tau, max_iters, tol, rows, grad_tol):  # type: ignore[override]
        values, counts = found.values, found.counts
        c, iters = op.iterate(values, counts, c0, tau, max_iters, tol, rows)
        soft = op.soft_output(values, c, tau, rows)
        out = found.expand(soft, weight.dtype).view(weight.shape)
        # the weight is saved so that autograd checks it is unchanged: backward reads its patterns again
        ctx.save_for_backward(c, tau, weight)
        ctx.found, ctx.shape = found, weight.shape
        ctx.rows, ctx.max_terms, ctx.grad_tol, ctx.iters = rows, max(max_iters, 1), grad_tol, iters
        ctx.set_materialize_grads(False)
        return out, c

    @staticmethod
    def backward(ctx, grad_out, grad_c):  # type: ignore[override]
        c, tau, _ = ctx.saved_tensors
        found: Distinct = ctx.found
        values, counts = found.values, found.counts
        summed = None if grad_out is None else found.sum_per_slot(grad_out, values.dtype).unsqueeze(-1)
        shared, jac = op.backward(
            values,
            counts,
            c,
            tau,
            summed,
            grad_c,
            ctx.rows,
            direct=False,
            max_terms=ctx.max_terms,
            tol=ctx.grad_tol,
            want_jac=grad_out is not None,
        )
        share = torch.where(counts > 0, shared[..., 0] / counts.clamp_min(1), torch.zeros_like(counts))
        if grad_out is None:
            return found.expand(share, values.dtype).view(ctx.shape), None, None, None, None, None, None, None
        grad = found.gather_affine(share, jac, grad_out)
        return grad.view(grad_out.shape), None, None, None, None, None, None, None

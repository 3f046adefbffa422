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
index is kept between forward and backward.  Each pass is a kernel of
:mod:`torchdkm.kernels` (a native loop on the CPU, torch ops elsewhere), chosen
when the layer was planned.  With more than ``MAX_TABLE_GROUPS`` groups the
table space would be too large: ``torch.unique`` numbers the values instead, and
the passes are torch ops on that stored index.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import Kernels, default
from ..kernels.default import keys_of
from .dense import DenseAttention
from .engine import GramSums
from .layout import Layout
from .problem import Problem

#: Above this many groups, ``torch.unique`` replaces the table of bit patterns.
MAX_TABLE_GROUPS = 64
PATTERNS = 1 << 16


@dataclass
class PatternKeys:
    """Every weight's entry in table space read from its own 16-bit pattern (plus ``PATTERNS x`` its group)."""

    patterns: Tensor  # (numel,) uint16 view of the weight in the cluster dtype
    group_numel: int
    kernels: Kernels

    def entries(self) -> Tensor:
        return keys_of(self.patterns, self.group_numel, slice(0, self.patterns.numel())).long()

    def expand(self, table: Tensor) -> Tensor:
        return self.kernels.expand(self.patterns, self.group_numel, table)

    def sums(self, values: Tensor, live: Tensor, table_size: int, dtype: torch.dtype) -> Tensor:
        return self.kernels.sum_per_key(self.patterns, self.group_numel, values, live, table_size, dtype)

    def affine(self, shift: Tensor, slope: Tensor, grad: Tensor) -> Tensor:
        return self.kernels.affine(self.patterns, self.group_numel, shift, slope, grad)


@dataclass
class StoredKeys:
    """Every weight's slot, stored (``torch.unique``'s inverse: the many-groups route): the torch kernels'
    passes (:mod:`torchdkm.kernels.default`) on these keys."""

    index: Tensor  # (numel,) int64

    def entries(self) -> Tensor:
        return self.index

    def _keys(self, part: slice) -> Tensor:
        return self.index[part]

    def expand(self, table: Tensor) -> Tensor:
        return default.expand_by(self._keys, self.index.numel(), table)

    def sums(self, values: Tensor, live: Tensor, table_size: int, dtype: torch.dtype) -> Tensor:
        return default.sums_by(self._keys, values, live, table_size, dtype)

    def affine(self, shift: Tensor, slope: Tensor, grad: Tensor) -> Tensor:
        return default.affine_by(self._keys, shift, slope, grad)


@dataclass
class Distinct:
    """The distinct values of a weight, per group, padded to a ``(G, U)`` table of slots.

    Every weight has an entry in a *table space* of ``table_size`` entries:
    with few groups, all 65,536 bit patterns of each group (a weight's entry is
    its own pattern, read again in every pass); with many groups, the ``(G, U)``
    slots themselves.  ``slots`` maps each slot to its entry.
    """

    values: Tensor  # (G, U, 1) in the compute dtype
    counts: Tensor  # (G, U) float; 0 for padding slots
    keys: PatternKeys | StoredKeys
    slots: Tensor  # (G * U,) int64: every slot's entry in table space (0 for padding)
    table_size: int
    affine_table: torch.dtype | None  # the dtype ``keys.affine`` takes its tables in (None: the gradient's)

    @property
    def index(self) -> Tensor:
        """``(numel,)``: every weight's entry in table space, all at once."""
        return self.keys.entries()

    @property
    def per_group(self) -> int:
        """Entries of table space per group."""
        return self.table_size // self.values.shape[0]

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
        return self.keys.expand(self.to_table(per_slot, dtype))

    def sum_per_slot(self, per_weight: Tensor, dtype: torch.dtype) -> Tensor:
        """Sum of ``per_weight`` over the weights of each slot: ``(G, U)`` in ``dtype``.

        No sum runs over more than ~2**17 values in less than float64 (see the kernels).
        Only the entries of slots holding a value are carried.
        """
        flat = per_weight.reshape(-1)
        live, entries = self.live
        total = self.keys.sums(flat, entries, self.table_size, dtype)
        out = torch.zeros(self.counts.numel(), dtype=dtype, device=flat.device)
        out[live] = total.to(dtype)
        return out.view_as(self.counts)

    def gather_affine(self, shift_per_slot: Tensor, slope_per_slot: Tensor, grad: Tensor) -> Tensor:
        """``shift[slot] + grad * slope[slot]`` for every weight, in ``grad``'s dtype."""
        flat = grad.reshape(-1)
        dtype = self.affine_table or grad.dtype
        shift, slope = (self.to_table(t, dtype) for t in (shift_per_slot, slope_per_slot))
        return self.keys.affine(shift, slope, flat)


def patterns(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """Each value's 16-bit pattern in ``dtype``, as int32 in ``[0, 65536)``."""
    return weight.reshape(-1).to(dtype).view(torch.uint16).to(torch.int32)


def distinct(weight: Tensor, layout: Layout, dtype: torch.dtype, compute: torch.dtype, kernels: Kernels) -> Distinct:
    """The :class:`Distinct` values of ``weight`` rounded to the 16-bit ``dtype``, in ``compute``."""
    groups = layout.groups
    keys: PatternKeys | StoredKeys | None = None
    if groups <= MAX_TABLE_GROUPS:  # (int32 keys: 64 groups x 65,536 patterns)
        # the 16-bit copy is made once (a weight of another dtype would be converted in every pass)
        source = weight.reshape(-1).to(dtype).contiguous().view(torch.uint16)
        keys = PatternKeys(source, layout.group_numel if groups > 1 else layout.numel, kernels)
        table_size = groups * PATTERNS
        table_counts = kernels.count(source, keys.group_numel, table_size)
        present = kernels.present(table_counts)
        counts = table_counts[present]
    else:
        flat = patterns(weight, dtype)
        # int64: group * 65536 overflows int32 beyond 32,768 groups
        group_of_row = torch.arange(layout.out, device=weight.device) // layout.group_size
        flat = (flat.view(layout.out, layout.row_len) + (group_of_row * PATTERNS)[:, None]).reshape(-1)
        present, inverse, counts = torch.unique(flat, return_inverse=True, return_counts=True)
        table_size = 0
    table = kernels.affine_table if table_size else None  # (the stored index's affine takes the gradient's dtype)
    if groups == 1 and table_size:  # one group: the slots are the present patterns in order, no padding
        values = present.to(torch.int32).to(torch.uint16).view(dtype).to(compute)
        return Distinct(values.view(1, -1, 1), counts.to(compute).view(1, -1), keys, present, table_size, table)
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
        keys = StoredKeys(slot[inverse])
        slots[slot] = slot
        table_size = groups * width
    assert keys is not None
    return Distinct(values.view(groups, width, 1), mass.view(groups, width), keys, slots, table_size, table)


class StackedDistinct:
    """Several layers' :class:`Distinct` values as the groups of one ``(G, U)`` table (:mod:`.batch`).

    The weights are the layers' flattened weights one after another; every pass
    runs on each layer's own table and keys, so it matches what
    :class:`UniqueAttention` does with one layer's :class:`Distinct`.
    """

    def __init__(self, parts: list[Distinct], numels: list[int]):
        self.parts, self.numels = parts, numels
        self.groups = [part.values.shape[0] for part in parts]
        self.width = max(part.values.shape[1] for part in parts)
        self.values = torch.cat([self._pad(part.values) for part in parts])
        self.counts = torch.cat([self._pad(part.counts) for part in parts])

    def _pad(self, per_slot: Tensor) -> Tensor:
        """``(G_i, U_i, ...)`` padded with zeros to the common width."""
        extra = self.width - per_slot.shape[1]
        return (
            per_slot
            if extra == 0
            else torch.cat([per_slot, per_slot.new_zeros(per_slot.shape[0], extra, *per_slot.shape[2:])], 1)
        )

    def _split(self, per_slot: Tensor) -> list[Tensor]:
        """Each layer's ``(G_i, U_i, ...)`` share of a stacked ``(G, U, ...)`` tensor."""
        return [t[:, : p.values.shape[1]] for t, p in zip(per_slot.split(self.groups), self.parts)]

    def expand(self, per_slot: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        return torch.cat([p.expand(t, dtype) for p, t in zip(self.parts, self._split(per_slot))])

    def sum_per_slot(self, per_weight: Tensor, dtype: torch.dtype) -> Tensor:
        pieces = per_weight.reshape(-1).split(self.numels)
        return torch.cat([self._pad(p.sum_per_slot(w, dtype)) for p, w in zip(self.parts, pieces)])

    def gather_affine(self, shift_per_slot: Tensor, slope_per_slot: Tensor, grad: Tensor) -> Tensor:
        shifts, slopes = self._split(shift_per_slot), self._split(slope_per_slot)
        pieces = grad.reshape(-1).split(self.numels)
        return torch.cat([p.gather_affine(a, b, g) for p, a, b, g in zip(self.parts, shifts, slopes, pieces)])


class UniqueAttention(DenseAttention):
    """The dense attention over the distinct values (counts as multiplicities), gathered back to every weight.

    The Gram pass sums the weights' gradients per distinct value and runs the
    dense pass on them without the rows' direct term, taking instead each
    value's slope ``(2/tau) Var_A(c)``; :meth:`input_grad` hands each weight
    ``g_i x slope + (its value's gradient through the centroids) / count``.
    The 16-bit rounding is straight-through.
    """

    def __init__(
        self,
        problem: Problem,
        found: Distinct | StackedDistinct,
        shape: torch.Size,
        dtype: torch.dtype,
        importance: Tensor | None = None,
    ):
        super().__init__(problem)
        self.found, self.shape, self.dtype = found, shape, dtype
        #: ``(numel,)`` each weight's share of its value's weighted count (counts summed importance), or None
        self.importance = importance
        self.slope: Tensor | None = None
        self.grad_out: Tensor | None = None

    def output(self, c: Tensor) -> Tensor:
        return self.found.expand(super().output(c), self.dtype).view(self.shape)

    def gram_pass(self, c: Tensor, grad_w: Tensor | None, grad_c: Tensor | None) -> GramSums:
        values = self.problem.x
        self.grad_out = grad_w
        self.slope = torch.empty_like(values) if grad_w is not None else None
        summed = None if grad_w is None else self.found.sum_per_slot(grad_w, values.dtype).unsqueeze(-1)
        return super().gram_pass(c, summed, grad_c)

    def row_terms(self, s: slice, a: Tensor, c: Tensor, two_over_tau: Tensor) -> None:
        if self.slope is not None:
            w = torch.bmm(a.transpose(1, 2), c)
            self.slope[:, s] = two_over_tau * (torch.bmm(a.transpose(1, 2), c * c) - w * w)

    def direct_term(self, s: slice, sa: Tensor, c: Tensor, two_over_tau: Tensor) -> None:
        """None per distinct value: each weight gets its own, from the slope, in :meth:`input_grad`."""

    def input_grad(self) -> Tensor:
        counts, dtype = self.problem.m, self.problem.x.dtype
        assert counts is not None
        shared = super().input_grad()
        share = torch.where(counts > 0, shared[..., 0] / counts.clamp_min(torch.finfo(counts.dtype).tiny), torch.zeros_like(counts))
        grad_out, slope, self.grad_out, self.slope = self.grad_out, self.slope, None, None
        if self.importance is not None:  # a weight's share of its value's gradient: its share of the weighted count
            through = self.found.expand(share, dtype) * self.importance.to(dtype)
            if grad_out is None or slope is None:
                return through.view(self.shape)
            return (self.found.gather_affine(torch.zeros_like(share), slope, grad_out) + through).view(grad_out.shape)
        if grad_out is None or slope is None:
            return self.found.expand(share, dtype).view(self.shape)
        return self.found.gather_affine(share, slope, grad_out).view(grad_out.shape)

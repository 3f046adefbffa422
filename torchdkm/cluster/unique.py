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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import op
from .layout import Layout

#: Above this many groups, ``torch.unique`` replaces the ``bincount`` table.
MAX_TABLE_GROUPS = 64
PATTERNS = 1 << 16


@dataclass
class Distinct:
    """The distinct values of a weight, per group, padded to a ``(G, U)`` table."""

    values: Tensor  # (G, U, 1) float32/float64
    counts: Tensor  # (G, U) float; 0 for padding slots
    index: Tensor  # (numel,) position of every weight in the flattened (G * U) table


def patterns(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """Each value's 16-bit pattern in ``dtype``, as int32 in ``[0, 65536)``."""
    return weight.reshape(-1).to(dtype).view(torch.int16).to(torch.int32) & 0xFFFF


def distinct(weight: Tensor, layout: Layout, dtype: torch.dtype, compute: torch.dtype) -> Distinct:
    keys = patterns(weight, dtype)
    groups = layout.groups
    if groups > 1:
        # int64: group * 65536 overflows int32 beyond 32,768 groups
        group_of_row = torch.arange(layout.out, device=weight.device) // layout.group_size
        keys = (keys.view(layout.out, layout.row_len) + (group_of_row * PATTERNS)[:, None]).reshape(-1)
    if groups <= MAX_TABLE_GROUPS:
        table_counts = torch.bincount(keys, minlength=groups * PATTERNS)
        present = torch.nonzero(table_counts).flatten()
        counts = table_counts[present]
        inverse = None
    else:
        present, inverse, counts = torch.unique(keys, return_inverse=True, return_counts=True)
    group = present // PATTERNS
    per_group = torch.bincount(group, minlength=groups)
    width = int(per_group.max())
    start = per_group.cumsum(0) - per_group
    slot = group * width + (torch.arange(present.numel(), device=weight.device) - start[group])
    if inverse is None:
        lookup = torch.empty(groups * PATTERNS, dtype=torch.int64, device=weight.device)
        lookup[present] = slot
        index = lookup[keys]
    else:
        index = slot[inverse]
    pattern = present % PATTERNS
    pattern = torch.where(pattern >= 1 << 15, pattern - PATTERNS, pattern).to(torch.int16)
    values = torch.zeros(groups * width, dtype=compute, device=weight.device)
    values[slot] = pattern.view(dtype).to(compute)
    mass = torch.zeros(groups * width, dtype=compute, device=weight.device)
    mass[slot] = counts.to(compute)
    return Distinct(values.view(groups, width, 1), mass.view(groups, width), index)


class UniqueDKMFunction(torch.autograd.Function):
    """DKM over distinct values, gathered back to every weight."""

    @staticmethod
    def forward(ctx, weight, values, counts, index, c0, tau, max_iters, tol, rows, grad_tol):  # type: ignore[override]
        c, iters = op.iterate(values, counts, c0, tau, max_iters, tol, rows)
        soft = op.soft_output(values, c, tau, rows)
        out = soft.reshape(-1).index_select(0, index).view(weight.shape).to(weight.dtype)
        ctx.save_for_backward(values, counts, index, c, tau)
        ctx.rows, ctx.max_terms, ctx.grad_tol, ctx.iters = rows, max(max_iters, 1), grad_tol, iters
        ctx.shape, ctx.dtype = weight.shape, weight.dtype
        ctx.set_materialize_grads(False)
        return out, c

    @staticmethod
    def backward(ctx, grad_out, grad_c):  # type: ignore[override]
        values, counts, index, c, tau = ctx.saved_tensors
        shape, dtype = ctx.shape, ctx.dtype
        summed = None
        if grad_out is not None:
            flat = grad_out.reshape(-1)
            summed = torch.zeros(values.numel(), dtype=values.dtype, device=values.device)
            summed.index_add_(0, index, flat.to(values.dtype))
            summed = summed.view_as(values)
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
        per_weight = share.reshape(-1).index_select(0, index)
        if grad_out is None:
            return per_weight.view(shape).to(dtype), None, None, None, None, None, None, None, None, None
        slope = jac.reshape(-1).index_select(0, index)
        grad = torch.addcmul(per_weight, flat.to(values.dtype), slope).view(shape).to(dtype)
        return grad, None, None, None, None, None, None, None, None, None

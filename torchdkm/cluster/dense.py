"""The dense attention: every row attends to every centroid, chunk by chunk; and its sharded form.

Every pass over ``x`` is chunked by rows (:attr:`.Problem.rows`), so the
attention map held at one time is bounded by ``rows x k``, whatever the layer
size.  The map is laid out centroid-major, ``(G, k, rows)``: every elementwise
op and the softmax then run along the long rows axis (``k`` is small), several
times faster than ``(rows, k)``.

Sharded (eDKM's idea): :class:`ShardedAttention` computes the attention for a
contiguous block of rows only; every sum over rows (centroid statistics, Gram
sums, gradients into the centroids) is all-reduced, and the per-row outputs
(soft weights, weight gradients) are assembled by an all-reduce of zero-padded
tensors, so every rank ends with the full, identical result while holding a
``1 / world`` share of the attention map.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..kernels.scratch import like
from .engine import EMPTY_MASS, Attention, GramSums, explicit
from .problem import Problem, gram_terms, row_chunks


def attention(x: Tensor, c: Tensor, tau: Tensor) -> Tensor:
    """``softmax_j(-|x_i - c_j|^2 / tau)``, laid out centroid-major: ``(G, k, rows)``.

    Scalars use the exact difference (no cancellation, whatever ``k``); vectors
    use ``2 x.c - |c|^2`` (softmax ignores the per-row ``|x|^2``), one matmul.
    """
    scale = (1.0 / tau).view(-1, 1, 1)
    if x.shape[-1] == 1:
        root = scale.sqrt()
        z = (c * root) - (x * root).transpose(1, 2)  # (G, k, rows)
        z = z.square_().neg_()
    else:
        bias = -(c * c).sum(-1, keepdim=True) * scale  # (G, k, 1)
        z = torch.baddbmm(bias, (2.0 * scale) * c, x.transpose(1, 2))
    return torch.softmax(z, dim=1)


def gram_weights(xs: Tensor, m: Tensor | None) -> Tensor:
    """``(G, P, rows)``: the row weights ``m, m x_a, m x_a x_b (a <= b)`` of the Gram sums."""
    ones = torch.ones_like(xs[..., 0]) if m is None else m
    terms = [ones] + [ones * xs[..., a] for a in range(xs.shape[-1])]
    terms += [ones * xs[..., a] * xs[..., b] for a in range(xs.shape[-1]) for b in range(a, xs.shape[-1])]
    return torch.stack(terms, 1)


class DenseAttention(Attention):
    """The full attention ``A`` over a :class:`.Problem`."""

    #: Whether the rows are split across ranks (the outputs are then assembled from zero-padded shares).
    sharded = False

    def __init__(self, problem: Problem):
        self.problem = problem
        self.rows = problem.rows
        self.dx: Tensor | None = None
        self.kept: Tensor | None = None  # the attention of the Gram pass when one chunk held every row

    # -- where the rows are (the sharded form overrides these two) ------------
    def chunks(self) -> Iterator[slice]:
        return row_chunks(self.problem.x.shape[1], self.rows)

    def reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over the ranks sharing the rows (nothing to do unsharded)."""
        return t

    # -- forward --------------------------------------------------------------
    def update(self, c: Tensor) -> Tensor:
        x, m, tau = self.problem.x, self.problem.m, self.problem.tau
        num = torch.zeros_like(c)
        den = c.new_zeros(c.shape[:2])
        for s in self.chunks():
            a = attention(x[:, s], c, tau)
            xs = x[:, s] if m is None else x[:, s] * m[:, s, None]
            num += torch.bmm(a, xs)
            den += a.sum(2) if m is None else torch.bmm(a, m[:, s].unsqueeze(-1)).squeeze(-1)
        self.reduce(num), self.reduce(den)
        full = den > EMPTY_MASS
        return torch.where(full.unsqueeze(-1), num / den.clamp_min(EMPTY_MASS).unsqueeze(-1), c)

    def output(self, c: Tensor) -> Tensor:
        x, tau = self.problem.x, self.problem.tau
        out = torch.zeros_like(x) if self.sharded else torch.empty_like(x)
        for s in self.chunks():
            out[:, s] = torch.bmm(attention(x[:, s], c, tau).transpose(1, 2), c)
        return self.reduce(out)

    # -- backward -------------------------------------------------------------
    def gram_pass(self, c: Tensor, grad_w: Tensor | None, grad_c: Tensor | None) -> GramSums:
        x, m, tau = self.problem.x, self.problem.m, self.problem.tau
        g, k, d = c.shape
        terms = gram_terms(d)
        two_over_tau = (2.0 / tau).view(-1, 1, 1)
        self.dx = torch.zeros_like(x)
        self.kept = None
        gc = torch.zeros_like(c)
        sums = c.new_zeros(g, k, terms)
        grams = c.new_zeros(g, terms, k, k) if explicit(self.problem) else None
        for s in self.chunks():
            xs = x[:, s]
            a = attention(xs, c, tau)  # (G, k, r)
            if s.start == 0 and s.stop == x.shape[1]:
                self.kept = a
            weights = gram_weights(xs, None if m is None else m[:, s])  # (G, P, r)
            sums += torch.bmm(a, weights.transpose(1, 2))
            if grams is not None:
                weighted = torch.mul(a.unsqueeze(1), weights.unsqueeze(2), out=like(a, "gram", (g, terms, k, -1)))
                grams += torch.bmm(weighted.flatten(1, 2), a.transpose(1, 2)).view_as(grams)
            self.row_terms(s, a, c, two_over_tau)
            if grad_w is None:
                continue
            gs = grad_w[:, s]
            ap = torch.bmm(c, gs.transpose(1, 2), out=like(a, "q")).mul_(a)  # A_ji (g_i . c_j)
            sa = ap.sub_(torch.mul(a, ap.sum(1, keepdim=True), out=like(a, "aq")))  # dL/dlogits
            gc += torch.bmm(a, gs)
            gc += two_over_tau * (torch.bmm(sa, xs) - c * sa.sum(2, keepdim=True))
            self.direct_term(s, sa, c, two_over_tau)
        self.reduce(sums), self.reduce(gc)
        if grams is not None:
            self.reduce(grams)
        if grad_c is not None:
            gc += grad_c
        return GramSums(sums, grams, gc)

    def row_terms(self, s: slice, a: Tensor, c: Tensor, two_over_tau: Tensor) -> None:
        """Per-row terms of the Gram pass beyond the sums (none here; the uniquified variant takes slopes)."""

    def direct_term(self, s: slice, sa: Tensor, c: Tensor, two_over_tau: Tensor) -> None:
        """Each row's own ``(2/tau) sum_j s_ij c_j``, ``s`` the gradient into its logits."""
        assert self.dx is not None
        self.dx[:, s] += two_over_tau * torch.bmm(sa.transpose(1, 2), c)

    def adjoint_pass(self, c: Tensor, u: Tensor, want_next: bool) -> Tensor | None:
        x, m, tau = self.problem.x, self.problem.m, self.problem.tau
        assert self.dx is not None
        two_over_tau = (2.0 / tau).view(-1, 1, 1)
        cu = (c * u).sum(-1, keepdim=True)  # (G, k, 1)
        next_gc = torch.zeros_like(c) if want_next else None
        for s in self.chunks():
            xs = x[:, s]
            a = self.kept if self.kept is not None else attention(xs, c, tau)
            # (G, k, r) maps in scratch buffers (see :mod:`.scratch`); q: (x_i - c_j) . u_j, then t in place
            q = torch.bmm(u, xs.transpose(1, 2), out=like(a, "q")).sub_(cu)
            if m is not None:
                q.mul_(m[:, None, s])
            t = q.sub_(torch.mul(a, q, out=like(a, "aq")).sum(1, keepdim=True)).mul_(a)
            if next_gc is not None:
                next_gc += two_over_tau * (torch.bmm(t, xs) - c * t.sum(2, keepdim=True))
            dxs = torch.bmm(a.transpose(1, 2), u)
            if m is not None:
                dxs = dxs * m[:, s, None]
            self.dx[:, s] += dxs + two_over_tau * torch.bmm(t.transpose(1, 2), c)
        return None if next_gc is None else self.reduce(next_gc)

    def input_grad(self) -> Tensor:
        assert self.dx is not None
        dx, self.dx, self.kept = self.dx, None, None
        return self.reduce(dx)


@dataclass(frozen=True)
class Shard:
    """This process's share of the rows when the attention is sharded across ranks."""

    rank: int
    world: int
    group: Any = None

    def span(self, n: int) -> tuple[int, int]:
        per = -(-n // self.world)
        return min(n, self.rank * per), min(n, (self.rank + 1) * per)

    @staticmethod
    def current() -> Shard | None:
        """This rank's share under ``torch.distributed`` (``None`` outside it or with one rank)."""
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return Shard(dist.get_rank(), dist.get_world_size())


class ShardedAttention(DenseAttention):
    """:class:`DenseAttention` on this rank's rows only, sums all-reduced (see the module docstring)."""

    sharded = True

    def __init__(self, problem: Problem, shard: Shard):
        super().__init__(problem)
        self.shard = shard

    def chunks(self) -> Iterator[slice]:
        n = self.problem.x.shape[1]
        return row_chunks(n, self.rows, *self.shard.span(n))

    def reduce(self, t: Tensor) -> Tensor:
        if self.shard.world > 1:
            torch.distributed.all_reduce(t, group=self.shard.group)
        return t

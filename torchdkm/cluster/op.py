"""The DKM op: differentiable k-means as attention, with a memory-lean backward.

Shapes: ``x`` is ``(G, n, d)`` (G independent groups of n vectors), ``m`` is
``(G, n)`` vector multiplicities (1 for an ordinary vector, the count of a
distinct value when uniquified, 0 for padding; ``None`` means all 1), ``c`` is
``(G, k, d)`` centroids and ``tau`` is ``(G,)`` absolute temperatures.

Forward.  ``A = softmax(-|x - c|^2 / tau)`` row-wise and
``F(c) = (A^T m x) / (A^T m)``; iterate ``c <- F(c)`` until no centroid moves
more than ``tol`` (or ``max_iters``), then return ``w = A(c) c`` and ``c``.
Every pass over ``x`` is chunked by rows, so the attention map held at one time
is bounded by ``rows x k``, whatever the layer size.

Backward (why it does not grow with iterations).  Autograd over the unrolled
loop would keep one ``n x k`` attention map per iteration.  We instead treat
the returned ``c*`` as the fixed point ``c* = F(c*, x)`` and differentiate it
implicitly (as IDKM proposes): with ``g_c`` the gradient reaching ``c*``, the
adjoint ``v`` solves ``(I - dF/dc)^T v = g_c`` and the weights get
``(dF/dx)^T v``.  Only ``x``, ``m``, ``c*`` and ``tau`` are saved.

The backward is two chunked passes whatever the iteration count.  Pass 1
recomputes the attention, takes the output's gradient into ``c*`` and gathers
Gram sums ``sum_i w_i A_ij A_il`` (``w`` = 1, ``x_a``, ``x_a x_b``) from which
``dF/dc``, a small ``(k d) x (k d)`` matrix, is formed exactly; ``v`` comes from
one dense solve.  Pass 2 applies ``(dF/dx)^T v``.  (IDKM iterates the adjoint
to its fixed point instead; 1-D k-means contracts slowly, spectral radius
~0.95 on Gaussian weights, so that needs dozens of passes.)  When ``k`` is so
large that the Gram sums cost more than a pass (``k * terms > EXPLICIT_LIMIT``,
e.g. 8 bits on the exact path), the adjoint is summed as a Neumann series
``sum_t (dF/dc)^T^t g_c``, one pass per term, capped at ``max_iters`` terms.

This is the exact gradient of the fixed-point map: finite differences agree
to ~1e-7 in float64, and so does autograd through the unrolled loop once that
loop has converged (to ~1e-12).  Where the forward stops before convergence
(``max_iters``), the implicit gradient is that of the fixed point the
iterations are heading to; an unrolled gradient of ``T`` iterations instead
truncates the series after ``T`` terms, by design of the unrolling.

The output's own gradient is ``dw/dx = (2 / tau) Cov_A(c)``: the covariance of
the centroids under the row's attention.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: A centroid whose total attention mass is below this (in vectors) is empty:
#: it keeps its value instead of becoming 0/0.
EMPTY_MASS = 1e-8
#: The backward forms ``dF/dc`` explicitly (and solves exactly) when ``k`` times
#: the number of Gram terms is at most this; beyond, a Neumann series is summed.
EXPLICIT_LIMIT = 512
#: A solve that amplifies the gradient more than this (a near-singular ``I - dF/dc``,
#: as with duplicate centroids) falls back to the truncated Neumann series.
MAX_AMPLIFICATION = 1e3


def rows_per_chunk(groups: int, k: int, dim: int, itemsize: int, budget_bytes: float) -> int:
    """Rows per chunk so the per-chunk temporaries fit the budget.

    The backward's Gram matrices (see :func:`_jacobian`) weight the attention
    chunk ``1 + d + d(d+1)/2`` ways at once; other temporaries are a few
    ``k x rows`` maps.
    """
    per_row = groups * ((6 + _gram_terms(dim)) * k + 4 * dim) * itemsize
    return max(1, int(budget_bytes // per_row))


def _gram_terms(dim: int) -> int:
    return 1 + dim + dim * (dim + 1) // 2


@dataclass(frozen=True)
class Shard:
    """This process's share of the rows when the attention is sharded across ranks (eDKM's idea).

    Each rank computes the attention for a contiguous block of rows only; every
    sum over rows (centroid statistics, Gram sums, gradients into the
    centroids) is all-reduced, and the per-row outputs (soft weights, weight
    gradients) are assembled by an all-reduce of zero-padded tensors, so every
    rank ends with the full, identical result while holding a ``1 / world``
    share of the attention map.
    """

    rank: int
    world: int
    group: Any = None

    def span(self, n: int) -> tuple[int, int]:
        per = -(-n // self.world)
        return min(n, self.rank * per), min(n, (self.rank + 1) * per)


_SHARD: ContextVar[Shard | None] = ContextVar("torchdkm_shard", default=None)


@contextmanager
def sharded(shard: Shard | None) -> Iterator[None]:
    """Run the dense op's passes on this rank's rows only (see :class:`Shard`)."""
    token = _SHARD.set(shard)
    try:
        yield
    finally:
        _SHARD.reset(token)


def _reduce(t: Tensor) -> Tensor:
    """Sum ``t`` over the ranks sharing the rows (a no-op unless sharded)."""
    shard = _SHARD.get()
    if shard is not None and shard.world > 1:
        torch.distributed.all_reduce(t, group=shard.group)
    return t


def _chunks(n: int, rows: int) -> Iterator[slice]:
    shard = _SHARD.get()
    first, last = (0, n) if shard is None else shard.span(n)
    for start in range(first, last, rows):
        yield slice(start, min(start + rows, last))


def attention(x: Tensor, c: Tensor, tau: Tensor) -> Tensor:
    """``softmax_j(-|x_i - c_j|^2 / tau)``, laid out centroid-major: ``(G, k, rows)``.

    Centroid-major keeps every elementwise op and the softmax vectorised along
    the long rows axis (``k`` is small), several times faster than ``(rows, k)``.
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


def _mass(a: Tensor, m: Tensor | None) -> Tensor:
    """``A^T m``: (G, k)."""
    if m is None:
        return a.sum(2)
    return torch.bmm(a, m.unsqueeze(-1)).squeeze(-1)


def update(x: Tensor, m: Tensor | None, c: Tensor, tau: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """One DKM iteration, chunked: ``(F(c), A^T m)``."""
    num = torch.zeros_like(c)
    den = c.new_zeros(c.shape[:2])
    for s in _chunks(x.shape[1], rows):
        a = attention(x[:, s], c, tau)
        xs = x[:, s] if m is None else x[:, s] * m[:, s, None]
        num += torch.bmm(a, xs)
        den += _mass(a, None if m is None else m[:, s])
    _reduce(num), _reduce(den)
    full = den > EMPTY_MASS
    new = torch.where(full.unsqueeze(-1), num / den.clamp_min(EMPTY_MASS).unsqueeze(-1), c)
    return new, den


def iterate(
    x: Tensor, m: Tensor | None, c: Tensor, tau: Tensor, max_iters: int, tol: Tensor, rows: int
) -> tuple[Tensor, int]:
    """Iterate ``c <- F(c)``; stop when every group's largest move is within its ``tol``."""
    for done in range(1, max_iters + 1):
        new, _ = update(x, m, c, tau, rows)
        moved = (new - c).abs().amax(dim=(1, 2))
        c = new
        if bool((moved <= tol).all()):
            return c, done
    return c, max_iters


def soft_output(x: Tensor, c: Tensor, tau: Tensor, rows: int) -> Tensor:
    """``A(c) c`` for every vector, chunked."""
    out = torch.empty_like(x) if _SHARD.get() is None else torch.zeros_like(x)
    for s in _chunks(x.shape[1], rows):
        out[:, s] = torch.bmm(attention(x[:, s], c, tau).transpose(1, 2), c)
    return _reduce(out)


def _gram_weights(xs: Tensor, m: Tensor | None) -> Tensor:
    """``(G, P, rows)``: the row weights ``m, m x_a, m x_a x_b (a <= b)`` of the Gram matrices."""
    ones = torch.ones_like(xs[..., 0]) if m is None else m
    terms = [ones] + [ones * xs[..., a] for a in range(xs.shape[-1])]
    terms += [ones * xs[..., a] * xs[..., b] for a in range(xs.shape[-1]) for b in range(a, xs.shape[-1])]
    return torch.stack(terms, 1)


def _second_moments(packed: Tensor, d: int) -> Tensor:
    """``(..., d, d)`` symmetric matrices from the packed ``x_a x_b (a <= b)`` terms of :func:`_gram_weights`."""
    out = packed.new_empty(*packed.shape[:-1], d, d)
    pos = 1 + d
    for a in range(d):
        for b in range(a, d):
            out[..., a, b] = packed[..., pos]
            out[..., b, a] = packed[..., pos]
            pos += 1
    return out


def _jacobian(grams: Tensor, sums: Tensor, c: Tensor, two_over_tau: Tensor) -> Tensor:
    """``dF/dc`` as a ``(G, k d, k d)`` matrix, from sums gathered in one pass.

    With ``F_j = sum_i m_i A_ij x_i / D_j`` and ``dA_ij/dc_l = (2/tau) A_ij (delta_jl - A_il) (x_i - c_l)``:
    ``J_jl = (2/tau) / D_j [delta_jl (S_j - D_j c_j c_j^T) - sum_i m_i A_ij A_il (x_i - c_j)(x_i - c_l)^T]``
    where ``S_j = sum_i m_i A_ij x_i x_i^T``; the last sum expands into the Gram
    matrices ``sum_i w_i A_ij A_il`` for the weights of :func:`_gram_weights`.
    ``F`` is taken at its fixed point, ``F(c) = c``.
    """
    g, k, d = c.shape
    pairs = grams.permute(0, 2, 3, 1)  # (G, k, k, P)
    s0, s1, s2 = pairs[..., 0], pairs[..., 1 : 1 + d], _second_moments(pairs, d)
    cj = c[:, :, None, :, None]  # (G, k, 1, d, 1)
    cl = c[:, None, :, None, :]  # (G, 1, k, 1, d)
    cross = s2 - s1[..., :, None] * cl - cj * s1[..., None, :] + s0[..., None, None] * cj * cl
    den = sums[..., 0]
    diag = _second_moments(sums, d) - den[..., None, None] * c[..., :, None] * c[..., None, :]
    jac = -cross
    idx = torch.arange(k, device=c.device)
    jac[:, idx, idx] += diag
    inv_den = torch.where(den > EMPTY_MASS, 1.0 / den.clamp_min(EMPTY_MASS), torch.zeros_like(den))
    jac = jac * (two_over_tau.view(-1, 1, 1, 1, 1) * inv_den[:, :, None, None, None])
    return jac.permute(0, 1, 3, 2, 4).reshape(g, k * d, k * d)


def backward(
    x: Tensor,
    m: Tensor | None,
    c: Tensor,
    tau: Tensor,
    grad_w: Tensor | None,
    grad_c: Tensor | None,
    rows: int,
    *,
    direct: bool,
    max_terms: int,
    tol: float,
    want_jac: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Gradient into ``x`` of ``(w, c*)``; see the module docstring.

    direct: add each row's own ``(2/tau) Cov_A(c) grad_w`` term.  The
        uniquified path passes summed gradients per distinct value and applies
        that term per weight itself, from ``want_jac`` (``dim == 1`` only).
    Returns ``(dx, jac)``; ``jac`` is the per-row ``(2/tau) Var_A(c)``.
    """
    g, k, d = c.shape
    two_over_tau = (2.0 / tau).view(-1, 1, 1)
    explicit = k * _gram_terms(d) <= EXPLICIT_LIMIT
    dx = torch.zeros_like(x)
    jac = torch.empty_like(x) if want_jac else None
    gc = torch.zeros_like(c)
    sums = c.new_zeros(g, k, _gram_terms(d))  # per centroid: sum_i m A, m A x_a, m A x_a x_b
    grams = c.new_zeros(g, _gram_terms(d), k, k) if explicit else None
    kept = None

    # Pass 1: the output's gradient into c* (and into x directly), and the sums that make dF/dc.
    for s in _chunks(x.shape[1], rows):
        xs = x[:, s]
        a = attention(xs, c, tau)  # (G, k, r)
        if s.start == 0 and s.stop == x.shape[1]:
            kept = a
        weights = _gram_weights(xs, None if m is None else m[:, s])  # (G, P, r)
        sums += torch.bmm(a, weights.transpose(1, 2))
        if explicit:
            weighted = a.unsqueeze(1) * weights.unsqueeze(2)  # (G, P, k, r)
            grams += torch.bmm(weighted.flatten(1, 2), a.transpose(1, 2)).view_as(grams)
        if want_jac:
            w = torch.bmm(a.transpose(1, 2), c)
            jac[:, s] = two_over_tau * (torch.bmm(a.transpose(1, 2), c * c) - w * w)
        if grad_w is None:
            continue
        gs = grad_w[:, s]
        ap = a * torch.bmm(c, gs.transpose(1, 2))  # A_ji (g_i . c_j)
        sa = ap - a * ap.sum(1, keepdim=True)  # dL/dlogits
        gc += torch.bmm(a, gs)
        gc += two_over_tau * (torch.bmm(sa, xs) - c * sa.sum(2, keepdim=True))
        if direct:
            dx[:, s] += two_over_tau * torch.bmm(sa.transpose(1, 2), c)

    _reduce(sums), _reduce(gc)
    if explicit:
        _reduce(grams)
    if grad_c is not None:
        gc += grad_c
    # v = (I - dF/dc)^-T gc: solved exactly when dF/dc is small enough to form, else a Neumann series.
    den = sums[..., 0]
    full = (den > EMPTY_MASS).unsqueeze(-1)
    inv_den = torch.where(full, 1.0 / den.clamp_min(EMPTY_MASS).unsqueeze(-1), torch.zeros_like(c))
    if explicit:
        jacobian = _jacobian(grams, sums, c, two_over_tau.view(-1))
        eye = torch.eye(k * d, dtype=c.dtype, device=c.device)
        v = torch.linalg.solve((eye - jacobian).transpose(1, 2), gc.reshape(g, k * d, 1)).view(g, k, d)
        if bool(torch.isfinite(v).all()) and float(v.norm()) <= MAX_AMPLIFICATION * float(gc.norm()) + 1e-30:
            _adjoint_pass(x, m, c, tau, v * inv_den, rows, dx, kept)
            return _reduce(dx), jac
    u = gc * inv_den  # (G, k, d): gradient per unit of mass
    first = float(u.norm())
    for _ in range(max_terms):
        if first == 0.0:
            break
        next_gc = _adjoint_pass(x, m, c, tau, u, rows, dx, kept, want_next=True)
        u = next_gc * inv_den
        if float(u.norm()) <= tol * first:
            break
    return _reduce(dx), jac


def _adjoint_pass(
    x: Tensor,
    m: Tensor | None,
    c: Tensor,
    tau: Tensor,
    u: Tensor,
    rows: int,
    dx: Tensor,
    kept: Tensor | None,
    want_next: bool = False,
) -> Tensor | None:
    """Add ``(dF/dx)^T v`` to ``dx`` for ``u = v / D``; optionally return ``(dF/dc)^T v``."""
    two_over_tau = (2.0 / tau).view(-1, 1, 1)
    cu = (c * u).sum(-1, keepdim=True)  # (G, k, 1)
    next_gc = torch.zeros_like(c) if want_next else None
    for s in _chunks(x.shape[1], rows):
        xs = x[:, s]
        a = kept if kept is not None else attention(xs, c, tau)
        q = torch.bmm(u, xs.transpose(1, 2)) - cu  # (G, k, r): (x_i - c_j) . u_j
        if m is not None:
            q = q * m[:, None, s]
        t = a * (q - (a * q).sum(1, keepdim=True))
        if want_next:
            next_gc += two_over_tau * (torch.bmm(t, xs) - c * t.sum(2, keepdim=True))
        dxs = torch.bmm(a.transpose(1, 2), u)
        if m is not None:
            dxs = dxs * m[:, s, None]
        dx[:, s] += dxs + two_over_tau * torch.bmm(t.transpose(1, 2), c)
    return None if next_gc is None else _reduce(next_gc)


class DKMFunction(torch.autograd.Function):
    """``(w, c*) = dkm(x, m, c0)``; saves only ``x, m, c*, tau`` for backward."""

    @staticmethod
    def forward(ctx, x, m, c0, tau, max_iters, tol, rows, grad_tol):  # type: ignore[override]
        c, iters = iterate(x, m, c0, tau, max_iters, tol, rows)
        w = soft_output(x, c, tau, rows)
        ctx.save_for_backward(x, m, c, tau)
        ctx.rows, ctx.max_terms, ctx.grad_tol = rows, max(max_iters, 1), grad_tol
        ctx.iters, ctx.shard = iters, _SHARD.get()
        ctx.set_materialize_grads(False)
        return w, c

    @staticmethod
    def backward(ctx, grad_w, grad_c):  # type: ignore[override]
        x, m, c, tau = ctx.saved_tensors
        with sharded(ctx.shard):
            dx, _ = backward(
                x, m, c, tau, grad_w, grad_c, ctx.rows, direct=True, max_terms=ctx.max_terms, tol=ctx.grad_tol
            )
        return dx, None, None, None, None, None, None, None


def dkm(
    x: Tensor,
    m: Tensor | None,
    c0: Tensor,
    tau: Tensor,
    *,
    max_iters: int,
    tol: Tensor,
    rows: int,
    grad_tol: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Soft-clustered vectors ``A c*`` and the converged centroids ``c*``.

    Both outputs are differentiable into ``x`` (``c*`` through the fixed point);
    ``c0`` and ``tau`` are treated as constants.
    """
    return DKMFunction.apply(x, m, c0.detach(), tau.detach(), max_iters, tol, rows, grad_tol)


def dkm_unrolled(x: Tensor, m: Tensor | None, c0: Tensor, tau: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Reference: the same computation with plain autograd through every iteration.

    Memory grows with ``iters`` (one attention map each); tests compare the
    fast op against it.
    """
    c = c0.detach()
    weights = torch.ones_like(x[..., 0]) if m is None else m
    for _ in range(iters):
        a = torch.softmax(-torch.cdist(x, c).pow(2) / tau.view(-1, 1, 1), dim=-1)
        den = torch.bmm(weights.unsqueeze(1), a).squeeze(1)
        num = torch.bmm(a.transpose(1, 2), x * weights.unsqueeze(-1))
        c = num / den.unsqueeze(-1)
    a = torch.softmax(-torch.cdist(x, c).pow(2) / tau.view(-1, 1, 1), dim=-1)
    return torch.bmm(a, c), c

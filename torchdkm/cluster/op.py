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
implicitly (as IDKM proposes): with ``g_c`` the gradient reaching ``c*``,
``v = (I - dF/dc)^-T g_c`` is summed as the Neumann series
``sum_t (dF/dc)^T^t g_c`` and the weights get ``(dF/dx)^T v``.  Only ``x``,
``m``, ``c*`` and ``tau`` are saved; each series term recomputes the attention
chunk by chunk.  The series converges at the rate of the forward iteration
(the same Jacobian), so it needs about as many terms as the forward needed
iterations.  At convergence this equals the gradient of the exact fixed-point
map (finite differences agree to ~1e-7 in float64); the unrolled-autograd
gradient of T iterations differs from it by the truncated series tail,
``O(rho^T)`` with ``rho`` the spectral radius of ``dF/dc``.

The output's own gradient is ``dw/dx = (2 / tau) Cov_A(c)``: the covariance of
the centroids under the row's attention.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

#: A centroid whose total attention mass is below this (in vectors) is empty:
#: it keeps its value instead of becoming 0/0.
EMPTY_MASS = 1e-8


def rows_per_chunk(groups: int, k: int, dim: int, itemsize: int, budget_bytes: float) -> int:
    """Rows per chunk so the per-chunk temporaries (about 6 ``rows x k`` maps) fit the budget."""
    per_row = groups * (6 * k + 4 * dim) * itemsize
    return max(1, int(budget_bytes // per_row))


def _chunks(n: int, rows: int) -> Iterator[slice]:
    for start in range(0, n, rows):
        yield slice(start, min(start + rows, n))


def logits(x: Tensor, c: Tensor, tau: Tensor) -> Tensor:
    """``-|x - c|^2 / tau``, up to a per-row constant for vectors (softmax ignores it).

    Scalars use the exact difference (no cancellation, whatever ``k``);
    vectors use ``2 x.c - |c|^2``, one batched matmul.
    """
    scale = (1.0 / tau).view(-1, 1, 1)
    if x.shape[-1] == 1:
        root = scale.sqrt()
        diff = (x * root) - (c * root).transpose(1, 2)
        return diff.square_().neg_()
    bias = -(c * c).sum(-1).unsqueeze(1) * scale  # (G, 1, k)
    return torch.baddbmm(bias, x, ((2.0 * scale) * c).transpose(1, 2))


def attention(x: Tensor, c: Tensor, tau: Tensor) -> Tensor:
    return torch.softmax(logits(x, c, tau), dim=-1)


def _mass(a: Tensor, m: Tensor | None) -> Tensor:
    """``A^T m``: (G, k)."""
    if m is None:
        return a.sum(1)
    return torch.bmm(m.unsqueeze(1), a).squeeze(1)


def update(x: Tensor, m: Tensor | None, c: Tensor, tau: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """One DKM iteration, chunked: ``(F(c), A^T m)``."""
    num = torch.zeros_like(c)
    den = c.new_zeros(c.shape[:2])
    for s in _chunks(x.shape[1], rows):
        a = attention(x[:, s], c, tau)
        xs = x[:, s] if m is None else x[:, s] * m[:, s, None]
        num += torch.bmm(a.transpose(1, 2), xs)
        den += _mass(a, None if m is None else m[:, s])
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
    out = torch.empty_like(x)
    for s in _chunks(x.shape[1], rows):
        out[:, s] = torch.bmm(attention(x[:, s], c, tau), c)
    return out


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
    two_over_tau = (2.0 / tau).view(-1, 1, 1)
    dx = torch.zeros_like(x)
    jac = torch.empty_like(x) if want_jac else None
    gc = torch.zeros_like(c) if grad_c is None else grad_c.clone()
    den = c.new_zeros(c.shape[:2])

    # Pass 1: the output's gradient into c* (and into x directly), plus A^T m.
    for s in _chunks(x.shape[1], rows):
        xs = x[:, s]
        a = attention(xs, c, tau)
        den += _mass(a, None if m is None else m[:, s])
        if want_jac:
            w = torch.bmm(a, c)
            jac[:, s] = two_over_tau * (torch.bmm(a, c * c) - w * w)
        if grad_w is None:
            continue
        gs = grad_w[:, s]
        ap = a * torch.bmm(gs, c.transpose(1, 2))  # A * (g . c_j)
        sa = ap - a * ap.sum(-1, keepdim=True)  # dL/dlogits
        gc += torch.bmm(a.transpose(1, 2), gs)
        gc += two_over_tau * (torch.bmm(sa.transpose(1, 2), xs) - c * sa.sum(1).unsqueeze(-1))
        if direct:
            dx[:, s] += two_over_tau * torch.bmm(sa, c)

    # Passes 2..: v = sum_t (dF/dc)^T^t gc; dx += (dF/dx)^T v, term by term.
    full = (den > EMPTY_MASS).unsqueeze(-1)
    inv_den = torch.where(full, 1.0 / den.clamp_min(EMPTY_MASS).unsqueeze(-1), torch.zeros_like(c))
    u = gc * inv_den  # (G, k, d): gradient per unit of mass
    first = u.norm()
    for _ in range(max_terms):
        if float(first) == 0.0:
            break
        cu = (c * u).sum(-1).unsqueeze(1)  # (G, 1, k)
        next_gc = torch.zeros_like(c)
        for s in _chunks(x.shape[1], rows):
            xs = x[:, s]
            a = attention(xs, c, tau)
            q = torch.bmm(xs, u.transpose(1, 2)) - cu  # (x_i - c_j) . u_j
            if m is not None:
                q = q * m[:, s, None]
            t = a * (q - (a * q).sum(-1, keepdim=True))
            next_gc += two_over_tau * (torch.bmm(t.transpose(1, 2), xs) - c * t.sum(1).unsqueeze(-1))
            dxs = torch.bmm(a, u)
            if m is not None:
                dxs = dxs * m[:, s, None]
            dx[:, s] += dxs + two_over_tau * torch.bmm(t, c)
        u = next_gc * inv_den
        if float(u.norm()) <= tol * float(first):
            break
    return dx, jac


class DKMFunction(torch.autograd.Function):
    """``(w, c*) = dkm(x, m, c0)``; saves only ``x, m, c*, tau`` for backward."""

    @staticmethod
    def forward(ctx, x, m, c0, tau, max_iters, tol, rows, grad_tol):  # type: ignore[override]
        c, iters = iterate(x, m, c0, tau, max_iters, tol, rows)
        w = soft_output(x, c, tau, rows)
        ctx.save_for_backward(x, m, c, tau)
        ctx.rows, ctx.max_terms, ctx.grad_tol = rows, max(max_iters, 1), grad_tol
        ctx.iters = iters
        ctx.set_materialize_grads(False)
        return w, c

    @staticmethod
    def backward(ctx, grad_w, grad_c):  # type: ignore[override]
        x, m, c, tau = ctx.saved_tensors
        dx, _ = backward(x, m, c, tau, grad_w, grad_c, ctx.rows, direct=True, max_terms=ctx.max_terms, tol=ctx.grad_tol)
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

"""The engine's contract: one interface every attention variant implements, and the fixed point they share.

Forward.  ``A = softmax(-|x - c|^2 / tau)`` row-wise and
``F(c) = (A^T m x) / (A^T m)``; iterate ``c <- F(c)`` until no centroid moves
more than ``tol`` (or ``max_iters``), then return ``w = A(c) c`` and ``c``.  A
variant (:class:`Attention`) decides how ``A`` is computed: every centroid per
row (:mod:`.dense`), each row's nearest few (:mod:`.sparse`), once per distinct
16-bit value (:mod:`.unique`), or by rows split across ranks (:mod:`.dense`'s
sharded form).  :func:`iterate` and :func:`backward` are the same for all.

Backward (why it does not grow with iterations).  Autograd over the unrolled
loop would keep one ``n x k`` attention map per iteration.  We instead treat
the returned ``c*`` as the fixed point ``c* = F(c*, x)`` and differentiate it
implicitly (as IDKM proposes): with ``g_c`` the gradient reaching ``c*``, the
adjoint ``v`` solves ``(I - dF/dc)^T v = g_c`` and the weights get
``(dF/dx)^T v``.  Only the inputs and ``c*`` are kept.

The backward is two passes whatever the iteration count.  The *Gram pass*
recomputes the attention, takes the output's gradient into ``c*`` (and into
``x`` directly) and gathers Gram sums ``sum_i w_i A_ij A_il`` (``w`` = 1,
``x_a``, ``x_a x_b``) from which ``dF/dc``, a small ``(k d) x (k d)`` matrix,
is formed exactly (:func:`jacobian`); ``v`` comes from one dense solve.  The
*adjoint pass* applies ``(dF/dx)^T v``.  (IDKM iterates the adjoint to its
fixed point instead; 1-D k-means contracts slowly, spectral radius ~0.95 on
Gaussian weights, so that needs dozens of passes.)  When ``k`` is so large that
the Gram sums cost more than a pass (``k * gram_terms > EXPLICIT_LIMIT``, e.g.
8 bits), or the solve amplifies the gradient more than ``MAX_AMPLIFICATION``
(a near-singular ``I - dF/dc``, as with duplicate centroids), the adjoint is
summed as a Neumann series ``sum_t (dF/dc)^T^t g_c``, one adjoint pass per
term, capped at ``max_iters`` terms.

This is the exact gradient of the fixed-point map: finite differences agree
to ~1e-7 in float64, and so does autograd through the unrolled loop once that
loop has converged (to ~1e-12).  Where the forward stops before convergence,
the implicit gradient is that of the fixed point the iterations are heading to.
The output's own gradient is ``dw/dx = (2 / tau) Cov_A(c)``: the covariance of
the centroids under the row's attention.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from .problem import Problem, gram_terms, per_member

#: A centroid whose total attention mass is below this (in vectors) is empty:
#: it keeps its value instead of becoming 0/0.
EMPTY_MASS = 1e-8
#: The backward forms ``dF/dc`` explicitly (and solves exactly) when ``k`` times
#: the number of Gram terms is at most this; beyond, a Neumann series is summed.
EXPLICIT_LIMIT = 512
#: A solve that amplifies the gradient more than this falls back to the truncated Neumann series.
MAX_AMPLIFICATION = 1e3


def explicit(problem: Problem) -> bool:
    """Whether ``dF/dc`` is formed and solved (else the Neumann series runs: ``k`` too large, or truncated on purpose)."""
    return not problem.grad_terms and problem.k * gram_terms(problem.dim) <= EXPLICIT_LIMIT


@dataclass
class GramSums:
    """What the Gram pass hands the solve, in the variant's algebra dtype.

    ``sums`` (G, k, P): per centroid ``sum_i w_i A_ij`` for the row weights
    ``m, m x_a, m x_a x_b``; ``grams`` (G, P, k, k): ``sum_i w_i A_ij A_il``
    (``None`` when ``dF/dc`` is not formed); ``gc`` (G, k, d): the gradient
    reaching ``c*``, the output's share and the caller's.
    """

    sums: Tensor
    grams: Tensor | None
    gc: Tensor


class Attention(ABC):
    """One way of computing DKM's attention over a :class:`.Problem`.

    The forward calls :meth:`update` until the centroids settle, then
    :meth:`output`; the backward calls :meth:`gram_pass` once, :meth:`adjoint_pass`
    once (or once per Neumann term) and :meth:`input_grad`.  A variant keeps
    what its passes share (layouts, selections) between the calls; the gradient
    into its input accumulates inside it from :meth:`gram_pass` on.
    """

    problem: Problem

    @abstractmethod
    def update(self, c: Tensor) -> Tensor:
        """One iteration: ``F(c)``."""

    @abstractmethod
    def output(self, c: Tensor) -> Tensor:
        """The soft output ``A(c) c``, shaped like the variant's input."""

    @abstractmethod
    def gram_pass(self, c: Tensor, grad_w: Tensor | None, grad_c: Tensor | None) -> GramSums:
        """Start the backward at ``c``: the Gram sums, the gradient into ``c*``, the output's direct term."""

    @abstractmethod
    def adjoint_pass(self, c: Tensor, u: Tensor, want_next: bool) -> Tensor | None:
        """Add ``(dF/dx)^T v`` to the input gradient for ``u = v / D``; with ``want_next``, return ``(dF/dc)^T v``."""

    @abstractmethod
    def input_grad(self) -> Tensor:
        """The gradient into the variant's input, once the passes are done."""


def iterate(attention: Attention, c: Tensor) -> tuple[Tensor, int]:
    """Iterate ``c <- F(c)``; stop when every group's largest move is within its ``tol``.

    With several members (layers batched into one problem), each member stops on its own:
    its groups keep the centroids of the iteration at which all of them settled.
    """
    problem = attention.problem
    live: Tensor | None = None  # (G,) groups still iterating (members only)
    for done in range(1, problem.max_iters + 1):
        new = attention.update(c)
        moved = (new - c).abs().amax(dim=(1, 2))
        if problem.members is None:
            c = new
            if bool((moved <= problem.tol).all()):
                return c, done
            continue
        c = new if live is None else torch.where(live[:, None, None], new, c)
        unsettled = per_member(problem, (moved > problem.tol).to(moved.dtype))[problem.members] > 0
        live = unsettled if live is None else live & unsettled
        if not bool(live.any()):
            return c, done
    return c, problem.max_iters


def backward(attention: Attention, c: Tensor, grad_w: Tensor | None, grad_c: Tensor | None) -> Tensor:
    """The gradient into the variant's input of ``(w, c*)``: see the module docstring."""
    problem = attention.problem
    found = attention.gram_pass(c, grad_w, grad_c)
    g, k, d = c.shape
    algebra = found.sums.dtype  # (the sparse variant forms dF/dc in float64)
    den = found.sums[..., 0]
    full = (den > EMPTY_MASS).unsqueeze(-1)
    inv_den = torch.where(full, 1.0 / den.clamp_min(EMPTY_MASS).unsqueeze(-1), torch.zeros_like(found.gc))
    inv_den = inv_den.to(c.dtype)
    gc = found.gc
    if found.grams is not None:
        jac = jacobian(found.grams, found.sums, c.to(algebra), (2.0 / problem.tau).to(algebra))
        eye = torch.eye(k * d, dtype=algebra, device=c.device)
        v = torch.linalg.solve((eye - jac).transpose(1, 2), gc.reshape(g, k * d, 1)).view(g, k, d)
        solved = _solved(problem, v, gc)
        if solved is None:
            attention.adjoint_pass(c, v.to(c.dtype) * inv_den, False)
            return attention.input_grad()
        if bool(solved.any()):  # members whose solve held: one adjoint pass; the others sum the series
            attention.adjoint_pass(c, torch.where(solved[:, None, None], v, 0).to(c.dtype) * inv_den, False)
            gc = torch.where(solved[:, None, None], 0, gc)
    _neumann(attention, c, gc.to(c.dtype) * inv_den, inv_den, problem.grad_terms or max(problem.max_iters, 1))
    return attention.input_grad()


def _solved(problem: Problem, v: Tensor, gc: Tensor) -> Tensor | None:
    """``None`` when every member's solve is finite and within ``MAX_AMPLIFICATION``; else ``(G,)`` which are."""
    if problem.members is None:
        ok = bool(torch.isfinite(v).all()) and float(v.norm()) <= MAX_AMPLIFICATION * float(gc.norm()) + 1e-30
        return None if ok else torch.zeros(v.shape[0], dtype=torch.bool, device=v.device)
    finite = per_member(problem, (~torch.isfinite(v)).flatten(1).any(1).to(v.dtype)) == 0
    v_norm = per_member(problem, torch.nan_to_num(v * v, posinf=0.0).sum((1, 2))).sqrt()
    g_norm = per_member(problem, (gc * gc).sum((1, 2))).sqrt()
    ok = finite & (v_norm <= MAX_AMPLIFICATION * g_norm + 1e-30)
    return None if bool(ok.all()) else ok[problem.members]


def _neumann(attention: Attention, c: Tensor, u: Tensor, inv_den: Tensor, terms: int) -> None:
    """Sum ``terms`` terms of ``sum_t (dF/dc)^T^t`` applied to ``u`` (per unit of mass), one adjoint pass each.

    A member stops when its term falls below ``grad_tol`` times its first (its ``u`` is then zero).
    """
    problem = attention.problem
    if problem.members is None:
        first = float(u.norm())
        for _ in range(terms):
            if first == 0.0:
                break
            u = attention.adjoint_pass(c, u, True) * inv_den
            if float(u.norm()) <= problem.grad_tol * first:
                break
        return
    first = per_member(problem, (u * u).sum((1, 2)).double()).sqrt()
    for _ in range(terms):
        live = (per_member(problem, (u * u).sum((1, 2)).double()).sqrt() > problem.grad_tol * first) & (first > 0)
        if not bool(live.any()):
            break
        u = torch.where(live[problem.members][:, None, None], u, 0)
        u = attention.adjoint_pass(c, u, True) * inv_den


def second_moments(packed: Tensor, d: int) -> Tensor:
    """``(..., d, d)`` symmetric matrices from the packed ``x_a x_b (a <= b)`` terms after ``1 + d`` others."""
    return packed[..., _moment_index(d, packed.device)].view(*packed.shape[:-1], d, d)


@functools.lru_cache(maxsize=32)
def _moment_index(d: int, device: torch.device) -> Tensor:
    """Where entry ``(a, b)`` of a second-moment matrix sits among the packed terms (one gather, no loop)."""
    pos, where = 1 + d, {}
    for a in range(d):
        for b in range(a, d):
            where[a, b] = where[b, a] = pos
            pos += 1
    return torch.tensor([where[a, b] for a in range(d) for b in range(d)], device=device)


def jacobian(grams: Tensor, sums: Tensor, c: Tensor, two_over_tau: Tensor) -> Tensor:
    """``dF/dc`` as a ``(G, k d, k d)`` matrix, from the sums of one Gram pass.

    With ``F_j = sum_i m_i A_ij x_i / D_j`` and ``dA_ij/dc_l = (2/tau) A_ij (delta_jl - A_il) (x_i - c_l)``:
    ``J_jl = (2/tau) / D_j [delta_jl (S_j - D_j c_j c_j^T) - sum_i m_i A_ij A_il (x_i - c_j)(x_i - c_l)^T]``
    where ``S_j = sum_i m_i A_ij x_i x_i^T``; the last sum expands into the Gram
    matrices ``sum_i w_i A_ij A_il``.  ``F`` is taken at its fixed point, ``F(c) = c``.
    """
    g, k, d = c.shape
    pairs = grams.permute(0, 2, 3, 1)  # (G, k, k, P)
    s0, s1, s2 = pairs[..., 0], pairs[..., 1 : 1 + d], second_moments(pairs, d)
    cj = c[:, :, None, :, None]  # (G, k, 1, d, 1)
    cl = c[:, None, :, None, :]  # (G, 1, k, 1, d)
    cross = s2 - s1[..., :, None] * cl - cj * s1[..., None, :] + s0[..., None, None] * cj * cl
    den = sums[..., 0]
    diag = second_moments(sums, d) - den[..., None, None] * c[..., :, None] * c[..., None, :]
    jac = -cross
    idx = torch.arange(k, device=c.device)
    jac[:, idx, idx] += diag
    inv_den = torch.where(den > EMPTY_MASS, 1.0 / den.clamp_min(EMPTY_MASS), torch.zeros_like(den))
    jac = jac * (two_over_tau.view(-1, 1, 1, 1, 1) * inv_den[:, :, None, None, None])
    return jac.permute(0, 1, 3, 2, 4).reshape(g, k * d, k * d)


class ClusterFunction(torch.autograd.Function):
    """``(w, c*)`` of one :class:`Attention` from ``c0``; keeps only its input and ``c*`` for backward.

    ``source`` is the variant's differentiable input (the vectors, or the weight
    itself when uniquified): saving it lets autograd check that it was not
    changed in place before the backward.  ``c0`` is a constant.
    """

    @staticmethod
    def forward(ctx, source, attention, c0):  # type: ignore[override]
        c, ctx.iters = iterate(attention, c0)
        w = attention.output(c)
        ctx.attention = attention
        ctx.save_for_backward(source, c)
        ctx.set_materialize_grads(False)
        return w, c

    @staticmethod
    def backward(ctx, grad_w, grad_c):  # type: ignore[override]
        _, c = ctx.saved_tensors
        return backward(ctx.attention, c, grad_w, grad_c), None, None


def run(source: Tensor, attention: Attention, c0: Tensor) -> tuple[Tensor, Tensor]:
    """The soft output ``A c*`` and the converged centroids ``c*``, both differentiable into ``source``."""
    return ClusterFunction.apply(source, attention, c0.detach())

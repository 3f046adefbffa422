"""Functional forms of the engine for the tests: one call per op, in rows per chunk, built on public pieces."""

from __future__ import annotations

import torch
from torch import Tensor

from torchdkm.cluster import DenseAttention, Problem, SparseAttention, engine, run
from torchdkm.cluster.problem import gram_terms
from torchdkm.cluster.rows import Data
from torchdkm.kernels import select


def budget(x: Tensor, k: int, rows: int) -> float:
    """The budget whose rows per chunk (:func:`torchdkm.cluster.rows_for`) are exactly ``rows``."""
    g, _, d = x.shape
    return rows * g * ((6 + gram_terms(d)) * k + 4 * d) * x.element_size()


def problem(x, m, c0, tau, *, rows, max_iters=5, tol=None, grad_tol=1e-4, grad_terms=0) -> Problem:
    tol = torch.tensor(0.0, dtype=x.dtype) if tol is None else tol
    return Problem(x, m, c0.shape[1], tau, tol, max_iters, grad_tol, budget(x, c0.shape[1], rows), grad_terms=grad_terms)


def kernels(backend: str | None, dtype: torch.dtype = torch.float32):
    return select("cpu", dtype, backend)


def dkm(x, m, c0, tau, *, rows, max_iters, tol, grad_tol=1e-4, grad_terms=0) -> tuple[Tensor, Tensor]:
    """The dense op: ``(A c*, c*)``, differentiable into ``x``."""
    p = problem(x, m, c0, tau, rows=rows, max_iters=max_iters, tol=tol, grad_tol=grad_tol, grad_terms=grad_terms)
    attention = DenseAttention(p)
    return run(x, attention, c0)


def dkm_sparse(
    x, m, c0, tau, *, top, rows, max_iters, tol, grad_tol=1e-4, ranked=None, backend=None, grad_terms=0
) -> tuple[Tensor, Tensor, Tensor]:
    """The sparse op: ``(A~ c*, c*, dropped-mass bound)``."""
    p = problem(x, m, c0, tau, rows=rows, max_iters=max_iters, tol=tol, grad_tol=grad_tol, grad_terms=grad_terms)
    attention = SparseAttention(p, top, kernels(backend, x.dtype), ranked)
    w, c = run(x, attention, c0)
    return w, c, attention.dropped


def sparse_iterate(x, m, c0, tau, max_iters, tol, rows, top, backend=None) -> tuple[Tensor, SparseAttention]:
    """The sparse iterations alone: the centroids and the attention, its selection still held."""
    attention = SparseAttention(problem(x, m, c0, tau, rows=rows, max_iters=max_iters, tol=tol), top, kernels(backend, x.dtype))
    c, _ = engine.iterate(attention, c0)
    return c, attention


def dense_iterate(x, m, c0, tau, max_iters, tol, rows) -> Tensor:
    return engine.iterate(DenseAttention(problem(x, m, c0, tau, rows=rows, max_iters=max_iters, tol=tol)), c0)[0]


def data(x, m, k, rows, backend=None) -> Data:
    return Data.of(x, m, k, budget(x, k, rows), kernels(backend, x.dtype))


def dkm_unrolled(x: Tensor, m: Tensor | None, c0: Tensor, tau: Tensor, iters: int) -> tuple[Tensor, Tensor]:
    """Reference: the same computation with plain autograd through every iteration (memory grows with ``iters``)."""
    c = c0.detach()
    weights = torch.ones_like(x[..., 0]) if m is None else m
    for _ in range(iters):
        a = torch.softmax(-torch.cdist(x, c).pow(2) / tau.view(-1, 1, 1), dim=-1)
        den = torch.bmm(weights.unsqueeze(1), a).squeeze(1)
        num = torch.bmm(a.transpose(1, 2), x * weights.unsqueeze(-1))
        c = num / den.unsqueeze(-1)
    a = torch.softmax(-torch.cdist(x, c).pow(2) / tau.view(-1, 1, 1), dim=-1)
    return torch.bmm(a, c), c

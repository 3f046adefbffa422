"""Several small layers' DKM steps as one op.

A DKM step of a small layer costs a few milliseconds whatever its size: the
passes are many small tensor ops, each with a fixed dispatch cost, and the
ranking, margin, solve and adjoint pass run once per layer.  Layers that share
the attention's shape (bits, dim, path, stopping rule) can share one
:class:`.Problem` instead: each layer's groups become groups of the problem
(shorter layers padded with zero-multiplicity rows), ``members`` says which
layer each group belongs to, and the engine applies the stopping rules per
member (:func:`.engine.iterate`, :func:`.engine.backward`), so every layer
iterates, solves and stops as it would alone.  The results match the layer's
own step to float rounding (padding changes the order of some sums, and the
margin's median samples the padded rows differently); block scales and
partial vectors are applied per layer, before and after.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from ..config import LayerConfig
from ..kernels.ranking import rank_vectors
from .clusterer import SoftResult, WeightClusterer
from .dense import DenseAttention
from .engine import Attention, run
from .hard import median_picks
from .plan import Plan
from .problem import Problem, rows_for
from .sparse import SparseAttention
from .temperature import margin
from .unique import StackedDistinct, UniqueAttention

#: Layers with at most this many weights share steps (``prepare``'s default ``batch_numel``).
BATCH_NUMEL = 65536


def batch_key(config: LayerConfig) -> tuple | None:
    """Layers whose keys are equal may share a step (with equal weight dtype and device); ``None``: never.

    Temperature, LUT groups and block scales may differ between members; the
    attention's shape and the stopping rules may not.
    """
    if config.shard_attention:
        return None
    return (config.bits, config.dim, config.cluster_dtype, config.top_m, config.max_iters, config.tol, config.chunk_mb,
            config.terms)  # fmt: skip


def soft_together(
    clusterers: list[WeightClusterer], weights: list[Tensor], centroids: list[Tensor]
) -> list[SoftResult]:
    """Each layer's :meth:`.WeightClusterer.soft` result, from one run of the engine.

    The layers must have equal :func:`batch_key` and weights of one dtype on one device.
    """
    found = [cl.normalised(w) for cl, w in zip(clusterers, weights)]
    plans = [cl.plan(n) for cl, (n, _, _) in zip(clusterers, found)]
    if len({(p.path, p.compute, p.cluster_dtype, p.top) for p in plans}) != 1 or plans[0].path == "sharded":
        raise ValueError(
            f"soft_together: the layers' plans differ: {[(c.name, p.path) for c, p in zip(clusterers, plans)]}"
        )
    normalised = [n for n, _, _ in found]
    c0 = [c.detach().to(plans[0].compute) for c in centroids]
    if plans[0].path == "unique":
        results = _unique(clusterers, normalised, c0, plans[0])
    else:
        results = _vectors(clusterers, normalised, c0, plans)
    out = []
    for cl, plan, (_, scale, offset), result in zip(clusterers, plans, found, results):
        weight = result.weight if cl.scales is None else cl.scales.apply(result.weight, scale, offset, plan.kernels)
        out.append(SoftResult(weight, result.centroids))
    return out


def _stack(parts: list[Tensor]) -> Tensor:
    """``(G_i, n_i, ...)`` tensors as one ``(sum G_i, max n_i, ...)``, zero-padded (differentiably)."""
    n = max(p.shape[1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, 0) * (p.dim() - 2) + (0, n - p.shape[1])) for p in parts])


def _problem(
    clusterers: list[WeightClusterer], x: Tensor, m: Tensor, scale: Tensor, plan: Plan, groups: list[int]
) -> Problem:
    cfg = clusterers[0].config  # (every member's tol is the same: it is in the batch key)
    taus = tuple(cl.config.tau for cl in clusterers)
    tau = _per_group(taus, tuple(groups), scale.dtype, scale.device) * scale
    members = _per_group(tuple(range(len(groups))), tuple(groups), torch.int64, x.device)
    return Problem(x, m, cfg.k, tau, cfg.tol * scale.sqrt(), cfg.max_iters, cfg.tol, plan.budget, members, cfg.terms)


@functools.lru_cache(maxsize=64)
def _per_group(values: tuple, groups: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Each member's value repeated over its groups (the same every step: made once, read-only)."""
    return torch.tensor([v for v, g in zip(values, groups) for _ in range(g)], dtype=dtype, device=device)


def _rows(plan: Plan, x: Tensor, k: int) -> int:
    return rows_for(plan.budget, x.shape[0], k, x.shape[2], x.element_size())


def _vectors(
    clusterers: list[WeightClusterer], weights: list[Tensor], c0: list[Tensor], plans: list[Plan]
) -> list[SoftResult]:
    """The exact paths (dense, sparse): the layers' vectors stacked as groups."""
    vectors = []
    for cl, w, plan in zip(clusterers, weights, plans):
        cl.check_finite(w, plan)
        x, m = cl.vectors(w, plan)
        vectors.append((x, torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if m is None else m))
    groups = [x.shape[0] for x, _ in vectors]
    x, m, c = _stack([x for x, _ in vectors]), _stack([m for _, m in vectors]), torch.cat(c0)
    plan, k = plans[0], clusterers[0].config.k
    picks = median_picks([x.shape[1] for x, _ in vectors], groups, x.device)
    attention: Attention
    if plan.path == "sparse":
        assert plan.top is not None
        ranked = rank_vectors(x.detach(), c, plan.kernels.nearest_two)
        c, scale = margin(x, m, c, _rows(plan, x, k), ranked.nearest_two(), picks)
        attention = SparseAttention(
            _problem(clusterers, x, m, scale, plan, groups), plan.top, plan.kernels, ranked
        )
    else:
        c, scale = margin(x, m, c, _rows(plan, x, k), picks=picks)
        attention = DenseAttention(_problem(clusterers, x, m, scale, plan, groups))
    w, c = run(x, attention, c)
    out = []
    for cl, weight, (xi, _), wi, ci, tau in zip(
        clusterers, weights, vectors, w.split(groups), c.split(groups), attention.problem.tau.split(groups)
    ):
        out.append(SoftResult(cl.finish(xi, wi[:, : xi.shape[1]], ci, tau, weight), ci.detach()))
    return out


def _unique(clusterers: list[WeightClusterer], weights: list[Tensor], c0: list[Tensor], plan: Plan) -> list[SoftResult]:
    """The uniquified path: the layers' distinct 16-bit values stacked as groups."""
    assert plan.cluster_dtype is not None
    parts = [cl.uniquify(w, plan.cluster_dtype, cl.plan(w)) for cl, w in zip(clusterers, weights)]
    stacked = StackedDistinct(parts, [w.numel() for w in weights])
    groups = stacked.groups
    picks = median_picks([p.values.shape[1] for p in parts], groups, stacked.values.device)
    rows = _rows(plan, stacked.values, clusterers[0].config.k)
    c, scale = margin(stacked.values, stacked.counts, torch.cat(c0), rows, picks=picks)
    problem = _problem(clusterers, stacked.values, stacked.counts, scale, plan, groups)
    source = torch.cat([w.reshape(-1) for w in weights])
    importance = None
    if any(cl.importance is not None for cl in clusterers):  # (a layer without: every weight weighs 1)
        shares = [cl.weight_importance(w.device) for cl, w in zip(clusterers, weights)]
        importance = torch.cat([w.new_ones(w.numel()) if s is None else s.to(w.dtype) for s, w in zip(shares, weights)])
    out, c = run(source, UniqueAttention(problem, stacked, source.shape, weights[0].dtype, importance), c)
    pieces = out.split([w.numel() for w in weights])
    return [SoftResult(p.view(w.shape), ci.detach()) for p, w, ci in zip(pieces, weights, c.split(groups))]

"""DKM for one weight tensor: the thin front of the engine (init, soft, assign, snap).

:class:`WeightClusterer` is what the training parametrization, the post-training
k-means baseline, ``finalize`` and ``report`` all call, so they agree on every
detail (layout, padding, temperature, nearest-centroid rule).  It holds the
layer's :class:`.Plan` (made once per weight dtype and device), turns the weight
into a :class:`.Problem` and runs the plan's attention variant through
:func:`.engine.run`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ..config import LayerConfig
from ..errors import TorchdkmError
from ..kernels.ranking import rank_vectors
from .dense import DenseAttention, Shard, ShardedAttention
from .engine import Attention, run
from .hard import nearest
from .init import init_centroids_many
from .layout import Layout
from .plan import Plan, make_plan
from .problem import Problem
from .scales import BlockScales
from .sparse import SparseAttention
from .temperature import margin
from .unique import Distinct, UniqueAttention, distinct

_FP16_MAX = 65504.0
#: Weights may reach this fraction of the square root of the compute dtype's largest value
#: (1.8e15 in float32): squared distances and their sums over many vectors stay finite.
MAGNITUDE_MARGIN = 1e-4
#: The least pull a weight keeps under an importance weighting, relative to its group's mean (a value whose
#: weights all had zero importance would otherwise count as padding and lose its centroid's pull entirely).
IMPORTANCE_FLOOR = 1e-3
#: Up to this many scalars the 1-D optimum is found on the exact values; above, on
#: their distinct 16-bit roundings (then polished by Lloyd on the exact values).
DP_EXACT_LIMIT = 65536


@dataclass
class HardResult:
    index: Tensor  # (G, n) nearest-centroid indices
    weight: Tensor  # the snapped weight, in the weight's dtype (block scales applied)
    scales: Tensor | None  # float16 values of the block scales (None without scale_block)
    offsets: Tensor | None


@dataclass
class SoftResult:
    weight: Tensor  # soft-clustered weight, same shape and dtype as the input
    centroids: Tensor  # converged centroids (G, k, d), detached


class WeightClusterer:
    """Everything needed to cluster one named weight with one :class:`LayerConfig`.

    ``backend``: the kernels (``"native"``, ``"torch"``, or ``None`` for the native
    loops where they are available; see :func:`torchdkm.kernels.select`).
    """

    def __init__(
        self, name: str, config: LayerConfig, shape: torch.Size | tuple[int, ...], backend: str | None = None
    ):
        self.name = name
        self.config = config
        self.backend = backend
        self.layout = Layout.of(shape, config.dim, config.group_size)
        if min(self.layout.real_counts()) < config.dim:
            raise TorchdkmError(
                f"layer {name!r}: a group holds {min(self.layout.real_counts())} weights, "
                f"fewer than dim={config.dim}; use a larger group_size or a smaller dim"
            )
        self._plans: dict[tuple, Plan] = {}
        #: Per-block normalisation (``config.scale_block``): DKM then clusters ``(W - offset) / scale``.
        self.scales = BlockScales.of(shape, config.scale_block, config.scale_offset)
        #: ``(G, n)`` per-vector weights of the centroid means (:meth:`weigh`), or None: every vector alike.
        self.importance: Tensor | None = None
        #: Scalars: the same in the weight's own order, ``(numel,)``: made once by :meth:`weigh`, read every step.
        self._per_weight: Tensor | None = None

    @torch.no_grad()
    def weigh(self, importance: Tensor | None, weight: Tensor) -> None:
        """Weigh each weight's pull on its centroid by ``importance`` (``weight``'s shape, e.g. the diagonal Fisher).

        Every centroid becomes the importance-weighted mean of its soft cluster, in the initial k-means and in
        every DKM step (multiplicities of the :class:`.Problem`, so every attention variant and the shared
        backward take it), as SqueezeLLM weighs its post-training k-means: the weights the loss is sensitive
        to are the ones the LUT should reproduce.  Block-normalised weights weigh ``importance x scale**2`` (an
        error ``e`` of a normalised weight is ``scale x e`` in the weight), the scales being those of
        ``weight``.  A vector weighs the mean of its values' importance.  Normalised to mean 1 per group and
        floored at :data:`IMPORTANCE_FLOOR`, so the temperature and stopping rules keep their scale.
        """
        if importance is None:
            self.importance = self._per_weight = None
            return
        values = importance.detach().to(torch.float32).reshape(weight.shape)
        if self.scales is not None:
            scale = self.normalised(weight.detach())[1].to(torch.float32)
            per_weight = scale.repeat_interleave(self.scales.block, 1)[:, : self.scales.row_len]
            values = values * per_weight.reshape(weight.shape).square()
        vectors = self.layout.to_vectors(values).mean(-1)
        real = self.layout.multiplicity(vectors.dtype, vectors.device)
        real = torch.ones_like(vectors) if real is None else real
        mean = (vectors * real).sum(1, keepdim=True) / real.sum(1, keepdim=True).clamp_min(1)
        vectors = torch.where(mean > 0, vectors / mean.clamp_min(1e-30), torch.ones_like(vectors))
        self.importance = vectors.clamp_min(IMPORTANCE_FLOOR) * real
        if self.config.dim == 1:  # (read by the uniquified path, which clusters scalars only)
            self._per_weight = self.layout.from_vectors(self.importance.unsqueeze(-1)).reshape(-1)

    def weight_importance(self, device: torch.device) -> Tensor | None:
        """``(numel,)``: each scalar weight's own weighing (:attr:`importance` in the weight's order, what the
        uniquified path reads), or None: no importance, or vectors (their paths read :attr:`importance`)."""
        if self._per_weight is not None and self._per_weight.device != device:
            self._per_weight = self._per_weight.to(device)  # (moved once, with the model)
        return self._per_weight

    def plan(self, weight: Tensor) -> Plan:
        """The step plan for this weight's dtype and device (made once for each)."""
        shard = Shard.current() if self.config.shard_attention else None
        key = (weight.dtype, weight.device, shard)
        found = self._plans.get(key)
        if found is None:
            found = self._plans[key] = make_plan(self.config, self.layout, weight.dtype, weight.device, shard, self.backend)
        return found

    # -- checks ---------------------------------------------------------------
    def check_finite(self, weight: Tensor, plan: Plan) -> None:
        """Finite, and small enough that squared distances stay finite in the compute dtype (one pass)."""
        low, high = (float(v) for v in torch.aminmax(weight.detach())) if weight.numel() else (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = int((~torch.isfinite(weight)).sum())
            raise TorchdkmError(f"layer {self.name!r}: weight has {bad} NaN/Inf values; DKM needs finite weights")
        self.check_magnitude(max(-low, high), plan.compute)

    @staticmethod
    def magnitude_limit(dtype: torch.dtype) -> float:
        """The largest weight magnitude whose squared distances stay finite in ``dtype``."""
        return math.sqrt(torch.finfo(dtype).max) * MAGNITUDE_MARGIN

    def check_magnitude(self, peak: float, dtype: torch.dtype) -> None:
        limit = self.magnitude_limit(dtype)
        if peak > limit:
            raise TorchdkmError(
                f"layer {self.name!r}: weight magnitude {peak:.3g} exceeds {limit:.3g}, beyond which squared "
                f"distances overflow {dtype}; rescale the layer or train it in float64"
            )

    def uniquify(self, weight: Tensor, dtype: torch.dtype, plan: Plan) -> Distinct:
        found = distinct(weight.detach(), self.layout, dtype, plan.compute, plan.kernels)
        if not bool(torch.isfinite(found.values).all()):
            overflow = dtype == torch.float16 and weight.dtype not in (torch.float16, torch.bfloat16)
            if overflow and self.config.cluster_dtype == "auto" and bool(torch.isfinite(weight).all()):
                return self.uniquify(weight, torch.bfloat16, plan)  # beyond float16's range: bfloat16's is float32's
            raise TorchdkmError(
                f"layer {self.name!r}: weight has NaN/Inf values, or values beyond the range of "
                f"cluster_dtype {dtype}; use finite weights or cluster_dtype='bfloat16'/'exact'"
            )
        if found.values.numel():
            self.check_magnitude(float(found.values.abs().amax()), found.values.dtype)
        if self.importance is not None:  # each distinct value weighs the sum of its weights' importance
            found = replace(found, counts=found.sum_per_slot(self.weight_importance(weight.device), found.counts.dtype))
        return found

    def vectors(self, weight: Tensor, plan: Plan) -> tuple[Tensor, Tensor | None]:
        x = self.layout.to_vectors(weight.to(plan.compute))
        if self.importance is not None:
            return x, self.importance.to(x.dtype).to(x.device)
        return x, self.layout.multiplicity(x.dtype, x.device)

    def thresholds(self, scale: Tensor) -> tuple[Tensor, Tensor]:
        """The absolute temperature and stopping move per group, from the margin ``scale``."""
        return self.config.tau * scale, self.config.tol * scale.sqrt()

    def _problem(self, x: Tensor, m: Tensor | None, scale: Tensor, plan: Plan) -> Problem:
        cfg = self.config
        tau, tol = self.thresholds(scale)
        return Problem(x, m, cfg.k, tau, tol, cfg.max_iters, cfg.tol, plan.budget, grad_terms=cfg.terms)

    def normalised(self, weight: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(what DKM clusters, scales, offsets)``: the weight itself, or its per-block normalisation.

        The scales and offsets are float16 values (what the file stores); the
        normalisation is differentiable.  The weight's finiteness and magnitude
        are checked on the blocks' bounds (no pass of their own).
        """
        if self.scales is None:
            return weight, None, None
        plan = self.plan(weight)
        high, low = self.scales.bounds(weight)
        peak_high, peak_low = (float(high.amax()), float(low.amin())) if high.numel() else (0.0, 0.0)
        if not (math.isfinite(peak_high) and math.isfinite(peak_low)):
            self.check_finite(weight, plan)  # (raises, counting them)
        self.check_magnitude(max(-peak_low, peak_high), plan.compute)
        normalised, scale, offset = self.scales.normalise(weight, plan.kernels, (high, low))
        if not bool(torch.isfinite(scale).all()) or (offset is not None and not bool(torch.isfinite(offset).all())):
            raise TorchdkmError(
                f"layer {self.name!r}: a block's scale exceeds float16's range (65504); the weights reach "
                f"{float(weight.detach().abs().amax()):.3g}: rescale the layer or cluster it without scale_block"
            )
        return normalised, scale, offset

    def temperature(self, weight: Tensor, centroids: Tensor) -> Tensor:
        """The absolute softmax temperature per group, ``tau x margin``, for these centroids."""
        weight = self.normalised(weight.detach())[0]
        plan = self.plan(weight)
        x, m = self.vectors(weight, plan)
        _, scale = margin(x, m, centroids.to(x.dtype), plan.rows)
        return self.config.tau * scale

    # -- the operations -------------------------------------------------------
    def init(self, weight: Tensor) -> Tensor:
        """k-means initial centroids ``(G, k, dim)`` in the compute dtype."""
        return self.init_many(weight, (self.config.bits,))[self.config.bits]

    def init_many(self, weight: Tensor, bits: Sequence[int], *, polish: bool = True) -> dict[int, Tensor]:
        """:meth:`init` for several bit widths of this layout, by bits (what a size planner weighs).

        One normalisation and, for scalars, one dynamic programme serve every
        width.  ``polish=False`` skips the Lloyd steps that move the scalar
        optimum (found on the 16-bit-rounded weights) to the exact ones: a
        relative change of about 2**-11, nothing a planner's ranking sees.
        ``bits`` are at most this layer's (its plan's chunks are sized for them).
        """
        if not bits or max(bits) > self.config.bits or min(bits) < 1:
            raise ValueError(f"init_many: bits must lie in 1..{self.config.bits}, got {list(bits)}")
        weight = self.normalised(weight.detach())[0]
        plan = self.plan(weight)
        self.check_finite(weight, plan)
        x, m = self.vectors(weight, plan)
        pair = None
        if self.config.dim == 1:
            dtype = plan.cluster_dtype
            if dtype is None and self.layout.numel > DP_EXACT_LIMIT:
                dtype = torch.float16 if float(weight.abs().max()) <= _FP16_MAX else torch.bfloat16
            if dtype is not None:
                found = self.uniquify(weight, dtype, plan)
                pair = (found.values[..., 0], found.counts)
        iters = None if polish or self.config.dim > 1 else 0
        found = init_centroids_many(x, m, [1 << b for b in bits], plan.rows, distinct=pair, lloyd_iters=iters)
        return {b: found[1 << b] for b in bits}

    def soft(self, weight: Tensor, centroids: Tensor) -> SoftResult:
        """One DKM step: the soft-clustered weight (differentiable) and the new centroids."""
        if self.scales is None:
            return self._soft(weight, centroids)
        normalised, scale, offset = self.normalised(weight)
        result = self._soft(normalised, centroids)
        weight = self.scales.apply(result.weight, scale, offset, self.plan(result.weight).kernels)
        return SoftResult(weight, result.centroids)

    def _soft(self, weight: Tensor, centroids: Tensor) -> SoftResult:
        plan = self.plan(weight)
        c0 = centroids.detach().to(plan.compute)
        if plan.path == "unique":
            assert plan.cluster_dtype is not None
            found = self.uniquify(weight, plan.cluster_dtype, plan)
            c0, scale = margin(found.values, found.counts, c0, plan.rows)
            problem = self._problem(found.values, found.counts, scale, plan)
            attention = UniqueAttention(problem, found, weight.shape, weight.dtype, self.weight_importance(weight.device))
            out, c = run(weight, attention, c0)
            return SoftResult(out, c.detach())
        self.check_finite(weight, plan)
        x, m = self.vectors(weight, plan)
        attention: Attention
        if plan.path == "sparse":  # the sparse attention ranks the centroids for every vector: the margin reads it too
            assert plan.top is not None
            ranked = rank_vectors(x.detach(), c0, plan.kernels.nearest_two)
            c0, scale = margin(x, m, c0, plan.rows, ranked.nearest_two())
            # (re-seeded centroids: the sparse attention ranks the vectors again)
            attention = SparseAttention(self._problem(x, m, scale, plan), plan.top, plan.kernels, ranked)
        else:
            c0, scale = margin(x, m, c0, plan.rows)
            problem = self._problem(x, m, scale, plan)
            attention = DenseAttention(problem) if plan.shard is None else ShardedAttention(problem, plan.shard)
        w, c = run(x, attention, c0)
        return SoftResult(self.finish(x, w, c, attention.problem.tau, weight), c.detach())

    def finish(self, x: Tensor, w: Tensor, c: Tensor, tau: Tensor, weight: Tensor) -> Tensor:
        """The soft weight from the op's output vectors ``w``: partial vectors attend on their real values only."""
        partial = self.layout.partial_mask(x.device)
        if partial is not None:
            groups, index, mask = partial
            weights = torch.softmax(-self._masked_dist(x[groups, index], c[groups], mask) / tau[groups, None], -1)
            w = w.index_put((groups, index), torch.bmm(weights.unsqueeze(1), c[groups]).squeeze(1))
        return self.layout.from_vectors(w).to(weight.dtype)

    def assign(self, weight: Tensor, centroids: Tensor) -> Tensor:
        """Nearest-centroid index ``(G, n)`` of every (normalised) vector (padding vectors get 0)."""
        return self._assign(self.normalised(weight.detach())[0], centroids)

    def _assign(self, weight: Tensor, centroids: Tensor) -> Tensor:
        plan = self.plan(weight)
        self.check_finite(weight, plan)
        x, _ = self.vectors(weight, plan)
        c = centroids.to(x.dtype)
        index, _ = nearest(x, c, plan.rows)
        partial = self.layout.partial_mask(x.device)
        if partial is not None:
            groups, where, mask = partial
            index[groups, where] = self._masked_dist(x[groups, where], c[groups], mask).argmin(-1)
        if self.layout.padded:
            real = self.layout.multiplicity(x.dtype, x.device)
            if partial is not None:
                real[partial[0], partial[1]] = 1
            index = torch.where(real > 0, index, torch.zeros_like(index))
        return index

    def snap(self, weight: Tensor, centroids: Tensor) -> Tensor:
        """The hard-clustered weight: every vector replaced by its nearest centroid (then scaled back)."""
        return self.hard(weight, centroids).weight

    def hard(self, weight: Tensor, centroids: Tensor) -> HardResult:
        """Indices, snapped weight and block scales from one normalisation (what ``finalize`` stores)."""
        normalised, scale, offset = self.normalised(weight.detach())
        index = self._assign(normalised, centroids)
        snapped = self.layout.decode(index, centroids.to(weight.dtype))
        if self.scales is not None:
            snapped = self.scales.apply(snapped, scale, offset, self.plan(snapped).kernels)
        return HardResult(index, snapped, scale, offset)

    @staticmethod
    def _masked_dist(x: Tensor, c: Tensor, mask: Tensor) -> Tensor:
        """Squared distance over the real (unpadded) values: x (P, d), c (P, k, d)."""
        return (((x.unsqueeze(1) - c) ** 2) * mask.unsqueeze(1)).sum(-1)

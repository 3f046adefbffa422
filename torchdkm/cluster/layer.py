"""DKM for one weight tensor: layout, path choice (uniquified or exact), tau scale, snapping.

:class:`WeightClusterer` is what the training parametrization, the post-training
k-means baseline, ``finalize`` and ``report`` all call, so they agree on every
detail (layout, padding, temperature, nearest-centroid rule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import LayerConfig
from ..errors import TorchdkmError
from . import op, sparse
from .hard import clipped_mean, nearest, nearest_two, reseed_empty, squared_norms
from .init import init_centroids
from .layout import Layout
from .unique import Distinct, UniqueDKMFunction, distinct

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_FP16_MAX = 65504.0
#: The temperature's unit never drops below this fraction of the weights' mean square,
#: so a layer with duplicate centroids still gets a finite temperature.
MARGIN_FLOOR = 1e-6
#: Weights may reach this fraction of the square root of the compute dtype's largest value
#: (1.8e15 in float32): squared distances and their sums over many vectors stay finite.
MAGNITUDE_MARGIN = 1e-4
#: Up to this many scalars the 1-D optimum is found on the exact values; above, on
#: their distinct 16-bit roundings (then polished by Lloyd on the exact values).
DP_EXACT_LIMIT = 65536


@dataclass
class SoftResult:
    weight: Tensor  # soft-clustered weight, same shape and dtype as the input
    centroids: Tensor  # converged centroids (G, k, d), detached


class WeightClusterer:
    """Everything needed to cluster one named weight with one :class:`LayerConfig`."""

    def __init__(self, name: str, config: LayerConfig, shape: torch.Size | tuple[int, ...]):
        self.name = name
        self.config = config
        self.layout = Layout.of(shape, config.dim, config.group_size)
        if min(self.layout.real_counts()) < config.dim:
            raise TorchdkmError(
                f"layer {name!r}: a group holds {min(self.layout.real_counts())} weights, "
                f"fewer than dim={config.dim}; use a larger group_size or a smaller dim"
            )

    # -- helpers ------------------------------------------------------------
    def compute_dtype(self, weight: Tensor) -> torch.dtype:
        return torch.float64 if weight.dtype == torch.float64 else torch.float32

    def unique_dtype(self, weight: Tensor) -> torch.dtype | None:
        """The 16-bit dtype the weights are uniquified in, or ``None`` for the exact path."""
        mode = self.config.cluster_dtype
        if self.config.dim != 1 or mode == "exact":
            return None
        if weight.dtype in (torch.float16, torch.bfloat16):
            return weight.dtype if mode == "auto" else _DTYPES[mode]
        if mode == "auto":  # float16 unless the weights overflow it (see _distinct)
            return None if weight.dtype == torch.float64 else torch.float16
        return _DTYPES[mode]

    def check_finite(self, weight: Tensor) -> None:
        """Finite, and small enough that squared distances stay finite in the compute dtype (one pass)."""
        low, high = (float(v) for v in torch.aminmax(weight.detach())) if weight.numel() else (0.0, 0.0)
        peak = max(-low, high)
        if not (math.isfinite(low) and math.isfinite(high)):
            bad = int((~torch.isfinite(weight)).sum())
            raise TorchdkmError(f"layer {self.name!r}: weight has {bad} NaN/Inf values; DKM needs finite weights")
        self.check_magnitude(peak, self.compute_dtype(weight))

    def check_magnitude(self, peak: float, dtype: torch.dtype) -> None:
        limit = math.sqrt(torch.finfo(dtype).max) * MAGNITUDE_MARGIN
        if peak > limit:
            raise TorchdkmError(
                f"layer {self.name!r}: weight magnitude {peak:.3g} exceeds {limit:.3g}, beyond which squared "
                f"distances overflow {dtype}; rescale the layer or train it in float64"
            )

    def rows(self, itemsize: int, groups: int | None = None) -> int:
        return op.rows_per_chunk(
            groups or self.layout.groups, self.config.k, self.config.dim, itemsize, self.config.chunk_mb * 2**20
        )

    def _distinct(self, weight: Tensor, dtype: torch.dtype) -> Distinct:
        found = distinct(weight.detach(), self.layout, dtype, self.compute_dtype(weight))
        if not bool(torch.isfinite(found.values).all()):
            overflow = dtype == torch.float16 and weight.dtype not in (torch.float16, torch.bfloat16)
            if overflow and self.config.cluster_dtype == "auto" and bool(torch.isfinite(weight).all()):
                return self._distinct(weight, torch.bfloat16)  # beyond float16's range: bfloat16's is float32's
            raise TorchdkmError(
                f"layer {self.name!r}: weight has NaN/Inf values, or values beyond the range of "
                f"cluster_dtype {dtype}; use finite weights or cluster_dtype='bfloat16'/'exact'"
            )
        if found.values.numel():
            self.check_magnitude(float(found.values.abs().amax()), found.values.dtype)
        return found

    def _vectors(self, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        x = self.layout.to_vectors(weight.to(self.compute_dtype(weight)))
        return x, self.layout.multiplicity(x.dtype, x.device)

    def _scale(
        self, x: Tensor, m: Tensor | None, c: Tensor, rows: int, two: tuple[Tensor, Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Re-seed empty centroids; return them and the layer's margin (the unit of tau).

        The margin is the mean, over weight vectors, of the squared distance to
        the second-nearest centroid minus that to the nearest: the logit gap a
        softmax at temperature 1 would see.  Measuring ``tau`` in it gives the
        same sharpness at any weight scale, bit width and vector length (the
        k-means distortion would not: vectors have small margins next to it).
        Margins (and squared norms, for the floor) beyond ``MARGIN_CLIP`` times
        their median count as that much, so a few outlying weights do not set
        the temperature of all the others.  ``two``: :func:`nearest_two` at
        ``c``, if already known.
        """
        with torch.no_grad():
            index, first, second = nearest_two(x, c, rows) if two is None else two
            reseeded = reseed_empty(x, m, c, index, first)
            if reseeded is not c:
                c = reseeded
                _, first, second = nearest_two(x, c, rows)
            mean_sq = clipped_mean(squared_norms(x), m)
            scale = clipped_mean(second - first, m).clamp_min(MARGIN_FLOOR * mean_sq + 1e-30)
        return c, scale

    def temperature(self, weight: Tensor, centroids: Tensor) -> Tensor:
        """The absolute softmax temperature per group, ``tau x margin``, for these centroids."""
        x, m = self._vectors(weight.detach())
        _, scale = self._scale(x, m, centroids.to(x.dtype), self.rows(x.element_size()))
        return self.config.tau * scale

    # -- the three operations ---------------------------------------------
    def init(self, weight: Tensor) -> Tensor:
        """k-means initial centroids ``(G, k, dim)`` in the compute dtype."""
        weight = weight.detach()
        self.check_finite(weight)
        x, m = self._vectors(weight)
        pair = None
        if self.config.dim == 1:
            dtype = self.unique_dtype(weight)
            if dtype is None and self.layout.numel > DP_EXACT_LIMIT:
                dtype = torch.float16 if float(weight.abs().max()) <= _FP16_MAX else torch.bfloat16
            if dtype is not None:
                found = self._distinct(weight, dtype)
                pair = (found.values[..., 0], found.counts)
        return init_centroids(x, m, self.config.k, self.rows(x.element_size()), distinct=pair)

    def soft(self, weight: Tensor, centroids: Tensor) -> SoftResult:
        """One DKM step: the soft-clustered weight (differentiable) and the new centroids."""
        cfg = self.config
        c0 = centroids.detach().to(self.compute_dtype(weight))
        dtype = self.unique_dtype(weight)
        if dtype is not None:
            found = self._distinct(weight, dtype)
            rows = self.rows(found.values.element_size(), found.values.shape[0])
            c0, scale = self._scale(found.values, found.counts, c0, rows)
            tau, tol = cfg.tau * scale, cfg.tol * scale.sqrt()
            out, c = UniqueDKMFunction.apply(weight, found, c0, tau, cfg.max_iters, tol, rows, cfg.tol)
            return SoftResult(out, c.detach())
        self.check_finite(weight)
        x, m = self._vectors(weight)
        rows = self.rows(x.element_size())
        shard = _shard() if cfg.shard_attention else None
        top = cfg.top_m if shard is None and cfg.top_m is not None and cfg.top_m < cfg.k else None
        ranked = None
        if top is not None:  # the sparse op ranks the centroids for every vector: the temperature reads it too
            ranked = sparse.rank(x.detach(), c0)
            c0, scale = self._scale(x, m, c0, rows, sparse.nearest_two(ranked))
            # (re-seeded centroids: dkm_sparse ranks the vectors again)
        else:
            c0, scale = self._scale(x, m, c0, rows)
        tau, tol = cfg.tau * scale, cfg.tol * scale.sqrt()
        if shard is not None:
            with op.sharded(shard):
                w, c = op.dkm(x, m, c0, tau, max_iters=cfg.max_iters, tol=tol, rows=rows, grad_tol=cfg.tol)
        elif top is not None:
            w, c, _ = sparse.dkm_sparse(
                x, m, c0, tau, top=top, max_iters=cfg.max_iters, tol=tol, rows=rows, grad_tol=cfg.tol, ranked=ranked
            )
        else:
            w, c = op.dkm(x, m, c0, tau, max_iters=cfg.max_iters, tol=tol, rows=rows, grad_tol=cfg.tol)
        partial = self.layout.partial_mask(x.device)
        if partial is not None:
            groups, index, mask = partial
            weights = torch.softmax(-self._masked_dist(x[groups, index], c[groups], mask) / tau[groups, None], -1)
            w = w.index_put((groups, index), torch.bmm(weights.unsqueeze(1), c[groups]).squeeze(1))
        return SoftResult(self.layout.from_vectors(w).to(weight.dtype), c.detach())

    def assign(self, weight: Tensor, centroids: Tensor) -> Tensor:
        """Nearest-centroid index ``(G, n)`` of every vector (padding vectors get 0)."""
        weight = weight.detach()
        self.check_finite(weight)
        x, _ = self._vectors(weight)
        c = centroids.to(x.dtype)
        index, _ = nearest(x, c, self.rows(x.element_size()))
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
        """The hard-clustered weight: every vector replaced by its nearest centroid."""
        lut = centroids.to(weight.dtype)
        return self.layout.decode(self.assign(weight, centroids), lut)

    @staticmethod
    def _masked_dist(x: Tensor, c: Tensor, mask: Tensor) -> Tensor:
        """Squared distance over the real (unpadded) values: x (P, d), c (P, k, d)."""
        return (((x.unsqueeze(1) - c) ** 2) * mask.unsqueeze(1)).sum(-1)


def _shard() -> op.Shard | None:
    """This rank's share of the attention rows, when running under ``torch.distributed``."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return None
    return op.Shard(dist.get_rank(), dist.get_world_size())

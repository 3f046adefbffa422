"""The training-time weight: a ``torch.nn.utils.parametrize`` parametrization.

``prepare`` registers :class:`DKMParametrization` on each chosen weight.  The
module keeps its class (a parametrized subclass of it), its parameters (the
same ``Parameter`` objects, so an optimizer built before ``prepare`` still
works) and ``state_dict`` (the weight moves to
``parametrizations.weight.original``; the centroids are a buffer beside it).

In training mode, reading ``module.weight`` runs one DKM step from the stored
centroids and returns the soft-clustered weight ``A C``; the converged
centroids are stored for the next step.  In eval mode it returns the hard
snapped weight, which is exactly what ``finalize`` will export (centroids
refreshed on the current weights, see :meth:`DKMParametrization.export`), so
validation during training measures the model you will ship.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..cluster import WeightClusterer
from ..config import LayerConfig


class DKMParametrization(nn.Module):
    def __init__(self, name: str, config: LayerConfig, weight: Tensor):
        super().__init__()
        self.layer_name = name
        self.config = config
        self.clusterer = WeightClusterer(name, config, weight.shape)
        self.register_buffer("centroids", self.clusterer.init(weight))
        self._snapped: tuple[tuple, Tensor, Tensor] | None = None
        #: ``False`` snaps to the stored centroids as they are (post-training k-means).
        self.refresh = True

    def forward(self, weight: Tensor) -> Tensor:
        if not self.training:
            return self.export(weight)[0]
        result = self.clusterer.soft(weight, self.centroids)
        with torch.no_grad():
            self.centroids.copy_(result.centroids)
        return result.weight

    @torch.no_grad()
    def export(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The hard weight ``finalize`` exports, and the centroids it snaps to.

        The stored centroids come from the last training forward, which ran
        before the last optimizer step moved the weights; one DKM step on the
        current weights (no gradient, nothing stored) brings them up to date.
        """
        index, centroids = self.hard(weight)
        return self.clusterer.layout.decode(index, centroids.to(weight.dtype)), centroids

    @torch.no_grad()
    def hard(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The nearest-centroid indices ``(G, n)`` and the centroids of :meth:`export`.

        Cached until the weight or the centroids change, so ``finalize`` (which
        packs the indices) and ``export`` share one nearest-centroid search.
        """
        key = (weight.data_ptr(), weight._version, self.centroids._version)
        if self._snapped is None or self._snapped[0] != key:
            centroids = self.centroids
            if self.refresh:
                centroids = self.clusterer.soft(weight.detach(), centroids).centroids
            self._snapped = (key, self.clusterer.assign(weight, centroids), centroids)
        return self._snapped[1], self._snapped[2]

    def soft(self, weight: Tensor) -> Tensor:
        """The soft weight for the current centroids, without updating them."""
        return self.clusterer.soft(weight, self.centroids).weight

    def extra_repr(self) -> str:
        c = self.config
        return f"bits={c.bits}, dim={c.dim}, k={c.k}, group_size={c.group_size}, tau={c.tau}"


def dkm_parametrizations(model: nn.Module) -> list[tuple[str, nn.Module, str, DKMParametrization]]:
    """``(module name, module, parameter name, parametrization)`` for every DKM weight."""
    found = []
    for name, module in model.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        for param, plist in module.parametrizations.items():
            for p in plist:
                if isinstance(p, DKMParametrization):
                    found.append((name, module, param, p))
    return found


def original(module: nn.Module, param: str) -> Tensor:
    """The trainable tensor behind a parametrized weight."""
    return module.parametrizations[param].original

"""The DKM op, k-means initialisation and uniquification.

``dkm`` is the op on batched vectors; :class:`WeightClusterer` applies it to one
weight tensor (layout, padding, temperature, snapping).
"""

from .init import init_centroids, kmeans_pp, optimal_1d
from .layer import SoftResult, WeightClusterer
from .layout import Layout
from .op import DKMFunction, dkm, dkm_unrolled

__all__ = [
    "DKMFunction",
    "Layout",
    "SoftResult",
    "WeightClusterer",
    "dkm",
    "dkm_unrolled",
    "init_centroids",
    "kmeans_pp",
    "optimal_1d",
]

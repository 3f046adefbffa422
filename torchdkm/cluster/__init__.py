"""The clustering engine (see README.md beside this file for its picture in words).

:class:`WeightClusterer` applies DKM to one weight tensor (layout, padding,
temperature, snapping) following the layer's :class:`Plan`; the variants of the
attention (:class:`DenseAttention`, :class:`SparseAttention`,
:class:`UniqueAttention`, :class:`ShardedAttention`) implement one
:class:`Attention` contract over a :class:`Problem`, and :func:`run` applies one
of them with the shared fixed-point backward.
"""

from ..kernels.ranking import Ranking, rank_vectors
from .clusterer import SoftResult, WeightClusterer
from .dense import DenseAttention, Shard, ShardedAttention
from .engine import Attention, ClusterFunction, GramSums, run
from .init import init_centroids, kmeans_pp, optimal_1d, optimal_1d_many
from .layout import Layout
from .plan import Plan, make_plan
from .problem import Problem, rows_for
from .sparse import SparseAttention
from .unique import Distinct, UniqueAttention, distinct

__all__ = [
    "Attention",
    "ClusterFunction",
    "DenseAttention",
    "Distinct",
    "GramSums",
    "Layout",
    "Plan",
    "Problem",
    "Ranking",
    "Shard",
    "ShardedAttention",
    "SoftResult",
    "SparseAttention",
    "UniqueAttention",
    "WeightClusterer",
    "distinct",
    "init_centroids",
    "kmeans_pp",
    "make_plan",
    "optimal_1d",
    "optimal_1d_many",
    "rank_vectors",
    "rows_for",
    "run",
]

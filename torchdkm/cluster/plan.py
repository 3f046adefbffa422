"""A layer's step plan: everything derived from its config, layout, dtype and device, worked out once.

:func:`make_plan` decides which attention variant a DKM step runs, in which
dtypes, with how much memory and which kernels; :class:`.WeightClusterer` makes
one when the layer is prepared and again only if the weight's dtype or device
(or the process group) changes.  The variants then read the plan; none of them
re-reads the config.

Paths (one :class:`.engine.Attention` each):

- ``"unique"``: scalars (``dim == 1``) in a 16-bit ``cluster_dtype`` (see
  :class:`.LayerConfig`), once per distinct value (:mod:`.unique`);
- ``"sharded"``: ``shard_attention`` under ``torch.distributed`` with several
  ranks: the full attention split by rows (:mod:`.dense`; by design not top-m,
  as it is the path for layers whose attention does not fit one process);
- ``"sparse"``: ``top_m < k``: each row's nearest ``top_m`` (:mod:`.sparse`);
- ``"dense"``: the full attention (:mod:`.dense`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import LayerConfig
from ..kernels import Kernels, select
from .dense import Shard
from .layout import Layout
from .problem import rows_for

SIXTEEN_BIT = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Plan:
    path: str  # "unique", "sharded", "sparse" or "dense"
    compute: torch.dtype  # the dtype of the clustering arithmetic (float32, or float64 for float64 weights)
    cluster_dtype: torch.dtype | None  # the 16-bit dtype the "unique" path rounds the weights to
    top: int | None  # the sparse path's top-m
    budget: float  # bytes of temporaries a pass may hold at one time
    rows: int  # rows per chunk of the dense passes and the nearest-centroid searches
    kernels: Kernels
    shard: Shard | None


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def cluster_dtype(config: LayerConfig, dtype: torch.dtype) -> torch.dtype | None:
    """The 16-bit dtype weights of ``dtype`` are uniquified in, or ``None`` for the exact paths."""
    mode = config.cluster_dtype
    if config.dim != 1 or mode == "exact":
        return None
    if dtype in (torch.float16, torch.bfloat16):
        return dtype if mode == "auto" else SIXTEEN_BIT[mode]
    if mode == "auto":  # float16 unless the weights overflow it (then bfloat16: see the clusterer)
        return None if dtype == torch.float64 else torch.float16
    return SIXTEEN_BIT[mode]


def make_plan(
    config: LayerConfig,
    layout: Layout,
    dtype: torch.dtype,
    device: torch.device,
    shard: Shard | None = None,
    backend: str | None = None,
) -> Plan:
    """The plan for a weight of ``dtype`` on ``device``; ``shard``: this rank's share, if sharding applies."""
    compute = compute_dtype(dtype)
    budget = config.chunk_mb * 2**20
    rows = rows_for(budget, layout.groups, config.k, config.dim, torch.finfo(compute).bits // 8)
    kernels = select(device, dtype, backend)
    sixteen = cluster_dtype(config, dtype)
    top = config.top_m if config.top_m is not None and config.top_m < config.k else None
    if sixteen is not None:
        path, shard, top = "unique", None, None
    elif config.shard_attention and shard is not None:
        path, top = "sharded", None
    elif top is not None:
        path, shard = "sparse", None
    else:
        path, shard = "dense", None
    return Plan(path, compute, sixteen, top, budget, rows, kernels, shard)

"""Data-parallel and sharded training of a prepared model: DDP and FSDP2 (``fully_shard``).

Nothing about DKM needs a collective.  A DKM step computes the new centroids
from two inputs only: the layer's weight and its stored centroids.  Under
``DistributedDataParallel`` every rank holds the same weights (the gradients are
all-reduced before the optimizer step, which then does the same arithmetic on
every rank), so every rank runs the same deterministic computation on the same
inputs and stores bit-identical centroids.  ``broadcast_buffers=True`` (DDP's
default) also copies rank 0's buffers, centroids included, to the others
before each forward; the centroids agree without it.

Order of wrapping:

- DDP: ``prepare`` first, then wrap (``DistributedDataParallel(model)``).
  ``finalize`` the inner ``ddp.module`` after training (on any rank: they agree).
- FSDP2: ``prepare`` first, then ``fully_shard`` (per layer, then the root).
  The sharded parameter is ``parametrizations.weight.original``; FSDP2
  all-gathers it before the layer's forward, so the DKM step runs on the full
  weight, identically on every rank.  The centroids are a buffer, which FSDP2
  leaves whole (unsharded) on every rank.  To finalize, gather the full state
  with :func:`full_state_dict` (a collective: call it on every rank), load it
  into a freshly built and prepared model and ``finalize`` that.
- ``prepare`` after ``fully_shard`` does not work: the weights are then sharded
  ``DTensor`` s and the k-means initialisation cannot run on a shard
  (``aten.bincount`` has no sharding rule).  ``prepare`` refuses a ``DTensor`` weight with a
  :class:`TorchdkmError` saying so.
- FSDP1 (``FullyShardedDataParallel``) refuses CPU-only machines in torch 2.13
  ("FSDP needs a non-CPU accelerator device"), so it is not tested here.

This is what ``tests/test_distributed.py`` checks, with two processes on gloo.
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import TorchdkmError
from .nn.parametrization import dkm_parametrizations


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a ``DistributedDataParallel`` wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def centroid_buffers(model: nn.Module) -> dict[str, Tensor]:
    """``{layer name.param: centroids}`` of every DKM weight of a prepared model."""
    return {
        f"{name}.{param}" if name else param: p.centroids for name, _, param, p in dkm_parametrizations(unwrap(model))
    }


def check_centroids_in_sync(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Raise :class:`TorchdkmError` unless every rank holds bit-identical centroids.

    A collective (one ``all_gather`` per DKM weight): call it on every rank.
    """
    world = dist.get_world_size(group)
    for name, centroids in centroid_buffers(model).items():
        local = centroids.detach().contiguous()
        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local, group=group)
        mine = local.view(torch.uint8)
        for rank, other in enumerate(gathered):
            if not torch.equal(other.view(torch.uint8), mine):
                raise TorchdkmError(f"centroids of {name!r} differ between rank {dist.get_rank(group)} and rank {rank}")


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's ``state_dict`` with every sharded ``DTensor`` gathered into a plain tensor.

    For a DDP-wrapped model the keys are the inner model's.  With FSDP2 this is
    a collective: call it on every rank.  Load the result into a freshly built,
    prepared model to ``finalize`` it.
    """
    result = {}
    for key, value in unwrap(model).state_dict().items():
        if is_dtensor(value):
            value = value.full_tensor()
        result[key] = value.detach()
    return result


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a shard of a ``fully_shard`` or tensor-parallel weight).

    Looks only at already imported DTensor modules: a DTensor cannot exist
    before its module is imported, and importing it costs about a second.
    """
    for module in ("torch.distributed.tensor", "torch.distributed._tensor"):
        cls = getattr(sys.modules.get(module), "DTensor", None)
        if cls is not None and isinstance(tensor, cls):
            return True
    return False


__all__ = ["centroid_buffers", "check_centroids_in_sync", "full_state_dict", "is_dtensor", "unwrap"]

"""Small layers step together: one engine run for all of them per training forward.

A DKM step has a fixed cost of a few milliseconds per layer (small tensor ops,
the solve), which dominates small models.  ``prepare`` puts the
parametrizations of small layers with the same attention settings in one
:class:`StepBatch` (:func:`batch_layers`); the first member read in a
training forward runs the step of every member at once
(:func:`torchdkm.cluster.batch.soft_together`), stores each member's new
centroids and keeps its soft weight, and each member's read takes its own.

One step per forward, as unbatched.  A *round* (one batched step) ends when backward
passes through it or a member's weight changes; a member read again within its
round (a module called twice, a checkpointed forward recomputed) gets the soft
weight its parametrization kept (:meth:`DKMParametrization.step`).  A round
steps every member, read or not: a layer a forward skips (an unused branch)
has its centroids moved by that step as if it had been read.  Members
must hold plain tensors of one dtype on one device when the round starts
(an FSDP-sharded weight, say, is not), each DKM the only parametrization of
its weight: otherwise the batch switches itself off and every member steps
alone from then on.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from ..cluster.batch import batch_key, soft_together

if TYPE_CHECKING:
    from .parametrization import DKMParametrization


def _weight_key(weight: Tensor) -> tuple:
    return (weight.data_ptr(), weight._version)


class StepBatch:
    """The parametrizations that share their DKM steps, and the current round's results."""

    def __init__(self, members: list[tuple[DKMParametrization, nn.Module]]):
        #: each member and the ``ParametrizationList`` holding its trainable ``original``
        self.members = members
        self._index = {member: i for i, (member, _) in enumerate(members)}  # (modules hash by identity)
        self.enabled = True
        self._entries: dict[int, tuple[tuple, Tensor]] = {}  # member index -> (its step key, its soft weight)
        self._opened: list[tuple] | None = None  # the members' weight keys when the round started

    def __getstate__(self) -> dict:
        """Copies and pickles drop the round (its soft weights hold autograd graphs)."""
        state = dict(self.__dict__)
        state["_entries"], state["_opened"] = {}, None
        return state

    def soft(self, member: DKMParametrization, weight: Tensor) -> Tensor | None:
        """``member``'s soft weight from the current round (starting one if due); ``None``: step alone."""
        if not self.enabled:
            return None
        index = self._index[member]
        entry = self._entries.pop(index, None)
        if entry is not None and entry[0] == member.step_key(weight):
            return entry[1]
        originals = [plist.original for _, plist in self.members]
        keys = [_weight_key(w) for w in originals]
        if self._opened == keys:  # read again within its round
            return None
        if weight is not originals[index] or not self._compatible(originals):
            self.enabled = False
            self.end()
            return None
        self._step(originals, keys)
        entry = self._entries.pop(index)
        return entry[1]

    def _compatible(self, originals: list[Tensor]) -> bool:
        """Plain tensors of one dtype on one device, each the only parametrization of its weight."""
        first = originals[0]
        return all(len(plist) == 1 for _, plist in self.members) and all(
            type(w) in (torch.Tensor, nn.Parameter) and w.dtype == first.dtype and w.device == first.device
            for w in originals
        )

    def _step(self, originals: list[Tensor], keys: list[tuple]) -> None:
        members = [m for m, _ in self.members]
        starts = [m.start_of_step(w) for m, w in zip(members, originals)]
        results = soft_together([m.clusterer for m in members], [m.view(w) for m, w in zip(members, originals)], starts)
        self._entries = {}
        for i, (member, weight, result) in enumerate(zip(members, originals, results)):
            member.move_centroids(weight, starts[i], result.centroids)
            out = member.unview(result.weight)
            if out.requires_grad:
                out.register_hook(self._end_hook)
            self._entries[i] = (member.step_key(weight), out)
        self._opened = keys

    def _end_hook(self, grad: Tensor) -> None:
        self.end()

    def end(self) -> None:
        """Backward ran through the round (its graph is freed) or the temperature changed: the next read starts a new one."""
        self._entries, self._opened = {}, None


def batch_layers(found: list[tuple[DKMParametrization, nn.Module]], limit: int) -> list[StepBatch]:
    """Group the parametrizations of layers with at most ``limit`` weights that can share steps.

    ``found``: each parametrization with its ``ParametrizationList``.  Layers
    group by :func:`~torchdkm.cluster.batch.batch_key` and the weight's dtype and
    device; tied weights (several holders) step alone.  Every group of two or
    more becomes a :class:`StepBatch`, set as its members' ``batch``.
    """
    groups: dict[tuple, list] = defaultdict(list)
    for member, plist in found:
        weight = plist.original
        key = batch_key(member.config)
        if key is None or weight.numel() > limit or len(member.holders) > 1:
            continue
        groups[(key, weight.dtype, weight.device)].append((member, plist))
    batches = []
    for members in groups.values():
        if len(members) < 2:
            continue
        batch = StepBatch(members)
        for member, _ in members:
            member.batch = batch
        batches.append(batch)
    return batches

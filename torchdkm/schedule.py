"""The temperature over training: soft attention early, hard late.

A fixed ``tau`` trades two things off.  A soft attention (large ``tau``) gives
every weight its own gradient (``dA/dW`` is large for weights between
centroids), so weights can still change cluster, but the model trains on
weights that are not yet the ones ``finalize`` ships (the train/export gap
of ``report``).  A hard one closes that gap but freezes the assignments.
:class:`TauSchedule` goes from one to the other, geometrically, as
``torch.optim.lr_scheduler`` schedules move the learning rate: call
:meth:`~TauSchedule.step` after each optimizer step.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from .errors import TorchdkmError
from .nn.parametrization import DKMParametrization, dkm_parametrizations


class TauSchedule:
    """Set every DKM layer's ``tau`` from ``start`` to ``end`` geometrically over ``steps`` calls of :meth:`step`.

    ``tau`` is in the unit of :class:`~torchdkm.LayerConfig` (relative to each
    layer's margin), so one schedule suits every layer; it replaces the
    configured values (each layer's config then records the current one).
    After ``steps`` steps the temperature stays at ``end``.  ``state_dict`` /
    ``load_state_dict`` resume it with a checkpoint.
    """

    def __init__(self, model: nn.Module, steps: int, start: float, end: float):
        self.layers = _layers(model)
        self.load_state_dict({"steps": steps, "start": start, "end": end, "done": 0})

    @property
    def tau(self) -> float:
        """The temperature the next training step uses."""
        fraction = min(self.done / self.steps, 1.0)
        return self.start * (self.end / self.start) ** fraction

    def step(self) -> None:
        self.done += 1
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "start": self.start, "end": self.end, "done": self.done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set the schedule (the constructor's arguments and the steps ``done``), checked, and apply it."""
        if set(state) != {"steps", "start", "end", "done"}:
            raise TorchdkmError(f"TauSchedule.load_state_dict: keys {sorted(state)}, expected done, end, start, steps")
        for name, low in (("steps", 1), ("done", 0)):
            value = state[name]
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise TorchdkmError(f"TauSchedule: {name}={value!r} is invalid: must be an integer >= {low}")
        for name in ("start", "end"):
            value = state[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise TorchdkmError(f"TauSchedule: {name}={value!r} is invalid: must be a finite number > 0")
        self.steps, self.start, self.end = state["steps"], float(state["start"]), float(state["end"])
        self.done = state["done"]
        self._apply()

    def _apply(self) -> None:
        tau = self.tau
        for layer in self.layers:
            layer.set_tau(tau)


def _layers(model: nn.Module) -> list[DKMParametrization]:
    """Each DKM parametrization once (a tied weight's is registered on several modules)."""
    unique = {id(p): p for _, _, _, p in dkm_parametrizations(model)}
    if not unique:
        raise TorchdkmError("TauSchedule: the model has no DKM weights (call torchdkm.prepare first)")
    return list(unique.values())

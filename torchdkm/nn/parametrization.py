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
validation during training measures the model you will ship.  A model trained
in eval mode (BatchNorm frozen with ``model.eval()``, say) would otherwise train
nothing of its clustered weights, silently: there the gradient passes straight
through the snapped weight to the weight (as in QAT), with a warning that DKM's
step runs in training mode only.
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..cluster import WeightClusterer
from ..cluster.clusterer import HardResult
from ..cluster.scales import STORED
from ..config import LayerConfig
from .batching import StepBatch
from .palettized import PaletteSpec


def _same(tensor: Tensor) -> Tensor:
    return tensor


class DKMParametrization(nn.Module):
    """One clustered weight: centroids, one DKM step per training forward, the snapped weight in eval mode.

    ``transposed``: the weight is stored ``(in, out)`` (transformers' ``Conv1D``);
    it is clustered as its transpose, as a ``Linear`` weight would be.
    A tied tensor (one ``Parameter`` held by several modules) gets one
    parametrization registered on every holder (``prepare`` lists them in
    ``holders``).  A parametrization keeps its training result until the weight,
    the centroids or the grad mode change or backward has run through it: every
    holder, a module called twice and a checkpointed forward's recomputation
    see the same soft weight, and one forward is one DKM step (see :meth:`step`).
    """

    def __init__(
        self, name: str, config: LayerConfig, weight: Tensor, *, transposed: bool = False, importance: Tensor | None = None
    ):
        super().__init__()
        self.layer_name = name
        self.config = config
        self.transposed = transposed
        self.clusterer = WeightClusterer(name, config, self.view(weight).shape)
        # (weighs the centroid means from the initial k-means on; kept by the clusterer, not in state_dict)
        self.clusterer.weigh(None if importance is None else self.view(importance), self.view(weight))
        self.register_buffer("centroids", self.clusterer.init(self.view(weight)))
        #: (key, the hard result, its centroids, the snapped weight in the module's layout)
        self._snapped: tuple[tuple, HardResult, Tensor, Tensor] | None = None
        self._soft: tuple[tuple, Tensor] | None = None
        self._start: tuple[tuple, Tensor] | None = None  # (the weight and centroids a step left, where it started)
        #: ``False`` snaps to the stored centroids as they are (post-training k-means, or after :func:`torchdkm.gptq`,
        #: which rounded the weights to them); a training step sets it again (the optimizer moves the weights after it).
        self.refresh = True
        #: ``(module name, parameter)`` of every module it is registered on (``prepare`` fills it), the owner first.
        self.holders: list[tuple[str, str]] = []
        #: the small layers it shares its DKM steps with (:mod:`.batching`; ``prepare`` sets it), if any
        self.batch: StepBatch | None = None
        self._warned_eval = False  # (trained in eval mode: warned once)

    def __getstate__(self) -> dict:
        """Copies and pickles drop the kept soft weight (it holds an autograd graph) and the step's start."""
        state = dict(self.__dict__)
        state["_soft"], state["_start"] = None, None
        return state

    def view(self, weight: Tensor) -> Tensor:
        """The weight as it is clustered: output channels first."""
        return weight.mT.contiguous() if self.transposed else weight

    def unview(self, weight: Tensor) -> Tensor:
        """Back to the module's own layout (contiguous, as a dense weight would be)."""
        return weight.mT.contiguous() if self.transposed else weight

    @torch.compiler.disable
    def forward(self, weight: Tensor) -> Tensor:
        """(Run eagerly inside ``torch.compile``: the engine's data-dependent iterations and native loops gain
        nothing from tracing; traced, inductor dropped the float16 rounding of block scales and Dynamo
        crashed in the native loops of vector layers.  The model around it still compiles.)"""
        if not self.training:
            hard = self.export(weight)[0]
            if not (torch.is_grad_enabled() and weight.requires_grad):
                return hard
            out = hard + (weight - weight.detach())  # the snapped value, the gradient straight through
            out.register_hook(self._warn_trained_in_eval)
            return out
        soft = self.step(weight)
        through = self.config.through
        return soft if through == 0 else soft + through * (weight - weight.detach())

    def step(self, weight: Tensor) -> Tensor:
        """One DKM step: the soft-clustered weight ``A C``, the centroids stored.

        One step per weight and backward: until backward has run through it (or the weight or the centroids
        change), every read returns the same soft weight, whether by a tied weight's other holder, a module
        called again or activation checkpointing recomputing the forward.  The step keeps its own saved
        tensors (identity hooks, innermost), so checkpointing recomputes the layer around it, not the step:
        a second step would start from the moved centroids and differ from the first.
        """
        kept = self._soft
        if kept is not None and kept[0] == self.step_key(weight):
            return kept[1]
        with torch.autograd.graph.saved_tensors_hooks(_same, _same):
            out = self._new_step(weight)
        if out.requires_grad:
            out.register_hook(self._forget)  # backward frees the graph: the next read steps again
        self._soft = (self.step_key(weight), out) if out.requires_grad or len(self.holders) > 1 else None
        return out

    def _new_step(self, weight: Tensor) -> Tensor:
        if self.batch is not None:
            batched = self.batch.soft(self, weight)
            if batched is not None:
                return batched
        start = self.start_of_step(weight)
        result = self.clusterer.soft(self.view(weight), start)
        self.move_centroids(weight, start, result.centroids)
        return self.unview(result.weight)

    def start_of_step(self, weight: Tensor) -> Tensor:
        """The centroids a step on ``weight`` starts from: the stored ones, or, if this weight's last step
        left them, nothing changed since and no backward ran through it, where that step started (reentrant
        checkpointing recomputes a forward that ran without gradients: the same step again, now with them)."""
        last = self._start
        if last is not None and last[0] == self._state_key(weight):
            return last[1]
        return self.centroids

    @torch.no_grad()
    def move_centroids(self, weight: Tensor, start: Tensor, centroids: Tensor) -> None:
        """Store a step's centroids, remembering where it started (:meth:`start_of_step`)."""
        before = start.clone() if start is self.centroids else start
        self.centroids.copy_(centroids)
        self.refresh = True
        self._start = (self._state_key(weight), before)

    def step_key(self, weight: Tensor) -> tuple:
        """What a kept soft weight depends on: the weight, the centroids and the grad mode."""
        return (*self._state_key(weight), torch.is_grad_enabled())

    def _state_key(self, weight: Tensor) -> tuple:
        """The weight and the centroids as they are now (a step's start is kept against it)."""
        return (weight.data_ptr(), weight._version, self.centroids._version)

    def _forget(self, grad: Tensor) -> None:
        """Backward ran through the step: the next read is the next step, from the stored centroids (a weight
        re-made at the same address, as FSDP2 unshards it, must not look like the same weight)."""
        self._soft = self._start = None

    def _warn_trained_in_eval(self, grad: Tensor) -> None:
        if not self._warned_eval:
            self._warned_eval = True
            warnings.warn(
                f"torchdkm: layer {self.layer_name or '(the model)'!r} is in eval mode but its weight gets a gradient: it trains "
                "straight through its snapped weight, without DKM's step (which runs in training mode: call "
                "model.train(), and put only the modules to freeze, e.g. BatchNorm, in eval mode)",
                stacklevel=2,
            )

    @torch.no_grad()
    def export(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The hard weight ``finalize`` exports, and the centroids it snaps to.

        The stored centroids come from the last training forward, which ran
        before the last optimizer step moved the weights; one DKM step on the
        current weights (no gradient, nothing stored) brings them up to date.
        The result is cached with :meth:`hard`'s.
        """
        self.hard(weight)
        assert self._snapped is not None
        return self._snapped[3], self._snapped[2]

    @torch.no_grad()
    def hard(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """The nearest-centroid indices ``(G, n)`` and the centroids of :meth:`export`.

        Cached until the weight or the centroids change, so ``finalize`` (which
        packs the indices) and ``export`` share one nearest-centroid search.
        """
        key = (weight.data_ptr(), weight._version, self.centroids._version)
        if self._snapped is None or self._snapped[0] != key:
            centroids = self.centroids
            view = self.view(weight.detach())
            if self.refresh:
                centroids = self.clusterer.soft(view, centroids).centroids
            found = self.clusterer.hard(view, centroids)
            self._snapped = (key, found, centroids, self.unview(found.weight))
        return self._snapped[1].index, self._snapped[2]

    def soft(self, weight: Tensor, centroids: Tensor | None = None) -> Tensor:
        """The soft weight for ``centroids`` (default: the stored ones), without updating them."""
        return self.unview(
            self.clusterer.soft(self.view(weight), self.centroids if centroids is None else centroids).weight
        )

    def spec(self, weight: Tensor) -> PaletteSpec:
        """How the palettized tensor is decoded (see :class:`~torchdkm.nn.palettized.PaletteSpec`)."""
        layout = self.clusterer.layout
        cfg = self.config
        return PaletteSpec(
            tuple(weight.shape),
            cfg.bits,
            cfg.dim,
            layout.group_size,
            scale_block=cfg.scale_block,
            scale_offset=cfg.scale_offset,
            transposed=self.transposed,
        )

    @torch.no_grad()
    def stored_scales(self, weight: Tensor) -> list[Tensor]:
        """The block scales (and offsets) ``finalize`` stores, float16; none without ``scale_block``."""
        self.hard(weight)
        assert self._snapped is not None
        found = self._snapped[1]
        return [t.to(STORED).clone() for t in (found.scales, found.offsets) if t is not None]

    def set_tau(self, tau: float) -> None:
        """Use temperature ``tau`` from the next step on (:class:`torchdkm.TauSchedule` anneals it): the next read
        is a new step, even of the same weight."""
        self.config = replace(self.config, tau=tau)  # (validated as any config)
        self.clusterer.config = self.config
        self._soft = self._start = None
        if self.batch is not None:
            self.batch.end()

    def extra_repr(self) -> str:
        c = self.config
        tied = f", tied to {[n for n, _ in self.holders[1:]]}" if len(self.holders) > 1 else ""
        return f"bits={c.bits}, dim={c.dim}, k={c.k}, group_size={c.group_size}, tau={c.tau}{tied}"


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


#: Module classes whose forward reads a parametrized weight more than once (MultiheadAttention
#: reads ``in_proj_weight`` three or four times): without a cache each read would run a DKM step.
CACHED_CLASSES = ("MultiheadAttention",)


def _enter_cache(module: nn.Module, args: tuple) -> None:
    parametrize._cache_enabled += 1


def _leave_cache(module: nn.Module, args: tuple, output: object) -> None:
    parametrize._cache_enabled -= 1
    if not parametrize._cache_enabled:
        parametrize._cache = {}


def cache_while_forward(module: nn.Module) -> None:
    """Compute each parametrized weight once per forward of ``module`` (torch's ``parametrize.cached``).

    Only for :data:`CACHED_CLASSES`; the hooks are the body of ``parametrize.cached()``
    split in two (the post-hook runs even when forward raises), installed once.
    """
    if not any(t.__name__ in CACHED_CLASSES for t in parametrize.type_before_parametrizations(module).__mro__):
        return
    if _enter_cache not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_enter_cache)
        module.register_forward_hook(_leave_cache, always_call=True)


def stop_caching(module: nn.Module) -> None:
    """Remove the hooks of :func:`cache_while_forward` (``finalize``: palettized weights need none)."""
    for hooks, fn in ((module._forward_pre_hooks, _enter_cache), (module._forward_hooks, _leave_cache)):
        for key in [k for k, v in hooks.items() if v is fn]:
            del hooks[key]
            getattr(module, "_forward_hooks_always_called", {}).pop(key, None)

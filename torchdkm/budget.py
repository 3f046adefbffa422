"""Size targets, not syntax: choose each layer's bits (and block) so that the whole file fits a budget.

A user asks for "3 bits per weight" or "under 50 MB", not for ``fc:3/1#64``.
:func:`plan_to_size` starts every layer the base config selects at its
cheapest option and spends the rest of the budget where it buys the most:
each step upgrades the layer whose next option removes the most error per
byte.  The error of a layer at an option is measured on its post-training
k-means weights (the clusterer's own ``init`` + ``snap``), one of two ways:

* **Fisher** (``fisher=True``, the calibration returning losses): the estimated increase of
  the loss, ``sum F (W_q - W)^2`` with ``F`` the squared gradient of each
  weight summed over the calibration losses (the diagonal empirical Fisher,
  :func:`torchdkm.fisher`), the k-means itself weighted by ``F`` (as ``prepare``
  weighs it with ``importance=plan.importance``).
  It sees what a norm cannot: a few outlier weights that one LUT per tensor
  clips cost little Frobenius norm but much loss.  Measured on SmolLM2-135M at
  3 bits per weight: the relative error below chose one LUT per tensor (no
  block scales) for 99 of 209 layers, and the post-training model's perplexity
  was 59,287 (fp32 27).
* **Relative error** otherwise: ``||W_q - W||^2 / ||W||^2``, each input channel
  weighted, when calibration inputs are given, by the mean square of the
  activations entering it (the relative output error ``||X (W_q - W)^T||^2 /
  ||X W^T||^2`` with ``X^T X`` taken diagonal), each layer counted by its number
  of weights: the plan buys the largest drop of relative error per bit wherever
  it is, as if every weight counted alike (counting every layer alike instead
  starved SmolLM2-135M's 28M-weight tied embedding, a fifth of the model, to
  1 bit in a 4-bit-per-weight plan, while 174 small layers took 5).

All-in means every byte the file holds: packed indices,
LUTs, block scales and offsets, every tensor left dense (biases, norms, layers
no rule selects, a dense copy beside a tied clustered weight), and an allowance
for the file's header.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .cluster import WeightClusterer
from .config import DKMConfig, LayerConfig
from .errors import TorchdkmError
from .importance import fisher as fisher_of
from .nn.palettized import PaletteSpec
from .report import layer_row
from .select import is_transposed, key_of, select

#: Bytes the planner keeps back for the file's header: the safetensors JSON entry of each tensor (dtype,
#: shape, offsets: at most this much beyond its name), torchdkm's JSON metadata of each clustered layer
#: (beyond its name), and a fixed part.  A clustered layer stores up to four tensors (indices, LUT, block
#: scales and offsets) named after it plus a suffix of at most 16 characters.  Measured on a LLaMA with
#: block scales and offsets: 19,656 header bytes for 125 tensors and 29 layers, against an allowance of 31,826.
HEADER_PER_TENSOR = 96
HEADER_PER_LAYER = 256
HEADER_FIXED = 2048
TENSORS_PER_LAYER = 4
SUFFIX = 16


@dataclass
class LayerChoice:
    name: str  # "<module>.<param>"
    module: str
    numel: int
    options: list[tuple[LayerConfig, int, float]]  # (config, bytes, error), cheapest first
    chosen: int = 0

    @property
    def config(self) -> LayerConfig:
        return self.options[self.chosen][0]

    @property
    def bytes(self) -> int:
        return self.options[self.chosen][1]

    @property
    def error(self) -> float:
        return self.options[self.chosen][2]


@dataclass
class SizePlan:
    """The chosen configuration per layer, and what it costs."""

    target_bytes: int
    parameters: int
    dense_bytes: int  # every tensor no layer of the plan compresses, header allowance included
    layers: list[LayerChoice] = field(default_factory=list)
    measure: str = "rel. error"  # or "Fisher": what each layer's error is (see the module docstring)
    #: With Fisher: each planned weight's squared gradients, by ``LayerChoice.name``; the options were measured
    #: on k-means weighted by them, and ``prepare(model, plan.config, importance=plan.importance)`` weighs alike.
    importance: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def bytes(self) -> int:
        return self.dense_bytes + sum(layer.bytes for layer in self.layers)

    @property
    def bits_per_weight(self) -> float:
        """All-in bits per parameter: the planned file size over the model's parameters."""
        return 8 * self.bytes / max(self.parameters, 1)

    def retarget(self, target_bpw: float) -> SizePlan:
        """The same measured options spent for another size: plans for several sizes cost one measurement.

        Raises :class:`TorchdkmError` when even the cheapest options do not fit.
        """
        _check_target(target_bpw)
        layers = [replace(layer, chosen=0) for layer in self.layers]
        plan = SizePlan(int(target_bpw * self.parameters / 8), self.parameters, self.dense_bytes, layers, self.measure,
                        self.importance)  # fmt: skip
        _check_fits(plan, target_bpw)
        _spend(plan)
        return plan

    @property
    def config(self) -> DKMConfig:
        """A config naming every planned layer (and nothing else)."""
        return DKMConfig(default=None, by_name={layer.module: layer.config for layer in self.layers})

    def __str__(self) -> str:
        lines = [f"{'layer':40s} {'bits/dim':>8s} {'block':>6s} {'LUT per':>8s} {'bytes':>12s} {self.measure:>10s}"]
        for layer in self.layers:
            cfg = layer.config
            block = "-" if cfg.scale_block is None else f"{cfg.scale_block or 'row'}{'a' if cfg.scale_offset else ''}"
            group = "tensor" if cfg.group_size is None else f"{cfg.group_size} ch"
            lines.append(
                f"{layer.name:40s} {cfg.bits:>4d}/{cfg.dim:<3d} {block:>6s} {group:>8s} {layer.bytes:>12,} "
                f"{layer.error:>10.4g}"
            )
        lines.append(
            f"planned file: {self.bytes:,} B of {self.target_bytes:,} B ({self.bits_per_weight:.3f} bits per parameter, "
            f"{self.parameters:,} parameters; dense tensors and header {self.dense_bytes:,} B)"
        )
        return "\n".join(lines)


def plan_to_size(
    model: nn.Module,
    target_bpw: float,
    base: DKMConfig | str = "fc:4/1",
    *,
    bits: Iterable[int] = (2, 3, 4),
    blocks: Iterable[int | None] | None = None,
    offset: bool | None = None,
    groups: Iterable[int | None] | None = None,
    calibration: Callable[[nn.Module], object] | None = None,
    fisher: bool = False,
    header: bool = True,
) -> SizePlan:
    """A per-layer plan whose all-in file size is at most ``target_bpw x parameters / 8`` bytes.

    ``base`` selects the layers (and their ``dim`` and other fields); each may
    take any of ``bits`` x ``blocks`` (block scales, with ``offset``; by default
    the base rule's own ``scale_block`` and ``scale_offset``) x ``groups`` (output
    channels per LUT, ``None`` one LUT per tensor; by default the base rule's
    ``group_size``): a LUT per few channels follows each row's own distribution
    for 2**bits float16 values per group, where block scales cost two per block.

    ``calibration``: a callable that runs the model on sample inputs
    (``lambda m: m(ids)``); the activations it produces weight each layer's
    relative error.  With ``fisher``, it returns a scalar loss or yields several
    (``for ids in batches: yield m(input_ids=ids, labels=ids).loss``; each is
    backpropagated before the next is computed), and the errors are Fisher
    estimates of the loss increase (the module docstring says why).

    ``header``: the budget holds the file's header too (an allowance: the
    written file never exceeds the target); ``False`` budgets the tensors'
    bytes only, as :func:`torchdkm.report` counts them (to match a size counted
    that way, another method's).

    Raises :class:`TorchdkmError` when even the cheapest option of every layer
    does not fit, naming the smallest size that does.
    """
    if isinstance(base, str):
        base = DKMConfig.parse(base)
    _check_target(target_bpw)
    chosen = select(model, base).chosen
    if not chosen:
        raise TorchdkmError("plan_to_size: the base config selects no weight of this model")
    tensors = _unique_tensors(model)
    parameters = sum(t.numel() for t in tensors.values() if isinstance(t, nn.Parameter))
    target = int(target_bpw * parameters / 8)
    clustered = {id(getattr(module, param)) for _, module, param, _ in chosen}
    dense = sum(t.numel() * t.element_size() for key, t in tensors.items() if key not in clustered)
    dense += _header_allowance(model, [name for name, _, _, _ in chosen]) if header else 0
    if fisher and calibration is None:
        raise TorchdkmError("plan_to_size: fisher=True needs a calibration that returns (or yields) losses")
    squared_grads = fisher_of(model, calibration, base) if fisher else {}
    importance = {} if fisher else _input_importance(model, chosen, calibration)
    plan = SizePlan(target, parameters, dense, measure="Fisher" if fisher else "rel. error", importance=squared_grads)
    for name, module, param, layer in chosen:
        weight = getattr(module, param).detach()
        transposed = is_transposed(module)  # (transformers' Conv1D: output channels first)
        weight = weight.mT if transposed else weight
        sizes = (layer.scale_block,) if blocks is None else tuple(blocks)
        lut_groups = (layer.group_size,) if groups is None else tuple(groups)
        asym = layer.scale_offset if offset is None else offset
        weighing = None
        if fisher:
            grads = squared_grads[key_of(name, param)]
            weighing = grads.mT if transposed else grads
            scoring = _FisherError(weighing)
        else:
            scoring = _RelativeError(importance.get(name))
        options = [
            option
            for blk, group in itertools.product(sizes, lut_groups)
            for option in _options(name, weight, layer.replace(scale_block=blk, scale_offset=asym and blk is not None,
                                                               group_size=group), tuple(bits), scoring, weighing)  # fmt: skip
        ]
        options.sort(key=lambda o: (o[1], o[2]))
        plan.layers.append(LayerChoice(key_of(name, param), name, weight.numel(), options))
    _check_fits(plan, target_bpw)
    _spend(plan)
    return plan


def _check_target(target_bpw: float) -> None:
    if not (isinstance(target_bpw, (int, float)) and math.isfinite(target_bpw) and target_bpw > 0):
        raise TorchdkmError(f"plan_to_size: target_bpw must be a number > 0, got {target_bpw!r}")


def _check_fits(plan: SizePlan, target_bpw: float) -> None:
    """Every layer starts at its cheapest option: if that does not fit, nothing does."""
    if plan.bytes > plan.target_bytes:
        raise TorchdkmError(
            f"plan_to_size: the cheapest option of every layer needs {plan.bytes:,} B "
            f"({plan.bits_per_weight:.3f} bits per parameter), over the target {plan.target_bytes:,} B "
            f"({target_bpw} bits): allow fewer bits, larger blocks, or more layers in the base config"
        )


def _spend(plan: SizePlan) -> None:
    """Greedy: upgrade the layer whose next option removes the most error per extra byte, while it fits.

    A relative error counts once per weight of its layer (every weight alike); a Fisher estimate is already a
    sum over the weights and counts once.
    """
    per_weight = plan.measure != "Fisher"
    while True:
        best, best_gain = None, 0.0
        for layer in plan.layers:
            for j in range(layer.chosen + 1, len(layer.options)):
                _, cost, error = layer.options[j]
                extra, gain = cost - layer.bytes, (layer.error - error) * (layer.numel if per_weight else 1)
                if gain > 0 and plan.bytes + extra <= plan.target_bytes and gain / max(extra, 1) > best_gain:
                    best, best_gain = (layer, j), gain / max(extra, 1)
        if best is None:
            return
        best[0].chosen = best[1]


class _RelativeError:
    """``||W_q - W||^2 / ||W||^2``, each input channel weighted by ``importance`` when given."""

    def __init__(self, importance: Tensor | None):
        self.importance = importance

    def __call__(self, snapped: Tensor, weight: Tensor) -> float:
        diff = (snapped - weight).float().reshape(weight.shape[0], -1).square()
        norm = weight.float().reshape(weight.shape[0], -1).square()
        if self.importance is not None and self.importance.numel() == diff.shape[1]:
            diff, norm = diff * self.importance, norm * self.importance
        return float(diff.sum() / norm.sum().clamp_min(1e-30))


class _FisherError:
    """``sum F (W_q - W)^2``: the loss increase a second-order expansion predicts (``F`` the diagonal Fisher)."""

    def __init__(self, fisher: Tensor):
        self.fisher = fisher

    def __call__(self, snapped: Tensor, weight: Tensor) -> float:
        return float(((snapped - weight).float().square() * self.fisher.reshape(weight.shape)).sum())


def _options(
    name: str,
    weight: Tensor,
    layer: LayerConfig,
    bits: tuple[int, ...],
    scoring: Callable[[Tensor, Tensor], float],
    weighing: Tensor | None,
) -> list[tuple[LayerConfig, int, float]]:
    """``(config, bytes, error)`` of ``layer`` at each of ``bits``: the stored size and the error of its
    post-training k-means weights (weighted by ``weighing``, as ``prepare`` with the plan's importance weighs
    them).  One initialisation serves every width (:meth:`WeightClusterer.init_many`), unpolished: the
    planner ranks options and the polish moves the errors by about 2**-11."""
    clusterer = WeightClusterer(name, layer.replace(bits=max(bits)), weight.shape)
    clusterer.weigh(weighing, weight)
    starts = clusterer.init_many(weight, bits, polish=False)
    layout = clusterer.layout  # (the same for every width; snapping reads the width from the centroids)
    out = []
    for b in bits:
        config = layer.replace(bits=b)
        spec = PaletteSpec(layout.shape, b, config.dim, layout.group_size, config.scale_block, config.scale_offset)
        snapped = clusterer.snap(weight, starts[b])
        out.append((config, layer_row(name, spec, weight.element_size()).bytes, scoring(snapped, weight)))
    return out


def _header_allowance(model: nn.Module, clustered: list[str]) -> int:
    """An upper bound of the header's bytes: every state_dict entry, and every clustered layer's tensors and metadata."""
    dense = sum(HEADER_PER_TENSOR + len(key) for key in model.state_dict(keep_vars=True))
    layers = sum(TENSORS_PER_LAYER * (HEADER_PER_TENSOR + len(name) + SUFFIX) + HEADER_PER_LAYER + len(name) for name in clustered)
    return HEADER_FIXED + dense + layers


def _unique_tensors(model: nn.Module) -> dict[int, Tensor]:
    """Every parameter and persistent buffer once (tied tensors once), by identity."""
    found: dict[int, Tensor] = {}
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        found.setdefault(id(tensor), tensor)
    return found


@torch.no_grad()
def _input_importance(model: nn.Module, chosen: list, calibration: Callable | None) -> dict[str, Tensor]:
    """Per selected Linear-like layer: the mean square of each input channel over the calibration run."""
    if calibration is None:
        return {}
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + x.square().sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module, _, _ in chosen if isinstance(module, nn.Linear)]
    try:
        was_training = model.training
        model.eval()
        calibration(model)
        model.train(was_training)
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / counts[name] for name in sums}


__all__ = ["LayerChoice", "SizePlan", "plan_to_size"]

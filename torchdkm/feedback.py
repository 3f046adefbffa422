"""Error feedback before training: GPTQ's column-by-column rounding, onto each layer's LUT and block scales.

Post-training k-means snaps every weight to its nearest centroid on its own, so the errors of a row add up
in the layer's output.  GPTQ (Frantar et al., arXiv 2210.17323) rounds one input column at a time and
moves the columns not yet rounded to cancel the output error so far, weighted by ``H = X^T X`` of the
layer's inputs on calibration data (the inverse's Cholesky factor gives each column's share).  Here the
grid is not uniform: a weight rounds to its block's ``LUT[j] * scale (+ offset)`` nearest to it, the LUT the
layer's k-means centroids (``prepare`` made them) and the block scales derived from the columns as they are
when the block starts, as :class:`torchdkm.cluster.scales.BlockScales` derives them.

``gptq(model, calibration)`` runs on a model :func:`torchdkm.prepare` returned and overwrites each
compensated layer's trainable weight with the values GPTQ rounded (each column as it was just before its
rounding): DKM, or ``finalize`` straight away, then starts from weights whose nearest centroids already
cancel each other's errors.  ``finalize`` snaps them to the centroids GPTQ rounded to, not to centroids
refreshed by one more k-means step, which undid part of the compensation (a probe on SmolLM2-135M at 3
bits per weight: perplexity 127.8 refreshed against 107.8).

Which layers it compensates: ``nn.Linear``, transformers' ``Conv1D`` and ``nn.Conv2d`` (ungrouped; its rows
multiply the input's patches) weights, scalars or vectors along the row; a tensor several modules hold
(an embedding tied to the output head) once, for its first Linear holder's inputs.  The rest (embeddings
alone, grouped convolutions) keep their weights, and the report lists every layer it did not compensate
itself, with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .cluster.scales import BlockScales
from .errors import TorchdkmError
from .nn.parametrization import DKMParametrization, dkm_parametrizations, original

#: Columns updated together between the lazy batch updates (GPTQ's ``blocksize``).
COLUMNS = 128


@dataclass
class GPTQReport:
    """Per compensated layer ``(error before, error after)``: the relative output error of its snapped weight,
    ``tr(E H E^T) / tr(W H W^T)`` with ``E`` the snapped minus the original weight, on the calibration inputs;
    ``skipped``: the layers left as they were, with the reason."""

    errors: dict[str, tuple[float, float]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> str:
        """One line: how many layers were compensated, and their mean output error before and after."""
        mean = [sum(pair[i] for pair in self.errors.values()) / max(len(self.errors), 1) for i in (0, 1)]
        return f"{len(self.errors)} layers, mean output error {mean[0]:.4f} -> {mean[1]:.4f}"

    def __str__(self) -> str:
        lines = [f"{name}: output error {a:.4g} -> {b:.4g}" for name, (a, b) in self.errors.items()]
        lines += [f"{name}: not compensated ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)


def gptq(
    model: nn.Module,
    calibration: Callable[[nn.Module], object],
    *,
    reference: nn.Module | None = None,
    stages: int = 1,
    tied: bool = True,
    damp: float = 0.01,
) -> GPTQReport:
    """Compensate the rounding of every eligible DKM layer of ``model`` (prepared, not finalized); see the module.

    ``calibration(m)`` runs ``m`` on calibration inputs (its result is ignored; a generator is run to its
    end, so :func:`torchdkm.fisher`'s calibrations serve too).  Where the layers' inputs come from:

    * ``reference`` (e.g. the float model ``model`` was prepared from: modules of the same names): one
      pass, every layer compensated for the float model's inputs (GPTQ's errors of earlier layers are
      not seen by later ones);
    * else ``model`` itself in eval mode, its layers snapped, in ``stages`` passes: the layers, in the order
      the calibration first runs them, cut into ``stages`` runs, each compensated for the inputs the
      stages before it (compensated) give it: GPTQ's sequential mode at ``stages`` = the number of layers,
      one pass per stage.  ``stages=1``: every layer compensated for the inputs of the k-means-snapped model.

    ``tied``: a tensor several modules hold (a language model's embedding and output head) is compensated
    for the inputs of its first Linear holder, the others sharing the result (a probe on SmolLM2-135M at 3
    bits per weight, post-training: perplexity 80.8 against 107.8 with the tied tensor left as it was, though
    the embedding's rows then carry the head's compensation); ``False`` leaves tied tensors as they are.
    ``damp``: the fraction of ``H``'s mean diagonal added to it (GPTQ's dampening), > 0.
    """
    if not damp > 0:
        raise TorchdkmError(f"gptq: damp must be > 0, got {damp!r}")
    if not (isinstance(stages, int) and stages >= 1) or (reference is not None and stages != 1):
        raise TorchdkmError(f"gptq: stages must be an int >= 1 (1 with a reference model), got {stages!r}")
    report, layers, owners = GPTQReport(), {}, {}  # (owners: a tied tensor's parametrization -> its compensated key)
    found = [(f"{name}.{param}" if name else param, name, module, param, p) for name, module, param, p in dkm_parametrizations(model)]
    reasons = {key: _ineligible(module, param, p) for key, _, module, param, p in found}
    for key, *_, p in found:
        if not reasons[key]:
            owners.setdefault(id(p), key)
    for key, name, module, param, p in found:
        why, owner = reasons[key], owners.get(id(p))
        if len(p.holders) > 1 and owner is not None and (not tied or owner != key):
            why = "tied (tied=False)" if not tied else f"tied: compensated as {owner!r}"
        if why:
            report.skipped[key] = why
        else:
            layers[key] = (name, module, param, p)
    if not layers:
        raise TorchdkmError(f"gptq: no layer to compensate (a model from torchdkm.prepare, with Linear or Conv2d weights); skipped: {report.skipped}")
    names = {key: name for key, (name, *_) in layers.items()}
    hessians = _hessians(model if reference is None else reference, names, calibration)  # (in the order first run)
    order = list(hessians)
    for stage in range(stages):
        keys = order[len(order) * stage // stages : len(order) * (stage + 1) // stages]
        if stage and keys:
            hessians = _hessians(model, {key: names[key] for key in keys}, calibration)
        for key in keys:
            report.errors[key] = _compensate_layer(*layers[key][1:], hessians.pop(key), damp)
    return report


def _compensate_layer(module: nn.Module, param: str, p: DKMParametrization, H: Tensor, damp: float) -> tuple[float, float]:
    """GPTQ on one DKM weight, written back; its output error snapped by k-means before and after."""
    weight = original(module, param)
    rows = p.clusterer.layout.out
    before = p.view(weight.detach()).reshape(rows, -1).to(torch.float32)
    snapped = p.view(p.export(weight)[0]).reshape(rows, -1).to(torch.float32)
    rounded = compensate(before, H, p.centroids.to(torch.float32), p.clusterer.layout.group_size, p.clusterer.scales, damp)[0]
    with torch.no_grad():
        weight.copy_(p.unview(rounded.reshape(p.view(weight).shape).to(weight.dtype)))
    p.refresh = False  # snap to the centroids GPTQ rounded to (until a training step moves them)
    after = p.view(p.export(weight)[0]).reshape(rows, -1).to(torch.float32)
    return _output_error(snapped - before, before, H), _output_error(after - before, before, H)


def _ineligible(module: nn.Module, param: str, p: DKMParametrization) -> str:
    """Why a DKM weight is not compensated ('' if it is)."""
    kind = parametrize.type_before_parametrizations(module).__name__
    if param != "weight" or kind not in ("Linear", "Conv1D", "Conv2d"):
        return f"{kind} {param!r}: not a Linear or Conv2d weight"
    if kind == "Conv2d" and (module.groups != 1 or module.padding_mode != "zeros"):
        return "a grouped convolution" if module.groups != 1 else f"padding mode {module.padding_mode!r}"
    if p.clusterer.layout.row_len % p.config.dim:
        return f"vectors of dim {p.config.dim} across rows of {p.clusterer.layout.row_len}"
    return ""


def _rows_of(module: nn.Module, x: Tensor) -> Tensor:
    """The input as the rows a weight row multiplies: features last (Linear, Conv1D), or a Conv2d's patches."""
    if isinstance(module, nn.Conv2d):
        patches = nn.functional.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])
    return x.reshape(-1, x.shape[-1])


def _hessians(model: nn.Module, names: dict[str, str], calibration: Callable[[nn.Module], object]) -> dict[str, Tensor]:
    """``X^T X`` (float64) of each named module's inputs over the calibration, keyed as ``names``."""
    sums: dict[str, Tensor] = {}
    hooks = []

    def hook(key: str) -> Callable:
        def add(module: nn.Module, args: tuple) -> None:
            x = _rows_of(module, args[0].detach()).to(torch.float64)
            if key in sums:
                sums[key].addmm_(x.T, x)  # (in place: no second (columns, columns) float64 buffer per batch)
            else:
                sums[key] = x.T @ x

        return add

    was_training = model.training
    try:
        for key, name in names.items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise TorchdkmError(f"gptq: the reference model has no module {name!r}") from None
            hooks.append(module.register_forward_pre_hook(hook(key)))
        model.eval()
        with torch.no_grad():
            result = calibration(model)
            if isinstance(result, Iterator):
                for _ in result:
                    pass
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [key for key in names if key not in sums]
    if missing:
        raise TorchdkmError(f"gptq: the calibration never ran layer(s) {missing[:5]}")
    return sums


def _output_error(error: Tensor, weight: Tensor, H: Tensor) -> float:
    h = H.to(torch.float32)
    total = float(((weight @ h) * weight).sum())
    return float(((error @ h) * error).sum()) / total if total > 0 else 0.0


def compensate(
    weight: Tensor, H: Tensor, lut: Tensor, group_size: int, blocks: BlockScales | None, damp: float = 0.01
) -> tuple[Tensor, Tensor]:
    """GPTQ on one ``(rows, columns)`` weight: ``(each column as it was just before rounding, as rounded)``.

    ``H``: ``X^T X`` of the inputs ``(columns, columns)``; ``lut``: ``(groups, k, dim)`` centroids, row ``r``
    using group ``r // group_size``, vectors of ``dim`` consecutive columns rounded together (then each
    column's error fed back in turn, as GPTVQ does); ``blocks``: the layer's block scales (``None``: the LUT
    values themselves).  The result's blocks derive the scales GPTQ rounded with, and its nearest grid
    values are the second result, GPTQ's quantized weight (see :class:`_Bounds`).
    """
    W = weight.to(torch.float32).clone()
    rows, n = W.shape
    dim = lut.shape[-1]
    H = H.to(torch.float64).clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * float(H.diagonal().mean()))
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).to(torch.float32)
    table = lut[torch.arange(rows, device=W.device) // group_size]  # (rows, k, dim)
    block = n if blocks is None else blocks.block
    step = COLUMNS // dim * dim
    out, quantized = torch.empty_like(W), torch.empty_like(W)
    bounds = None
    for i1 in range(0, n, step):
        i2 = min(i1 + step, n)
        chunk = W[:, i1:i2].clone()
        errors = torch.empty_like(chunk)
        for i in range(0, i2 - i1, dim):
            col = i1 + i
            if blocks is not None and col % block == 0:
                end = min(col + block, n)
                bounds = _Bounds(torch.cat([chunk[:, i : min(end, i2) - i1], W[:, i2:end]], 1), col, blocks.offset)
            kept = chunk[:, i : i + dim] if bounds is None else bounds.keep(chunk[:, i : i + dim], col)
            out[:, col : col + dim] = kept
            q = quantized[:, col : col + dim] = _nearest(kept, table, bounds)
            for j in range(dim):
                err = (chunk[:, i + j] - q[:, j]) / U[col + j, col + j]
                chunk[:, i + j :] -= err[:, None] * U[col + j, col + j : i2][None, :]
                errors[:, i + j] = err
        W[:, i2:] -= errors @ U[i1:i2, i2:]
    return out, quantized


class _Bounds:
    """One block's scale (and offset) as the layer derives them from its values when the block starts, kept
    for the block's whole run: each column is clamped to the block's bounds then and the values that set
    them stay put, so the block's final values derive the same scales (and round to what GPTQ rounded)."""

    def __init__(self, values: Tensor, first: int, offset: bool) -> None:
        one = BlockScales.of(values.shape, values.shape[1], offset)
        assert one is not None
        _, scale, shift = one.normalise(values)
        self.scale, self.offset = scale[:, 0], None if shift is None else shift[:, 0]
        if offset:
            self.high, top = values.max(1)
            self.low, bottom = values.min(1)
            self.pins = ((first + top, self.high), (first + bottom, self.low))
        else:
            peak, at = values.abs().max(1)
            self.high, self.low = peak, -peak
            self.pins = ((first + at, values.gather(1, at[:, None])[:, 0]),)

    def keep(self, w: Tensor, col: int) -> Tensor:
        """Columns ``col, col + 1, ...`` (``w``: ``(rows, dim)``) within the bounds, those that set them as they were."""
        kept = torch.minimum(torch.maximum(w, self.low[:, None]), self.high[:, None])
        for j in range(w.shape[1]):
            for where, value in self.pins:
                kept[:, j] = torch.where(where == col + j, value, kept[:, j])
        return kept


def _nearest(w: Tensor, table: Tensor, bounds: _Bounds | None) -> Tensor:
    """Each row's grid vector nearest ``w`` ``(rows, dim)``: ``table[r, j] * scale[r] (+ offset[r])`` (the table
    itself without block scales)."""
    grid = table
    if bounds is not None:
        grid = table * bounds.scale[:, None, None] + (0 if bounds.offset is None else bounds.offset[:, None, None])
    j = (grid - w[:, None, :]).square().sum(-1).argmin(1)
    return grid[torch.arange(len(w), device=w.device), j]

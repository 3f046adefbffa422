"""The non-DKM baselines: uniform per-channel integer quantization, and coremltools' DKM.

Uniform quantization is what a user gets from a weight-only int toolkit:
each output channel (row of the weight; each token's row for an embedding)
gets its own affine grid ``offset + scale * q``, ``q`` in ``0..2**bits-1``,
spanning the channel's min and max shrunk by the factor that minimises the
channel's squared error (clipping search).  Scale and offset are stored in
float16 (and the weights are rounded with those float16 values, so the
counted size is the real one).  ``uniform_quantize_`` rounds to nearest once (post-training);
``uniform_qat_`` trains through the same rounding with a straight-through
estimator, the usual quantization-aware-training baseline.

``CoremlDKM`` wraps coremltools 9.0 ``DKMPalettizer`` (prepare, ``step()``
after each optimizer step, finalize) with the same bits/dim per layer type as
a torchdkm config, the same LUT granularity (per tensor, or per group of
output channels for ``@GROUP``), float32 LUTs, and its own default tau.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import torchdkm
from torchdkm.matching import TYPE_GROUPS

QUANTIZED_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)


def _rows(weight: Tensor) -> Tensor:
    return weight.reshape(weight.shape[0], -1)


#: Candidate shrink factors of each row's [min, max] range; the one with the least squared error wins.
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(13))  # 1.0 down to 0.4


def _round_to_grid(rows: Tensor, low: Tensor, high: Tensor, levels: int) -> Tensor:
    scale = ((high - low) / levels).half().float().clamp_min(torch.finfo(torch.float16).tiny)
    offset = low.half().float()
    return offset + scale * ((rows - offset) / scale).round().clamp(0, levels)


def fake_quantize(weight: Tensor, bits: int) -> Tensor:
    """Per-row affine round-to-nearest at ``bits``, with MSE-optimal clipping (the weights a deployed int model uses).

    Each row's grid spans its [min, max] shrunk towards zero by the factor of
    :data:`CLIP_RATIOS` that minimises the row's squared rounding error: plain
    min-max rounding lets one outlier stretch the grid and loses most layers of
    a transformer at 4 bits.  Scale and offset are float16.
    """
    rows = _rows(weight.detach()).float()
    low, high = rows.amin(1, keepdim=True), rows.amax(1, keepdim=True)
    levels = 2**bits - 1
    best = _round_to_grid(rows, low, high, levels)
    best_error = (best - rows).pow(2).sum(1, keepdim=True)
    for ratio in CLIP_RATIOS[1:]:
        candidate = _round_to_grid(rows, low * ratio, high * ratio, levels)
        error = (candidate - rows).pow(2).sum(1, keepdim=True)
        better = error < best_error
        best = torch.where(better, candidate, best)
        best_error = torch.where(better, error, best_error)
    return best.reshape(weight.shape).to(weight.dtype)


class UniformSTE(nn.Module):
    """Parametrization: forward uses the rounded weight, backward passes the gradient straight through."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits = bits

    def forward(self, weight: Tensor) -> Tensor:
        return weight + (fake_quantize(weight, self.bits) - weight).detach()


@dataclass(frozen=True)
class QuantizedLayer:
    name: str
    numel: int
    channels: int
    bits: int

    @property
    def bytes(self) -> int:
        """Packed integer codes plus a float16 scale and offset per channel."""
        return math.ceil(self.numel * self.bits / 8) + 4 * self.channels


def bits_by_type(setting: str) -> dict[type, int]:
    """Bits per weight of each module type in a torchdkm shorthand (``"fc:3/1, emb:2/1"``).

    Uniform quantization cannot go below 1 bit per weight: a setting whose
    bits/dim is not a whole number >= 1 raises ``ValueError``.
    """
    config = torchdkm.DKMConfig.parse(setting)
    out: dict[type, int] = {}
    for key, layer in config.by_type.items():
        if layer is None:
            continue
        per_weight = layer.bits / layer.dim
        if per_weight < 1 or per_weight != int(per_weight):
            raise ValueError(f"uniform quantization: {key}:{layer.bits}/{layer.dim} is {per_weight:g} bits/weight")
        names = TYPE_GROUPS.get(key, (key,))
        for cls in QUANTIZED_TYPES:
            if cls.__name__ in names:
                out[cls] = int(per_weight)
    if not out:
        raise ValueError(f"uniform quantization: {setting!r} names no module type ({list(TYPE_GROUPS)})")
    return out


def _targets(model: nn.Module, by_type: dict[type, int], min_numel: int) -> list[tuple[str, nn.Module, int]]:
    found = []
    for name, module in model.named_modules():
        for cls, value in by_type.items():
            if parametrize.type_before_parametrizations(module) is cls and module.weight.numel() >= min_numel:
                found.append((name, module, value))
    return found


@torch.no_grad()
def uniform_quantize_(model: nn.Module, setting: str, *, min_numel: int = 256) -> list[QuantizedLayer]:
    """Round the weights ``setting`` selects, in place; returns the quantized layers (for sizing)."""
    layers = []
    for name, module, bits in _targets(model, bits_by_type(setting), min_numel):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
        module.weight.copy_(fake_quantize(module.weight, bits))
        layers.append(QuantizedLayer(name, module.weight.numel(), module.weight.shape[0], bits))
    return layers


def uniform_qat_(model: nn.Module, setting: str, *, min_numel: int = 256) -> nn.Module:
    """Attach straight-through uniform fake quantization; train, then call :func:`uniform_quantize_`."""
    for _, module, bits in _targets(model, bits_by_type(setting), min_numel):
        parametrize.register_parametrization(module, "weight", UniformSTE(bits))
    return model


def uniform_size(model: nn.Module, layers: list[QuantizedLayer]) -> tuple[int, int]:
    """(compressed bytes, fp32 bytes): quantized layers as counted, every other tensor at its size."""
    quantized = {f"{q.name}.weight" if q.name else "weight" for q in layers}
    fp32 = other = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        fp32 += 4 * tensor.numel()
        if name not in quantized:
            other += tensor.numel() * tensor.element_size()
    return other + sum(q.bytes for q in layers), fp32


class CoremlDKM:
    """coremltools 9.0 ``DKMPalettizer`` configured like a torchdkm shorthand."""

    def __init__(self, model: nn.Module, setting: str, *, min_numel: int = 256, **options: Any) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from coremltools.optimize.torch.palettization import (
                DKMPalettizer,
                DKMPalettizerConfig,
                ModuleDKMPalettizerConfig,
            )
        config = torchdkm.DKMConfig.parse(setting)
        types = {}
        for key, layer in config.by_type.items():
            if layer is None:
                continue
            granularity = {"granularity": "per_tensor"}
            if layer.group_size is not None:
                granularity = {"granularity": "per_grouped_channel", "group_size": layer.group_size}
            module_config = ModuleDKMPalettizerConfig(
                n_bits=layer.bits,
                cluster_dim=layer.dim,
                weight_threshold=min_numel,
                lut_dtype="f32",
                **granularity,
                **_scale_option(key, layer),
                **options,
            )
            for cls in QUANTIZED_TYPES:
                if cls.__name__ in TYPE_GROUPS.get(key, (key,)):
                    types[cls] = module_config
        self.palettizer = DKMPalettizer(model, DKMPalettizerConfig(module_type_configs=types))

    def prepare(self) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.palettizer.prepare(inplace=True)

    def step(self) -> None:
        self.palettizer.step()

    def finalize(self) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return self.palettizer.finalize(inplace=True)


def _scale_option(key: str, layer: torchdkm.LayerConfig) -> dict[str, bool]:
    """coremltools' ``enable_per_channel_scale`` for ``#row``; it has no block scales and no offsets."""
    if layer.scale_block is None:
        return {}
    if layer.scale_block != 0 or layer.scale_offset:
        raise ValueError(f"{key}: coremltools' DKMPalettizer has one scale per output channel (#row) at most")
    return {"enable_per_channel_scale": True}


def unpalettized(model: nn.Module, setting: str, *, min_numel: int = 256) -> list[tuple[str, int]]:
    """Selected weights holding more distinct values than their LUTs can: left dense (name, numel).

    coremltools skips some layers it cannot cluster (a vector dimension that
    does not divide the channels); those must be counted at fp32 size.
    """
    config = torchdkm.DKMConfig.parse(setting)
    layers = {}
    for key, layer in config.by_type.items():
        for cls in QUANTIZED_TYPES:
            if layer is not None and cls.__name__ in TYPE_GROUPS.get(key, (key,)):
                layers[cls] = layer
    dense = []
    for name, module, layer in _targets(model, layers, min_numel):
        weight = module.weight.detach()
        if layer.scale_block is not None:  # a scale per output channel: each channel holds at most k d values
            distinct = max(torch.unique(row).numel() for row in weight.flatten(1))
            if distinct > 2**layer.bits * layer.dim:
                dense.append((name, weight.numel()))
            continue
        groups = 1 if layer.group_size is None else -(-weight.shape[0] // layer.group_size)
        if torch.unique(weight).numel() > groups * 2**layer.bits * layer.dim:
            dense.append((name, weight.numel()))
    return dense


def size_with_dense(report: torchdkm.Report, dense: list[tuple[str, int]]) -> int:
    """``report``'s compressed size with the ``dense`` weights (name, numel) counted at fp32 instead."""
    rows = {r.name: r for r in report.layers}
    return report.compressed_bytes + sum(4 * numel - rows[f"{name}.weight"].bytes for name, numel in dense)

"""Post-training baselines for the language-model experiment, each with its all-in size.

Every baseline quantizes the same tensors torchdkm clusters: the weight of every
``nn.Linear`` and ``nn.Embedding`` (a weight tied between the embedding and the
output head once).  Sizes count what a file of that format holds: the integer
codes, the per-block (or per-channel) scales and offsets in float16, the
look-up tables in float16, and every other tensor at float32.

- :func:`round_blocks`: asymmetric round-to-nearest in blocks of ``B`` input
  weights (min and step per block), the format of GGUF's Q4_1 and of most LLM
  weight files.
- :func:`hqq_blocks`: HQQ (half-quadratic optimisation of the offset), same
  storage as ``round_blocks``.
- :func:`coreml_post_training`: coremltools 9.0 ``PostTrainingPalettizer`` with
  one LUT per group of 16 output channels and a per-channel scale.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

FP16 = 2  # bytes of a stored scale, offset or LUT entry
CHANNEL_GROUP = 16  # output channels sharing one LUT in coremltools' per-grouped-channel palettization


def quantized_weights(model: nn.Module) -> dict[int, tuple[str, nn.Parameter]]:
    """The weights every method compresses: each Linear and Embedding weight, tied ones once (by identity)."""
    found: dict[int, tuple[str, nn.Parameter]] = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            found.setdefault(id(module.weight), (name, module.weight))
    return found


def all_in_bytes(model: nn.Module, weight_bytes: Callable[[Tensor], int]) -> int:
    """The file size: ``weight_bytes(w)`` for each compressed weight, float32 for every other tensor (once each)."""
    compressed = quantized_weights(model)
    seen: set[int] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += weight_bytes(tensor) if id(tensor) in compressed else 4 * tensor.numel()
    return total


def block_bytes(bits: int, block: int) -> Callable[[Tensor], int]:
    """Codes of ``bits`` plus a float16 step and a float16 offset per block of ``block`` input weights."""

    def size(weight: Tensor) -> int:
        rows, cols = weight.shape
        return -(-weight.numel() * bits // 8) + rows * -(-cols // block) * 2 * FP16

    return size


@torch.no_grad()
def round_blocks(model: nn.Module, bits: int, block: int) -> None:
    """Asymmetric round-to-nearest of every compressed weight in place, blocks along the input axis."""
    for _, weight in quantized_weights(model).values():
        for part in torch.split(weight.data, block, dim=1):  # views: rounded in place
            part.copy_(_round(part, bits))


def _round(x: Tensor, bits: int) -> Tensor:
    low = x.amin(1, keepdim=True).half().float()
    step = ((x.amax(1, keepdim=True) - low) / (2**bits - 1)).half().float()
    code = torch.where(step > 0, ((x - low) / step).round().clamp(0, 2**bits - 1), torch.zeros_like(x))
    return code * step + low


@torch.no_grad()
def hqq_blocks(model: nn.Module, bits: int, block: int) -> None:
    """HQQ (``hqq.core.quantize.Quantizer``, offset optimised) in place; step and offset kept in float16."""
    from hqq.core.quantize import Quantizer

    for _, weight in quantized_weights(model).values():
        w = weight.data
        if w.shape[1] % block:
            raise ValueError(f"HQQ here needs blocks dividing the rows: {w.shape[1]} % {block}")
        codes, meta = Quantizer.quantize(w, nbits=bits, channel_wise=True, group_size=block, optimize=True,
                                         round_zero=False, axis=1, device="cpu", compute_dtype=torch.float32)  # fmt: skip
        meta["scale"] = meta["scale"].half().float()
        meta["zero"] = meta["zero"].half().float()
        w.copy_(Quantizer.dequantize(codes, meta).reshape(w.shape))


def lut_channel_bytes(bits: int, scale: bool = True) -> Callable[[Tensor], int]:
    """Codes of ``bits``, a float16 LUT per group of 16 output channels, a float16 scale per output channel."""

    def size(weight: Tensor) -> int:
        rows = weight.shape[0]
        return -(-weight.numel() * bits // 8) + -(-rows // CHANNEL_GROUP) * 2**bits * FP16 + scale * rows * FP16

    return size


def unless_unchanged(original: nn.Module, size: Callable[[Tensor], int]) -> Callable[[Tensor], int]:
    """``size``, except that a weight equal to the original's counts at float32 (a layer coremltools skipped)."""
    before = {tuple(w.shape): [] for _, w in quantized_weights(original).values()}
    for _, w in quantized_weights(original).values():
        before[tuple(w.shape)].append(w)

    def measured(weight: Tensor) -> int:
        if any(torch.equal(weight, w) for w in before.get(tuple(weight.shape), ())):
            return 4 * weight.numel()
        return size(weight)

    return measured


def coreml_layers(model: nn.Module, config: dict) -> dict:
    """coremltools' per-module config: every Linear and Embedding, but an embedding tied to a Linear once.

    coremltools compresses each module on its own: a tied weight would be
    palettized twice, its per-channel scale applied twice (measured: the
    embedding's relative error 18 instead of 0.2), so the tied embedding is
    left to the Linear that shares its weight.
    """
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    tied = {name: None for name, m in model.named_modules() if isinstance(m, nn.Embedding) and id(m.weight) in linear}
    return {"module_type_configs": {"Linear": config, "Embedding": config}, "module_name_configs": tied}


def coreml_post_training(model: nn.Module, bits: int) -> nn.Module:
    """coremltools' post-training palettization: per-grouped-channel LUTs (16 channels) and per-channel scales."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

        config = {"n_bits": bits, "granularity": "per_grouped_channel", "group_size": CHANNEL_GROUP,
                  "enable_per_channel_scale": True}  # fmt: skip
        options = PostTrainingPalettizerConfig.from_dict(coreml_layers(model, config))
        logging.disable(logging.INFO)  # its k-means logs every layer's progress
        try:
            return PostTrainingPalettizer(model, options).compress()
        finally:
            logging.disable(logging.NOTSET)

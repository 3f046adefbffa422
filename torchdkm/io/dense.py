"""Dense export: the snapped weights as an ordinary ``state_dict``, for runtimes that take dense weights.

A torchdkm file stores each palettized weight as ``<module>.<param>_indices``
+ ``<module>.<param>_lut``.  Runtimes that know nothing of LUTs (ONNX
importers, llama.cpp-style converters, plain ``load_state_dict``) want
``<module>.<param>`` instead.  Everything here decodes from the file alone
(no model code): the palette metadata says how to unpack each tensor.  The
decoded weights are bit-identical to what the palettized modules compute, so
a dense model loaded from this export gives exactly the same outputs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ..errors import TorchdkmError
from ..nn.palettized import PaletteSpec, PalettizedMixin
from ..nn.parametrization import dkm_parametrizations
from .format import honour_umask, read


def palettes(meta: dict[str, Any]) -> dict[str, PaletteSpec]:
    """Every palettized tensor of a file: ``"<module>.<param>"`` -> its spec."""
    found = {}
    for name, entry in meta["layers"].items():
        for param, raw in entry["params"].items():
            found[f"{name}.{param}" if name else param] = PaletteSpec.from_dict(raw)
    return found


def dense_tensors(meta: dict[str, Any], tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A file's tensors (as :func:`torchdkm.io.read` returns them) with every palette decoded."""
    out = dict(tensors)
    for key, spec in palettes(meta).items():
        packed, lut = out.pop(f"{key}_indices", None), out.pop(f"{key}_lut", None)
        scales, offsets = out.pop(f"{key}_scales", None), out.pop(f"{key}_offsets", None)
        if packed is None or lut is None:
            raise TorchdkmError(f"{key}: indices or LUT missing from the file")
        if spec.scale_block is not None and (scales is None or (spec.scale_offset and offsets is None)):
            raise TorchdkmError(f"{key}: block scales (or offsets) missing from the file")
        out[key] = spec.decode(packed, lut, scales, offsets)
    return out


@torch.no_grad()
def dense_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """A finalized model's ``state_dict`` with palettized weights decoded to dense tensors.

    Load it into the original (never palettized) architecture with ``load_state_dict``.
    """
    if dkm_parametrizations(model):
        raise TorchdkmError("dense export: the model still has DKM training layers; call torchdkm.finalize first")
    state = model.state_dict()
    for name, module in model.named_modules():
        if not isinstance(module, PalettizedMixin):
            continue
        prefix = f"{name}." if name else ""
        for param in module.palette:
            for part in ("indices", "lut", "scales", "offsets"):
                state.pop(f"{prefix}{param}_{part}", None)
            state[prefix + param] = module.decode(param)
    return state


def export_dense(source: nn.Module | str | os.PathLike, path: str | os.PathLike) -> Path:
    """Write a plain safetensors ``state_dict`` of snapped weights; returns ``path``.

    ``source`` is a finalized model or a torchdkm file (decoded without model
    code).  Tensors that share memory (tied weights) are written as separate
    copies: safetensors refuses shared storage and plain loaders expect every
    key to stand alone.
    """
    if isinstance(source, nn.Module):
        state = dense_state_dict(source)
    else:
        state = dense_tensors(*read(source))
    copies: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, tensor in state.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        copies[key] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    path = Path(path)
    save_file(copies, str(path), metadata={"format": "pt"})
    honour_umask(path)
    return path


__all__ = ["dense_state_dict", "dense_tensors", "export_dense", "palettes"]

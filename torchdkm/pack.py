"""Bit packing of indices: ``bits`` (1..8) per index, no wasted bits but the last byte's.

Layout: index ``i`` occupies bits ``[i * bits, (i + 1) * bits)`` of the stream,
least significant bit first, and stream bit ``b`` is bit ``b % 8`` of byte
``b // 8``.  This is the little-endian bit order numpy calls ``bitorder="little"``,
so the file can be read by any language without torchdkm.  Widths that divide
8 (1, 2, 4, 8) take a shift-and-or fast path; the others go through a bit matrix.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import TorchdkmError


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` indices of ``bits`` bits occupy."""
    return (count * bits + 7) // 8


def pack(indices: Tensor, bits: int) -> Tensor:
    """Pack a 1-D integer tensor of values in ``[0, 2**bits)`` into uint8."""
    _check_bits(bits)
    flat = indices.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise TorchdkmError(f"pack: indices must lie in [0, {1 << bits}) for bits={bits}")
    count = flat.numel()
    if bits == 8:
        return flat.to(torch.uint8)
    if 8 % bits == 0:
        per_byte = 8 // bits
        pad = (-count) % per_byte
        grouped = torch.nn.functional.pad(flat, (0, pad)).view(-1, per_byte)
        shifts = torch.arange(0, 8, bits, device=flat.device)
        return (grouped << shifts).sum(1).to(torch.uint8)
    bit_index = torch.arange(bits, device=flat.device)
    stream = ((flat.unsqueeze(1) >> bit_index) & 1).reshape(-1)
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8)).view(-1, 8)
    return (stream << torch.arange(8, device=flat.device)).sum(1).to(torch.uint8)


def unpack(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of :func:`pack`: the first ``count`` indices as int64."""
    _check_bits(bits)
    need = packed_size(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise TorchdkmError(
            f"unpack: expected {need} uint8 bytes for {count} indices of {bits} bits, "
            f"got {packed.numel()} of {packed.dtype}"
        )
    data = packed.to(torch.int64)
    if bits == 8:
        return data
    if 8 % bits == 0:
        shifts = torch.arange(0, 8, bits, device=packed.device)
        return ((data.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:count]
    stream = ((data.unsqueeze(1) >> torch.arange(8, device=packed.device)) & 1).reshape(-1)
    stream = stream[: count * bits].view(count, bits)
    return (stream << torch.arange(bits, device=packed.device)).sum(1)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
        raise TorchdkmError(f"bits={bits!r} is invalid: index bits must be an integer from 1 to 8")

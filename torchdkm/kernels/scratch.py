"""Per-thread scratch buffers for the largest temporaries of a pass.

glibc hands allocations of tens of MB back to the OS when they are freed, so a
map of that size allocated afresh every step comes back as zeroed pages: one
page fault per 4 KiB, ~10 ms per step for a 1M-weight layer's Gram map.  The
passes that make such a map write it into :func:`scratch` instead, which keeps
one buffer per thread, dtype and device (the largest asked for so far, bounded
by a pass's memory budget) per named slot; a slot holds one map at a time.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

_local = threading.local()


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, slot: str = "") -> Tensor:
    """An uninitialised contiguous tensor of ``shape``, valid until the next call for ``slot`` on this thread."""
    buffers: dict = _local.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    key = (slot, dtype, device)
    flat = buffers.get(key)
    if flat is None or flat.numel() < numel:
        flat = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return flat[:numel].view(shape)


def release_scratch() -> None:
    """Free this thread's scratch buffers (they come back, at their size, on the next pass)."""
    _local.__dict__.pop("buffers", None)


def like(t: Tensor, slot: str, shape: tuple[int, ...] | None = None) -> Tensor:
    """:func:`scratch` for a map of ``t``'s dtype and device, of ``t``'s shape or ``shape`` (its -1: ``t``'s last size)."""
    if shape is None:
        return scratch(tuple(t.shape), t.dtype, t.device, slot)
    return scratch(tuple(t.shape[-1] if size == -1 else size for size in shape), t.dtype, t.device, slot)

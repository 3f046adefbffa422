"""Per-block normalisation: each output channel cut into blocks along the input axis, one scale (and offset) each.

Language-model weights are heavy-tailed (a range of about +-5 around a standard
deviation of 0.2-0.3) and their scale varies from block to block: one LUT per
tensor cannot follow them.  Dividing every block of ``block`` consecutive
weights of a row by its own scale (its largest magnitude; with ``offset``,
half its range after subtracting its midpoint) maps every block onto
``[-1, 1]``, where one LUT fits them all.  DKM clusters the normalised weights;
the layer uses ``LUT[index] * scale (+ offset)``.

The scales are *derived* from the current weights at every step, not learned
parameters: they follow the weights as training moves them, cost no optimizer
state, and the gradient reaches the weights through them too (a block's
largest weight gets the gradient of its scale).  Scales and offsets are
stored in float16 and used rounded in training as in the file (straight
through), so :meth:`BlockScales.apply` on the stored values gives the exported
weight bit for bit.  A block of zeros has scale 0 and decodes to 0 (its offset).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

STORED = torch.float16


@dataclass(frozen=True)
class BlockScales:
    """The block structure of one weight: ``rows`` output channels of ``row_len`` weights, blocks of ``block``."""

    rows: int
    row_len: int
    block: int
    offset: bool

    @classmethod
    def of(cls, shape: tuple[int, ...] | torch.Size, block: int | None, offset: bool) -> BlockScales | None:
        """``None`` when ``block`` is ``None`` (no normalisation); ``0`` means one block per row."""
        if block is None:
            return None
        shape = tuple(int(s) for s in shape)
        rows = shape[0] if shape else 1
        row_len = math.prod(shape[1:]) if len(shape) > 1 else 1
        return cls(rows, row_len, min(block or row_len, row_len), offset)

    @property
    def blocks(self) -> int:
        """Blocks per row (the last may be shorter)."""
        return -(-self.row_len // self.block)

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the stored scales (and offsets)."""
        return (self.rows, self.blocks)

    @property
    def stored_bytes(self) -> int:
        return self.rows * self.blocks * STORED.itemsize * (2 if self.offset else 1)

    def _blocked(self, weight: Tensor) -> Tensor:
        """``(rows, blocks, block)``: the rows cut into blocks, a short last block padded with its own last value."""
        flat = weight.reshape(self.rows, self.row_len)
        pad = self.blocks * self.block - self.row_len
        if pad:
            flat = torch.nn.functional.pad(flat.unsqueeze(1), (0, pad), mode="replicate").squeeze(1)
        return flat.view(self.rows, self.blocks, self.block)

    def _expand(self, per_block: Tensor) -> Tensor:
        """``(rows, row_len)``: each block's value repeated over its weights."""
        return per_block.repeat_interleave(self.block, dim=1)[:, : self.row_len]

    def stats(self, weight: Tensor) -> tuple[Tensor, Tensor | None]:
        """Each block's scale and offset, rounded to float16 (straight through), in ``weight``'s dtype."""
        blocked = self._blocked(weight)
        if self.offset:
            high, low = blocked.amax(-1), blocked.amin(-1)
            scale, offset = (high - low) / 2, (high + low) / 2
            return _stored(scale), _stored(offset)
        return _stored(blocked.abs().amax(-1)), None

    def normalise(self, weight: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """``((weight - offset) / scale, scale, offset)``, differentiable; the first shaped like ``weight``."""
        scale, offset = self.stats(weight)
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        flat = weight.reshape(self.rows, self.row_len)
        if offset is not None:
            flat = flat - self._expand(offset)
        return (flat / self._expand(safe)).reshape(weight.shape), scale, offset

    def apply(self, normalised: Tensor, scale: Tensor, offset: Tensor | None) -> Tensor:
        """``normalised * scale (+ offset)`` in ``normalised``'s dtype: the decoded weight."""
        flat = normalised.reshape(self.rows, self.row_len) * self._expand(scale.to(normalised.dtype))
        if offset is not None:
            flat = flat + self._expand(offset.to(normalised.dtype))
        return flat.reshape(normalised.shape)


def _stored(value: Tensor) -> Tensor:
    """``value`` as float16 would store it, in its own dtype, with the gradient passed straight through."""
    rounded = value.detach().to(STORED).to(value.dtype)
    return rounded + (value - value.detach())  # (exactly ``rounded``: x - x is 0)

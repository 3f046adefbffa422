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

Both directions are one :class:`torch.autograd.Function` each, whose passes over
the weights are kernels of :mod:`torchdkm.kernels` (``normalise``, ``rescale``
and their gradients: one native loop apiece on the CPU).  Written as a chain of
torch ops, the normalisation and its autograd backward made some twenty passes
over the weights, each with a full-size temporary (``amax``'s tie masks, the
expanded scales, the division's two gradients); here the forward reads the
weights three times (largest and smallest value per block, then the division)
and the backward once, recomputing the normalised weight on the fly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kernels import Kernels, default

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

    def flat(self, weight: Tensor) -> Tensor:
        return weight.reshape(self.rows, self.row_len)

    @torch.no_grad()
    def bounds(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        """Each block's largest and smallest value ``(rows, blocks)`` (NaN where the block has one)."""
        blocked = default.blocked(self.flat(weight.detach()), self.block, "replicate")
        return blocked.amax(-1), blocked.amin(-1)

    def normalise(
        self, weight: Tensor, kernels: Kernels | None = None, bounds: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """``((weight - offset) / scale, scale, offset)``, differentiable; the first shaped like ``weight``.

        Scales and offsets are float16 values in ``weight``'s dtype (the gradient passes the rounding
        straight through).  ``kernels``: the layer's (default: the torch ones); ``bounds``: :meth:`bounds`
        of ``weight``, if already known.
        """
        high, low = self.bounds(weight) if bounds is None else bounds
        return _Normalise.apply(weight, self, kernels, high, low)

    def apply(
        self, normalised: Tensor, scale: Tensor, offset: Tensor | None, kernels: Kernels | None = None
    ) -> Tensor:
        """``normalised * scale (+ offset)`` in ``normalised``'s dtype: the decoded weight (differentiable)."""
        return _Rescale.apply(normalised, scale, offset, self, kernels)


def stored(value: Tensor) -> Tensor:
    """``value`` as float16 would store it, in its own dtype."""
    return value.to(STORED).to(value.dtype)


class _Normalise(torch.autograd.Function):
    """``weight -> (normalised, scale, offset)`` with the scales derived from the blocks (one backward pass)."""

    @staticmethod
    def forward(ctx, weight, blocks, kernels, high, low):  # type: ignore[override]
        run = kernels or default
        if blocks.offset:
            scale, offset = stored((high - low) / 2), stored((high + low) / 2)
        else:
            high, low = torch.maximum(high, -low), None  # the largest magnitude
            scale, offset = stored(high), None
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        normalised = run.normalise(blocks.flat(weight), blocks.block, safe, offset).view(weight.shape)
        ctx.save_for_backward(weight, scale, safe, offset, high, low)
        ctx.blocks, ctx.run = blocks, run
        ctx.set_materialize_grads(False)
        return normalised, scale, offset

    @staticmethod
    def backward(ctx, grad, grad_scale, grad_offset):  # type: ignore[override]
        weight, scale, safe, offset, high, low = ctx.saved_tensors
        blocks = ctx.blocks
        if grad is None:
            grad = torch.zeros_like(weight)
        out = ctx.run.normalise_grad(
            blocks.flat(grad), blocks.flat(weight), blocks.block, scale, safe, offset, high, low, grad_scale,
            grad_offset,
        )  # fmt: skip
        return out.view(weight.shape), None, None, None, None


class _Rescale(torch.autograd.Function):
    """``(normalised, scale, offset) -> normalised * scale + offset``, its backward one pass."""

    @staticmethod
    def forward(ctx, normalised, scale, offset, blocks, kernels):  # type: ignore[override]
        run = kernels or default
        dtype = normalised.dtype
        s, o = scale.to(dtype), None if offset is None else offset.to(dtype)
        out = run.rescale(blocks.flat(normalised), blocks.block, s, o).view(normalised.shape)
        ctx.save_for_backward(normalised, s)
        ctx.blocks, ctx.run, ctx.dtypes = blocks, run, (scale.dtype, None if offset is None else offset.dtype)
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if grad is None:
            return None, None, None, None, None
        normalised, s = ctx.saved_tensors
        blocks = ctx.blocks
        grad_n, grad_scale, grad_offset = ctx.run.rescale_grad(
            blocks.flat(grad), blocks.flat(normalised), blocks.block, s
        )
        scale_dtype, offset_dtype = ctx.dtypes
        grad_offset = None if offset_dtype is None else grad_offset.to(offset_dtype)
        return grad_n.view(grad.shape), grad_scale.to(scale_dtype), grad_offset, None, None

"""How a weight tensor is cut into groups of ``dim``-long vectors, and put back.

The first axis of a weight is its output-channel axis (Linear, ConvNd) or its
row axis (Embedding).  Channels are taken ``group_size`` at a time; each group
has its own LUT.  Inside a group the weights are read in memory order (along
the input-channel / kernel axes) and cut into vectors of ``dim`` values.

When a group's weight count is not a multiple of ``dim`` its last vector is
*partial*: its missing values are zero padding.  Padding never leaks: partial
and fully padded vectors carry multiplicity 0, so they never move a centroid,
and a partial vector is assigned by the distance over its real values only.
A last group with fewer channels is padded with whole zero vectors the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Layout:
    shape: tuple[int, ...]
    dim: int
    group_size: int

    @classmethod
    def of(cls, shape: tuple[int, ...] | torch.Size, dim: int, group_size: int | None) -> Layout:
        shape = tuple(int(s) for s in shape)
        out = shape[0] if shape else 1
        return cls(shape, dim, min(group_size or out, out))

    @property
    def out(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_len(self) -> int:
        return math.prod(self.shape[1:]) if len(self.shape) > 1 else 1

    @property
    def numel(self) -> int:
        return self.out * self.row_len

    @property
    def groups(self) -> int:
        return -(-self.out // self.group_size)

    @property
    def group_numel(self) -> int:
        return self.group_size * self.row_len

    @property
    def vectors(self) -> int:
        """Vectors per group (padding included): the length of each index row."""
        return -(-self.group_numel // self.dim)

    def real_counts(self) -> list[int]:
        """Real (unpadded) weight count of each group."""
        counts = [self.group_numel] * self.groups
        counts[-1] = self.numel - (self.groups - 1) * self.group_numel
        return counts

    def partial_vectors(self) -> list[tuple[int, int, int]]:
        """``(group, vector, real_len)`` of every vector that is part padding."""
        return [(g, c // self.dim, c % self.dim) for g, c in enumerate(self.real_counts()) if c % self.dim]

    @property
    def padded(self) -> bool:
        return self.groups * self.vectors * self.dim != self.numel

    def to_vectors(self, weight: Tensor) -> Tensor:
        """``(G, n, dim)`` view (a zero-padded copy when padding is needed)."""
        flat = weight.reshape(-1)
        total = self.groups * self.vectors * self.dim
        if not self.padded:
            return flat.view(self.groups, self.vectors, self.dim)
        rows = weight.reshape(self.out, self.row_len)
        pad_rows = self.groups * self.group_size - self.out
        if pad_rows:
            rows = torch.cat([rows, rows.new_zeros(pad_rows, self.row_len)])
        grouped = rows.reshape(self.groups, self.group_numel)
        tail = self.vectors * self.dim - self.group_numel
        if tail:
            grouped = torch.nn.functional.pad(grouped, (0, tail))
        assert grouped.numel() == total
        return grouped.view(self.groups, self.vectors, self.dim)

    def from_vectors(self, vectors: Tensor) -> Tensor:
        """Inverse of :meth:`to_vectors`: drop the padding, restore the shape."""
        if not self.padded:
            return vectors.reshape(self.shape)
        grouped = vectors.reshape(self.groups, self.vectors * self.dim)[:, : self.group_numel]
        rows = grouped.reshape(self.groups * self.group_size, self.row_len)[: self.out]
        return rows.reshape(self.shape)

    def decode(self, index: Tensor, lut: Tensor) -> Tensor:
        """Dense weight from indices ``(G, n)`` and a ``(G, k, dim)`` LUT."""
        vectors = torch.gather(lut, 1, index.unsqueeze(-1).expand(-1, -1, lut.shape[-1]))
        return self.from_vectors(vectors)

    def multiplicity(self, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        """``(G, n)``: 1 for whole vectors, 0 for partial or padding; ``None`` if none is padded."""
        if not self.padded:
            return None
        m = torch.zeros(self.groups, self.vectors, dtype=dtype, device=device)
        for g, count in enumerate(self.real_counts()):
            m[g, : count // self.dim] = 1
        return m

    def partial_mask(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor] | None:
        """Groups, vector positions and ``(P, dim)`` real-value masks of partial vectors."""
        parts = self.partial_vectors()
        if not parts:
            return None
        groups = torch.tensor([p[0] for p in parts], device=device)
        index = torch.tensor([p[1] for p in parts], device=device)
        mask = (
            torch.arange(self.dim, device=device)[None, :] < torch.tensor([p[2] for p in parts], device=device)[:, None]
        )
        return groups, index, mask

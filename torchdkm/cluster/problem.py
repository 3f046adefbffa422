"""One clustering problem, as every attention variant and the shared fixed-point code read it.

Shapes: ``x`` is ``(G, n, d)`` (G independent groups of n vectors), ``m`` is
``(G, n)`` vector multiplicities (1 for an ordinary vector, the count of a
distinct value when uniquified, 0 for padding, the importance of each vector or
distinct value when weighed, see ``WeightClusterer.weigh``; ``None`` means all 1), the
centroids are ``(G, k, d)`` and ``tau`` is ``(G,)`` absolute temperatures.
Several small layers may share one problem (:mod:`.batch`): ``members`` then
says which layer each group belongs to, and the stopping rules apply per layer.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class Problem:
    """The vectors to cluster and how: temperature, stopping rules, memory budget.

    ``tol`` (G,) is the absolute centroid move at which the iterations stop;
    ``grad_tol`` the relative size at which the backward's Neumann series
    stops; ``budget`` the bytes of temporaries (attention maps, Gram weights)
    a pass may hold at one time, from which each variant works out its rows
    per chunk (:func:`rows_for`).
    """

    x: Tensor
    m: Tensor | None
    k: int
    tau: Tensor
    tol: Tensor
    max_iters: int
    grad_tol: float
    budget: float
    #: ``(G,)`` int64: the layer each group belongs to, numbered from 0 in order (``None``: one layer)
    members: Tensor | None = None
    #: the backward's Neumann terms in place of the exact solve (0: solve; see ``LayerConfig.terms``)
    grad_terms: int = 0

    @property
    def groups(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[2]

    @property
    def rows(self) -> int:
        """Rows per chunk of the dense passes (:func:`rows_for` of the budget)."""
        return rows_for(self.budget, self.groups, self.k, self.dim, self.x.element_size())


def per_member(problem: Problem, per_group: Tensor) -> Tensor:
    """Sum ``(G,)`` values over each member's groups: ``(members,)``."""
    assert problem.members is not None
    count = int(problem.members[-1]) + 1
    return per_group.new_zeros(count).index_add_(0, problem.members, per_group)


def gram_terms(dim: int) -> int:
    """How many row weights the backward's Gram sums take: ``1, x_a, x_a x_b (a <= b)``."""
    return 1 + dim + dim * (dim + 1) // 2


def rows_for(budget: float, groups: int, k: int, dim: int, itemsize: int) -> int:
    """Rows per chunk so that a chunk's temporaries fit ``budget`` bytes.

    The backward's Gram matrices weight the attention chunk ``gram_terms(dim)``
    ways at once; other temporaries are a few ``k x rows`` maps.
    """
    per_row = groups * ((6 + gram_terms(dim)) * k + 4 * dim) * itemsize
    return max(1, int(budget // per_row))


def row_chunks(n: int, rows: int, first: int = 0, last: int | None = None) -> Iterator[slice]:
    """Slices of at most ``rows`` rows covering ``[first, last)`` (default all ``n``)."""
    stop = n if last is None else last
    for start in range(first, stop, rows):
        yield slice(start, min(start + rows, stop))

"""The sparse attention: each row attends to its nearest few centroids (top-m), with a bound on what it drops.

At the temperatures DKM trains with, a row of ``A = softmax_j(-|x_i - c_j|^2 / tau)``
has almost all its mass on 1-3 centroids.  Here each row keeps a *set* ``S_i``
of centroids and its attention is the softmax over ``S_i`` only, renormalised:

    A~_ij = exp(-|x_i - c_j|^2 / tau) / sum_{l in S_i} exp(-|x_i - c_l|^2 / tau)   (j in S_i; else 0).

``S_i`` is the row's ``top`` nearest centroids, or its nearest alone (a *hard*
row, ``A~`` one-hot) when the mass on every other centroid is provably below
``eps * exp(-HARD_MARGIN)`` (``eps`` of the dtype): ~90% of the rows of 4-bit
Gaussian weights.  A hard row costs nothing per iteration (its share of
``A~^T m x`` and ``A~^T m``, and of the backward's Gram sums, is constant,
summed once when it is chosen), one gather for the output and one scatter in
the backward, all in row order (a spare key takes the soft rows).  The other rows work on
``(top x rows)`` maps with gathers of centroids and scatter-adds into them:
the update ``F~``, the output ``A~ c``, the backward's output gradient and
direct term, the Gram sums of ``dF~/dc`` (per kept entry, and per pair of kept
entries of a row for the off-diagonal ``sum_i w_i A~_ij A~_il``) and the
adjoint pass.  ``F~``, its fixed point and its implicit gradient are those of
:mod:`.engine` with ``A~`` for ``A``: the backward is the exact gradient of the
sparse forward (the sets are piecewise constant in ``x``), with the same
structure (two chunked passes, one ``(k d) x (k d)`` solve, formed in float64),
saving ``x, m, c*, tau``, the sets (one byte per kept entry for ``k <= 256``),
a flag per row and the hard rows' Gram sums, independent of the iterations.

Approximation.  Per row, the mass the dense softmax puts outside ``S_i`` is

    dropped_i = sum_{j not in S_i} A_ij <= (k - |S_i|) exp(-(L_i - D_i) / tau)

where ``D_i`` is the squared distance to the nearest centroid and ``L_i`` a
lower bound on the squared distance to every centroid outside ``S_i`` (at
selection, the ``(|S_i| + 1)``-th smallest, so the bound is at most ``(k - top)
exp(-gap_i / tau)``, ``gap_i`` between the nearest and the first dropped
centroid, and at most the looser ``(k - top) exp(-(d_(top+1) - d_(top)) /
tau)``).  ``A~`` differs from ``A`` by at most ``2 dropped_i`` in L1 per row,
so an output row moves by at most ``2 dropped_i max_j |c_j|``.  Entries
below ``eps^2`` of their row's largest are set to 0 (that keeps subnormals,
very slow on CPUs, out of every product).  :attr:`SparseAttention.dropped`
holds, per group, a bound on ``dropped_i`` over the real rows
(multiplicity > 0) and every attention evaluation of the call.

Selection.  The sets come from the layer's ``row_sets`` kernel
(:mod:`torchdkm.kernels`).  The torch kernel makes one ``(k x rows)`` pass of
squared distances (a matmul for vectors, exact differences for scalars) whose
float bits carry the centroid index in their lowest ``ceil(log2 k)`` bits
(used for ranking only; the bounds use the packed values rounded the safe
way), and rounds of an ``amin`` along the centroid axis, each followed by an
integer rotation that sends what it found to the top (no sort, no strided
``topk``): two rounds for every row decide which rows are hard, ``top + 1``
for the others; the nearest two are what the layer's temperature reads too
(:func:`~torchdkm.kernels.ranking.rank_vectors`, passed in as ``ranked``).
The native loop computes each row's distances in double from the
differences, so its bounds are tighter (a row hard for the torch kernel is
hard for it), and scores the row in the same pass.  The kept logits are then
recomputed exactly from ``x_i - c_j``.  The sets are chosen at the centroids
the call starts from and kept while the centroids move: moves of at most
``delta`` lower ``L_i`` to ``(sqrt(L_i) - delta)^2`` and raise ``D_i`` to ``(sqrt(D_i) + delta)^2``, so
each row has a *slack*, the move after which its bound could exceed both
``eps`` and ``exp(RESELECT)`` times its value when chosen.  Before each
evaluation, the rows whose slack the centroids have outrun are chosen again at
the current centroids (a few percent of the rows per iteration when k-means
is still drifting; none when the centroids have settled).  The soft rows are
laid out for the evaluations as they are chosen (the rows chosen again leave
their chunks), so no evaluation gathers them from the whole layer.

With ``top >= k`` every centroid is kept: the result is the dense op's up to
rounding, and the dropped mass is 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import Kernels
from ..kernels.default import row_weights
from ..kernels.ranking import Ranking, no_autocast
from .engine import EMPTY_MASS, Attention, GramSums, explicit
from .problem import Problem, gram_terms, row_chunks
from .rows import (
    Data,
    RowLayout,
    attend,
    centroid_table,
    gather_rows,
    layout_bytes,
    row_layout,
    with_spare,
)
from .selection import Selection, current, select


class SparseAttention(Attention):
    """``A~`` over a :class:`.Problem`: each row's softmax over its set (see the module docstring).

    ``dropped`` (G,) bounds, after the forward, the attention mass any real row
    (multiplicity > 0) left out in any evaluation (0 when ``top >= k``).
    ``kernels``: the layer's (:func:`torchdkm.kernels.select`; the sets come from
    its ``row_sets``, every sum from its ``scatter``).  ``ranked``:
    :func:`~torchdkm.kernels.ranking.rank_vectors` of the vectors at the first
    centroids, when the caller has it (ignored if ranked at other centroids).
    """

    def __init__(self, problem: Problem, top: int, kernels: Kernels, ranked: Ranking | None = None):
        if top < 1:
            raise ValueError(f"top must be >= 1, got {top}")
        self.problem = problem
        self.top = min(top, problem.k)
        self.ranked = ranked
        self.kernels = kernels
        self.scatter = kernels.scatter
        self.data: Data | None = Data.of(
            problem.x, problem.m, problem.k, problem.budget, kernels, None if ranked is None else ranked.xf
        )
        self.sel: Selection | None = None
        self.soft: list | None = None
        self.dropped = problem.x.new_zeros(problem.groups)
        # kept from the forward for the backward: the sets, and the row layout while it fits the budget
        self.index = self.hard = self.hard_sums = None
        self.layout: RowLayout | None = None
        self.order: list[Tensor] | None = None  # the soft rows' chunks, to lay them out again the same way
        self.dx_rows: Tensor | None = None
        self.kept: list[tuple[Tensor, Tensor]] | None = None

    # -- forward --------------------------------------------------------------
    def _sets(self, c: Tensor) -> tuple[Selection, list]:
        """The selection and soft rows to evaluate at ``c`` (chosen first, or chosen again where stale)."""
        assert self.data is not None
        tau = self.problem.tau
        if self.sel is None:
            ranked = self.ranked
            if ranked is not None and not (ranked.c is c or torch.equal(ranked.c, c)):
                ranked = None  # ranked at other centroids
            self.sel, self.ranked = select(self.data, c, tau, self.top, ranked), None
        self.sel, self.soft, dropped = current(self.data, self.sel, self.soft, c, tau)
        self.dropped = torch.maximum(self.dropped, dropped)
        return self.sel, self.soft

    def update(self, c: Tensor) -> Tensor:
        with no_autocast(c.device):
            sel, soft = self._sets(c)
            g, k, d = c.shape
            ct = centroid_table(c)
            sums = sel.hard_sums[: 1 + d].clone()  # A~^T m, A~^T m x: the hard rows' part is constant
            for ch in soft:
                src = c.new_empty(1 + d, *ch.keys.shape)
                attend(ch, ct, out=src[0])
                if ch.m is not None:
                    src[0].mul_(ch.m)
                torch.mul(src[0].unsqueeze(0), ch.xt.unsqueeze(1), out=src[1:])
                self.scatter(sums, ch.keys.view(-1), src)
        den, num = sums[0].view(g, k), sums[1:].view(d, g, k).permute(1, 2, 0)
        full = den > EMPTY_MASS
        mean = (num / den.clamp_min(EMPTY_MASS).unsqueeze(-1)).to(c.dtype)
        return torch.where(full.unsqueeze(-1), mean, c).contiguous()

    def output(self, c: Tensor) -> Tensor:
        data = self.data
        assert data is not None
        with no_autocast(c.device):
            sel, soft = self._sets(c)
            lay = row_layout(data, sel.index, sel.hard, c.shape[1], self.problem.tau, soft)
            d, g, n = data.xf.shape
            ct = centroid_table(c)
            out = gather_rows(with_spare(ct).t(), lay.hard_keys)  # (G n, d); soft rows overwritten below
            for ch in lay.soft:
                a, dcx = attend(ch, ct)
                # A~ c = x + sum_j A~_ij (c_j - x_i): the rows of A~ sum to 1
                out.index_copy_(0, ch.rows, (a.unsqueeze(0) * dcx).sum(1).add_(ch.xt).t())
        self.index, self.hard, self.hard_sums = sel.index, sel.hard, sel.hard_sums
        # the flat layout is kept for backward when it fits the budget (else rebuilt there)
        self.layout = lay if layout_bytes(data, lay) <= data.budget else None
        self.sel = self.soft = None
        if self.layout is None:
            self.data = None
        return out.view(g, n, d)

    # -- backward -------------------------------------------------------------
    def _prepared(self) -> tuple[Data, RowLayout]:
        """The forward's data and layout, or the same again (in the forward's chunks, if known)."""
        if self.layout is not None and self.data is not None:
            return self.data, self.layout
        p = self.problem
        data = Data.of(p.x, p.m, p.k, p.budget, self.kernels)
        return data, row_layout(data, self.index, self.hard, p.k, p.tau, order=self.order)

    def gram_pass(self, c: Tensor, grad_w: Tensor | None, grad_c: Tensor | None) -> GramSums:
        """Pass 1 of :func:`.engine.backward` with ``A~`` for ``A``.

        It scatter-adds, per kept entry, the Gram sums ``sum_i w_i A~_ij``
        (``w`` = ``m, m x_a, m x_a x_b``) and, per pair of kept entries of a row,
        the off-diagonal ``sum_i w_i A~_ij A~_il``; the diagonal follows from
        ``sum_l A~_il = 1``.  As ``sum_j A~_ij = 1``, the terms in ``c_j`` become
        terms in ``c_j - x_i``: the output's gradient into ``c*`` is ``sum_i A~_ij
        g_i - (2/tau) sum_i s_ij (c_j - x_i)`` and its direct term ``(2/tau) sum_j
        s_ij (c_j - x_i)``, ``s`` the gradient into the logits, 0 for hard rows.
        The small ``(G, k, ...)`` algebra runs in float64: ``dF~/dc`` cancels large
        terms (``S_j - D_j c_j c_j^T``, ...) and the solve amplifies what is left.
        """
        with no_autocast(c.device):
            return self._gram_pass(c, grad_w, grad_c)

    def _gram_pass(self, c: Tensor, grad_w: Tensor | None, grad_c: Tensor | None) -> GramSums:
        g, k, d = c.shape
        data, lay = self._prepared()
        self.data, self.layout = data, lay
        n, top = data.x.shape[1], self.index.shape[1]
        p_terms = gram_terms(d)
        ct = centroid_table(c)
        self.dx_rows = c.new_zeros(g * n, d)
        dx = self.dx_rows.t()  # (d, G n), a view: the result needs no transpose
        pairs = [(u, v) for u in range(top) for v in range(u + 1, top)] if explicit(self.problem) else []
        grad_rows = None if grad_w is None else grad_w.reshape(g * n, d)
        gf = None if grad_rows is None else grad_rows.t()
        # per centroid: the P Gram sums, then (with grad_w) A~^T g (d) and sum_i s_ij (c_j - x_i) (d)
        cols = p_terms + (2 * d if gf is not None else 0)
        spare = torch.zeros(cols, g * k + 1, dtype=torch.float64, device=c.device)  # + the soft rows' spare bin
        sums = spare[:, : g * k]
        sums[:p_terms] += self._hard_sums(data, lay, g * k)
        if gf is not None:
            self.scatter(spare[p_terms : p_terms + d], lay.hard_keys, gf)
        pair_sums = torch.zeros(p_terms, g * k * k, dtype=torch.float64, device=c.device) if pairs else None
        pair_u = torch.tensor([u for u, _ in pairs], dtype=torch.long, device=c.device)
        pair_v = torch.tensor([v for _, v in pairs], dtype=torch.long, device=c.device)
        kept_bytes = sum(ch.keys.numel() for ch in lay.soft) * (d + 1) * c.element_size()
        self.kept = [] if kept_bytes <= data.budget else None

        for ch in lay.soft:
            a, dcx = attend(ch, ct)
            if self.kept is not None:
                self.kept.append((a, dcx))
            weights = row_weights(ch.xt, ch.m)  # (P, r)
            src = c.new_empty(cols, *a.shape)
            torch.mul(a.unsqueeze(0), weights.unsqueeze(1), out=src[:p_terms])
            if gf is not None:
                gs = gather_rows(grad_rows, ch.rows).t().unsqueeze(1)  # (d, 1, r)
                gd = (gs * dcx).sum(0)  # (T, r): g_i . (c_j - x_i)
                sa = a * (gd - (a * gd).sum(0, keepdim=True))  # dL/dlogits
                torch.mul(a.unsqueeze(0), gs, out=src[p_terms : p_terms + d])
                torch.mul(sa.unsqueeze(0), dcx, out=src[p_terms + d :])
                dx.index_add_(1, ch.rows, src[p_terms + d :].sum(1).mul_(2.0 * ch.inv_tau))
            self.scatter(sums, ch.keys.view(-1), src)
            if pair_sums is not None:
                first = ch.keys.index_select(0, pair_u)  # (Q, r)
                second = ch.keys.index_select(0, pair_v)
                if g > 1:
                    second = second % k
                prod = a.index_select(0, pair_u).mul_(a.index_select(0, pair_v))
                # out=: a broadcast product allocated by torch itself gets a layout many times slower to write
                src = c.new_empty(p_terms, *prod.shape)
                torch.mul(prod.unsqueeze(0), weights.unsqueeze(1), out=src)
                self.scatter(pair_sums, first.mul_(k).add_(second).view(-1), src)

        two_over_tau = (2.0 / self.problem.tau).double().view(-1, 1, 1)
        totals = sums.view(cols, g, k).permute(1, 2, 0)  # (G, k, cols)
        gram_sums = totals[..., :p_terms]
        gc = torch.zeros_like(c, dtype=torch.float64) if grad_c is None else grad_c.double()
        if gf is not None:
            gc = gc + totals[..., p_terms : p_terms + d] - two_over_tau * totals[..., p_terms + d :]
        grams = _grams(gram_sums, pair_sums, k) if explicit(self.problem) else None
        return GramSums(gram_sums, grams, gc)

    def _hard_sums(self, data: Data, lay: RowLayout, bins: int) -> Tensor:
        """``(P, bins)`` float64: the hard rows' Gram weights summed per centroid.

        The selection summed all ``P`` of them, or the first ``1 + d`` (the rest are summed here).
        """
        first = self.hard_sums
        d = data.xf.shape[0]
        p_terms = gram_terms(d)
        if first is not None and first.shape[0] == p_terms:
            return first.clone()
        sums = torch.zeros(p_terms, bins + 1, dtype=torch.float64, device=data.xf.device)  # + the spare bin
        if first is not None:
            sums[: 1 + d, :bins] = first
        start = 1 + d if first is not None else 0
        xf = data.xf.reshape(d, -1)  # (the spare bin takes the soft rows' terms)
        for s in row_chunks(lay.hard_keys.numel(), data.rows):
            m = None if lay.hard_m is None else lay.hard_m[s]
            self.kernels.gram_scatter(sums[start:], lay.hard_keys[s], xf[:, s], m, start)
        return sums[:, :bins]

    def adjoint_pass(self, c: Tensor, u: Tensor, want_next: bool) -> Tensor | None:
        """Add ``(dF~/dx)^T v`` to the input gradient for ``u = v / D``; optionally return ``(dF~/dc)^T v``.

        With ``q_ij = (x_i - c_j) . u_j m_i`` and ``t = A~ (q - sum_j A~_ij q_ij)``
        (whose rows sum to 0; 0 for hard rows): ``dx_i = m_i sum_j A~_ij u_j +
        (2/tau) sum_j t_ij (c_j - x_i)`` and ``(dF~/dc)^T v = -(2/tau) sum_i t_ij (c_j - x_i)``.
        """
        lay, kept = self.layout, self.kept
        assert lay is not None and self.dx_rows is not None
        dx = self.dx_rows.t()
        g, k, d = c.shape
        ct, ut = centroid_table(c), centroid_table(u)
        sums = torch.zeros(d, g * k, dtype=torch.float64, device=c.device) if want_next else None
        hard = gather_rows(with_spare(ut).t(), lay.hard_keys)  # (G n, d), 0 for the soft rows
        dx.t().add_(hard if lay.hard_m is None else hard.mul_(lay.hard_m.unsqueeze(1)))
        for i, ch in enumerate(lay.soft):
            a, dcx = kept[i] if kept is not None else attend(ch, ct)
            t, r = ch.keys.shape
            ug = ut.index_select(1, ch.keys.view(-1)).view(d, t, r)
            q = (dcx * ug).sum(0).neg_()  # (T, r): (x_i - c_j) . u_j
            if ch.m is not None:
                q = q * ch.m
            tt = a * (q - (a * q).sum(0, keepdim=True))
            tdcx = tt.unsqueeze(0) * dcx  # (d, T, r)
            if sums is not None:
                self.scatter(sums, ch.keys.view(-1), tdcx.mul(ch.inv_tau))
            dxs = (a.unsqueeze(0) * ug).sum(1)  # (d, r)
            if ch.m is not None:
                dxs = dxs * ch.m
            dx.index_add_(1, ch.rows, dxs.add_(tdcx.sum(1).mul_(2.0 * ch.inv_tau)))
        if sums is None:
            return None
        return -2.0 * sums.to(c.dtype).view(d, g, k).permute(1, 2, 0)

    def input_grad(self) -> Tensor:
        assert self.dx_rows is not None and self.layout is not None
        g, n, d = self.problem.x.shape
        dx = self.dx_rows.view(g, n, d)
        # the layout is dropped (rebuilt, in the same chunks, if backward runs again); its chunks' rows are small
        self.order = [ch.rows for ch in self.layout.soft]
        self.dx_rows = self.kept = self.layout = self.data = None
        return dx


def _grams(sums: Tensor, pair_sums: Tensor | None, k: int) -> Tensor:
    """``(G, P, k, k)`` Gram matrices ``sum_i w_i A~_ij A~_il`` from the per-centroid and off-diagonal pair sums."""
    g, _, p_terms = sums.shape
    grams = sums.new_zeros(g, p_terms, k, k)
    if pair_sums is not None:
        pair = pair_sums.view(p_terms, g, k, k).transpose(0, 1)  # [j, l]: pairs met with j in the earlier slot
        grams = pair + pair.transpose(-1, -2)
    idx = torch.arange(k, device=sums.device)
    # sum_l A~_il = 1: the diagonal is the per-centroid sum less the row's off-diagonal entries
    grams[:, :, idx, idx] = sums.permute(0, 2, 1) - grams.sum(-1)
    return grams

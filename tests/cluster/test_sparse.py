"""Top-m sparse DKM (``torchdkm.cluster.sparse``): equal to the dense op with every centroid kept, close to it
with a few, and the dropped-mass bound it reports is a true bound.  Every test runs with the native
scatter-adds and with the torch kernels, chosen through ``backend``."""

from __future__ import annotations

import math

import engine_api
import pytest
import torch
from torch.autograd import gradcheck

from torchdkm.cluster import selection
from torchdkm.cluster.hard import nearest_two
from torchdkm.cluster.rows import SoftChunk, attention_floor, gather_rows, merged, soft_layout
from torchdkm.config import LayerConfig
from torchdkm.kernels import default
from torchdkm.kernels import select as select_kernels
from torchdkm.kernels.ranking import coordinate_major, rank_vectors, smallest

F64 = torch.float64
BACKEND = {"name": None}


@pytest.fixture(autouse=True)
def chosen_backend(backend, monkeypatch):
    """Every sparse op of a test scatters with the ``backend`` fixture's kernels."""
    monkeypatch.setitem(BACKEND, "name", backend)
    return backend


def dkm_sparse(*args, **kwargs):
    return engine_api.dkm_sparse(*args, backend=BACKEND["name"], **kwargs)


def sparse_iterate(*args):
    return engine_api.sparse_iterate(*args, backend=BACKEND["name"])


def select(x, m, c, tau, top, rows):
    return selection.select(engine_api.data(x, m, c.shape[1], rows, BACKEND["name"]), c, tau, top)


def problem(groups, n, d, k, *, seed=0, with_m=False, pad=0, dtype=F64):
    """Random vectors, multiplicities in [0.25, 2.25) (the last ``pad`` rows 0) and centroids near the first k."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, n, d, generator=g, dtype=dtype)
    c0 = x[:, :k].clone() + 0.1
    m = torch.rand(groups, n, generator=g, dtype=dtype) * 2 + 0.25 if with_m or pad else None
    if pad:
        m[:, n - pad :] = 0
    return x, m, c0


def gaussian_layer(n, d, k, *, seed=0, dtype=F64):
    """Gaussian weights as the layer sees them: k-means centroids and its temperature (``tau`` in margins)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(1, n, d, generator=g, dtype=dtype) * 0.02).contiguous()
    c = x[:, torch.randperm(n, generator=g)[:k]].clone()
    for _ in range(30):  # Lloyd
        index = torch.cdist(x[0], c[0]).argmin(1)
        c = torch.stack([x[0, index == j].mean(0) for j in range(k)])[None]
    _, first, second = nearest_two(x, c, n)
    tau = (LayerConfig().tau * (second - first).mean(1)).to(dtype)
    return x, c, tau


def run(fn, x, m, c0, tau, *, rows, gw, gc, **kwargs):
    """Outputs, centroids and the gradient of ``<w, gw> + <c, gc>`` into ``x``."""
    xr = x.clone().requires_grad_(True)
    out = fn(xr, m, c0, tau, rows=rows, **kwargs)
    w, c = out[0], out[1]
    (grad,) = torch.autograd.grad((w * gw).sum() + (c * gc).sum(), xr)
    return w.detach(), c.detach(), grad, (out[2] if len(out) > 2 else None)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# (groups, n, d, k, with_m, pad, tau, rows): scalars and vectors, one and several groups, padding rows,
# chunks smaller than the data; a soft regime where every centroid matters.
CASES = [
    pytest.param(1, 40, 1, 4, False, 0, 0.4, 7, id="d1"),
    pytest.param(2, 36, 2, 4, True, 0, 0.5, 11, id="d2-m-G2"),
    pytest.param(3, 30, 3, 5, True, 4, 0.5, 8, id="d3-pad-G3"),
]


@pytest.mark.parametrize(("groups", "n", "d", "k", "with_m", "pad", "tau", "rows"), CASES)
def test_every_centroid_kept_is_the_dense_op(groups, n, d, k, with_m, pad, tau, rows):
    x, m, c0 = problem(groups, n, d, k, with_m=with_m, pad=pad, seed=1)
    t, tol = torch.full((groups,), tau, dtype=F64), torch.tensor(0.0, dtype=F64)
    g = torch.Generator().manual_seed(2)
    gw, gc = torch.randn(x.shape, generator=g, dtype=F64), torch.randn(c0.shape, generator=g, dtype=F64)
    kw = dict(max_iters=30, tol=tol, grad_tol=1e-12)
    ref = run(engine_api.dkm, x, m, c0, t, rows=rows, gw=gw, gc=gc, **kw)
    got = run(dkm_sparse, x, m, c0, t, rows=rows, gw=gw, gc=gc, top=k, **kw)
    for a, b in zip(got[:3], ref[:3]):
        assert (a - b).abs().max() <= 1e-10 * max(1.0, float(b.abs().max()))
    assert torch.equal(got[3], torch.zeros(groups, dtype=F64))  # nothing dropped
    # top > k is top = k
    again = run(dkm_sparse, x, m, c0, t, rows=rows, gw=gw, gc=gc, top=k + 3, **kw)
    assert all(torch.equal(a, b) for a, b in zip(again, got))


def test_gradcheck_every_centroid_kept():
    x, m, c0 = problem(2, 6, 2, 3, with_m=True, seed=3)
    t = torch.full((2,), 0.5, dtype=F64)

    def f(x):
        w, c, _ = dkm_sparse(
            x, m, c0, t, top=3, max_iters=5000, tol=torch.tensor(1e-13, dtype=F64), rows=4, grad_tol=1e-14
        )
        return w, c

    assert gradcheck(f, (x.requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_with_hard_and_soft_rows():
    """With ``top < k`` the op is smooth while the sets stay put: one-hot (hard) rows and soft rows alike."""
    g = torch.Generator().manual_seed(4)
    centres = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 3.0], [3.0, 3.0]], dtype=F64)
    x = (centres.repeat(3, 1) + 0.4 * torch.randn(12, 2, generator=g, dtype=F64))[None]
    x[0, :2] = torch.tensor([[1.5, 0.1], [0.2, 1.4]], dtype=F64)  # between two clusters
    c0 = centres[None] + 0.05
    t = torch.full((1,), 0.1, dtype=F64)
    tol = torch.tensor(1e-13, dtype=F64)
    sel = select(x, None, sparse_iterate(x, None, c0, t, 5000, tol, 5, 2)[0], t, 2, 5)
    assert sel.hard.any() and (~sel.hard).any()

    def f(x):
        w, c, _ = dkm_sparse(x, None, c0, t, top=2, max_iters=5000, tol=tol, rows=5, grad_tol=1e-14)
        return w, c

    assert gradcheck(f, (x.requires_grad_(True),), eps=1e-6, atol=1e-6, rtol=1e-5)


# Measured on these problems (float64): the sparse op matches the dense one to ~1e-14 (outputs,
# centroids) and ~1e-12 (gradients) with top = d + 1; top = 2 on 2-D vectors, where three cells meet,
# is off by ~1e-3 and says so (bound 1).
@pytest.mark.parametrize(("d", "top", "close"), [(1, 2, True), (2, 3, True), (2, 2, False)])
def test_few_centroids_match_the_dense_op_at_the_default_temperature(d, top, close):
    k, n = 16, 6000 // d
    x, c0, tau = gaussian_layer(n, d, k, seed=5)
    g = torch.Generator().manual_seed(6)
    gw, gc = torch.randn(x.shape, generator=g, dtype=F64), torch.randn(c0.shape, generator=g, dtype=F64)
    kw = dict(max_iters=5, tol=torch.tensor(0.0, dtype=F64), grad_tol=1e-10)
    ref = run(engine_api.dkm, x, None, c0, tau, rows=1000, gw=gw, gc=gc, **kw)
    w, c, grad, dropped = run(dkm_sparse, x, None, c0, tau, rows=1000, gw=gw, gc=gc, top=top, **kw)
    if close:
        assert rel(w, ref[0]) < 1e-10 and rel(c, ref[1]) < 1e-10 and rel(grad, ref[2]) < 1e-8
        assert float(dropped.max()) < 1e-12
    else:
        assert rel(w, ref[0]) < 1e-3 and rel(grad, ref[2]) < 0.3
        assert float(dropped.max()) > 1e-3  # and the bound says the approximation is coarse


@pytest.mark.parametrize(("d", "top"), [(1, 1), (2, 2), (2, 3), (3, 2)])
def test_reported_dropped_mass_bounds_the_true_one(d, top):
    """Dense attention mass outside the sets, at the converged centroids, never exceeds the reported bound."""
    k, n = 8, 3000 // d
    x, c0, tau = gaussian_layer(n, d, k, seed=7 + d)
    tau = tau * 4  # softer than the default, so that the bound is not trivially tiny
    tol = torch.tensor(0.0, dtype=F64)
    c, attention = sparse_iterate(x, None, c0, tau, 3, tol, 500, top)
    sel = attention.sel
    a = torch.softmax(-torch.cdist(x, c).square() / tau.view(-1, 1, 1), -1)[0]  # (n, k)
    kept = torch.zeros_like(a, dtype=torch.bool)
    kept.scatter_(1, sel.index[0].long().t(), True)
    hard = sel.hard[0]
    kept[hard] = False
    kept[hard, sel.index[0, 0, hard].long()] = True
    attention.output(c)  # (the bound at c joins those of the iterations)
    true = (a * ~kept).sum(1).max()
    assert float(true) <= float(attention.dropped) + 1e-15


def test_tournament_finds_the_nearest_and_a_valid_lower_bound():
    g = torch.Generator().manual_seed(8)
    for d, k, top in [(1, 16, 1), (2, 16, 3), (3, 64, 4), (2, 8, 5), (4, 12, 3)]:  # 12: not a power of two
        x = torch.randn(2, 500, d, generator=g)
        c = torch.randn(2, k, d, generator=g)
        sel = select(x, None, c, torch.full((2,), 1e9), top, 128)  # huge tau: no row is hard
        assert not sel.hard.any()
        dist = torch.cdist(x.double(), c.double()).square()  # (G, n, k)
        want = dist.topk(top, -1, largest=False).indices.sort(-1).values
        got = sel.index.long().transpose(1, 2).sort(-1).values
        assert (got == want).all(-1).float().mean() > 0.999  # float32 ties aside
        outside = torch.ones_like(dist, dtype=torch.bool).scatter_(2, sel.index.long().transpose(1, 2), False)
        nearest = dist.amin(-1)
        # slack > 0, and the bound behind it holds: every dropped centroid is farther than the nearest
        assert (sel.slack > 0).all()
        assert ((dist + 1e-9 >= nearest.unsqueeze(-1)) | ~outside).all()


def test_padding_rows_move_nothing_and_do_not_count():
    x, m, c0 = problem(2, 40, 2, 6, with_m=True, seed=9)
    t, tol = torch.full((2,), 0.3, dtype=F64), torch.tensor(1e-12, dtype=F64)
    _, c_ref, d_ref = dkm_sparse(x[:, :30], m[:, :30], c0, t, top=2, max_iters=200, tol=tol, rows=7)
    m0 = m.clone()
    m0[:, 30:] = 0
    x0 = x.clone()
    x0[:, 30:] = 1e3  # far away: with a weight they would drag a centroid (and break any bound)
    w, c, dropped = dkm_sparse(x0, m0, c0, t, top=2, max_iters=200, tol=tol, rows=7)
    assert torch.allclose(c, c_ref, atol=1e-12, rtol=0)
    assert torch.equal(dropped, d_ref)
    assert torch.isfinite(w).all()


def test_rows_are_chosen_again_as_centroids_move(monkeypatch):
    """From a far start the centroids move a lot: rows are chosen again, the result still matches the dense op."""
    x, c, tau = gaussian_layer(2000, 2, 8, seed=10)
    c0 = c * 0.5 + 0.01  # far from the fixed point
    tol = torch.tensor(0.0, dtype=F64)
    repairs = []
    original = selection.repair
    monkeypatch.setattr(selection, "repair", lambda *a: repairs.append(1) or original(*a))
    c_sparse, attention = sparse_iterate(x, None, c0, tau, 40, tol, 500, 4)
    assert len(repairs) > 5
    c_dense = engine_api.dense_iterate(x, None, c0, tau, 40, tol, 500)
    assert rel(c_sparse, c_dense) < 1e-12 and float(attention.dropped) < 1e-15


def test_float32_agrees_with_float64():
    x, c0, tau = gaussian_layer(4000, 2, 16, seed=11)
    kw = dict(top=3, max_iters=5, rows=1000)
    w64, c64, _ = dkm_sparse(x, None, c0, tau, tol=torch.tensor(0.0, dtype=F64), **kw)
    w32, c32, d32 = dkm_sparse(x.float(), None, c0.float(), tau.float(), tol=torch.tensor(0.0), **kw)
    assert w32.dtype == torch.float32 and d32.dtype == torch.float32
    assert rel(w32.double(), w64) < 1e-5 and rel(c32.double(), c64) < 1e-5


def test_top_must_be_positive():
    x, m, c0 = problem(1, 10, 1, 3)
    with pytest.raises(ValueError, match="top"):
        dkm_sparse(x, m, c0, torch.ones(1, dtype=F64), top=0, max_iters=3, tol=torch.tensor(0.0), rows=4)


def test_log_floor_is_below_float_resolution():
    for dtype in (torch.float32, torch.float64):
        assert math.exp(attention_floor(dtype)) < torch.finfo(dtype).eps ** 1.9


@pytest.mark.parametrize("itype", [torch.int32, torch.int64])
@pytest.mark.parametrize(("k", "top"), [(16, 4), (12, 3), (5, 4), (2, 1)])
def test_smallest_by_rotation_equals_a_sort(itype, k, top):
    """amin, rotate, amin... finds the top + 1 smallest of distinct non-negative integers, even near the top bit."""
    g = torch.Generator().manual_seed(k + top)
    high = torch.iinfo(itype).max
    ids = torch.arange(k, dtype=itype).view(1, k, 1)
    packed = torch.randint(0, 1 << 26, (2, k, 257), generator=g).to(itype) * k + ids  # distinct: residues mod k
    packed[0, :, 0] = high - k + ids[0, :, 0]  # the largest values there are: the rotation must not overflow
    packed[1, :, 0] = ids[0, :, 0] * 3  # a sorted row
    packed[1, :, 1] = ids[0, :, 0].flip(0)  # a reversed one
    want = packed.sort(1).values[:, : top + 1]
    assert torch.equal(smallest(packed.clone(), top), want)


def test_rank_feeds_the_temperature_and_the_selection():
    """The ranking reads as ``hard.nearest_two`` does (the native kernel's distances untruncated), and
    ``dkm_sparse`` given it matches one that ranks itself."""
    x, c0, tau = gaussian_layer(3000, 2, 16, seed=12, dtype=torch.float32)
    kernel = select_kernels("cpu", x.dtype, BACKEND["name"]).nearest_two
    ranked = rank_vectors(x, c0, kernel)
    index, first, second = ranked.nearest_two()
    want = nearest_two(x, c0, 1000)
    assert torch.equal(index, want[0])
    if kernel is default.nearest_two:
        assert torch.equal(first, want[1]) and torch.equal(second, want[2])
    else:  # the packed distances come from a matmul and lose their lowest 4 bits (k = 16)
        torch.testing.assert_close(first, want[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(second, want[2], rtol=1e-4, atol=1e-5)
    kw = dict(top=4, max_iters=3, tol=torch.tensor(0.0), rows=500)
    fresh = run(dkm_sparse, x, None, c0, tau, gw=torch.ones_like(x), gc=torch.zeros_like(c0), **kw)
    given = run(
        dkm_sparse, x, None, c0, tau, gw=torch.ones_like(x), gc=torch.zeros_like(c0), ranked=ranked, **kw
    )
    elsewhere = rank_vectors(x, c0 + 0.01, kernel)  # ranked at other centroids: ignored
    other = run(
        dkm_sparse, x, None, c0, tau, gw=torch.ones_like(x), gc=torch.zeros_like(c0), ranked=elsewhere, **kw
    )
    for a, b, o in zip(fresh[:3], given[:3], other[:3]):
        assert torch.equal(a, b) and torch.equal(a, o)


@pytest.mark.parametrize(("groups", "with_m"), [(1, False), (2, True)])
def test_soft_rows_laid_out_as_chosen_match_a_fresh_layout(groups, with_m):
    """After repairs, the soft rows the selection carries are the flags' soft rows, with their sets and vectors."""
    x, m, c0 = problem(groups, 600, 2, 8, seed=13, with_m=with_m)
    tau = torch.full((groups,), 0.05, dtype=F64)
    c, attention = sparse_iterate(x, m, c0, tau, 4, torch.tensor(0.0, dtype=F64), 64, 3)
    data, sel, soft = attention.data, attention.sel, attention.soft
    sel, soft, _ = selection.current(data, sel, soft, c * 1.05, tau)  # a move that makes rows stale
    assert sel.rebased and sel.soft is not None
    fresh = soft_layout(data, sel.index, sel.hard, 8, tau)

    def table(chunks):
        rows = torch.cat([ch.rows for ch in chunks])
        order = rows.argsort()
        keys = torch.cat([ch.keys for ch in chunks], 1)[:, order].sort(0).values
        xt = torch.cat([ch.xt for ch in chunks], 1)[:, order]
        ms = None if chunks[0].m is None else torch.cat([ch.m for ch in chunks])[order]
        return rows[order], keys, xt, ms

    got, want = table(soft), table(fresh)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert (got[3] is None) == (want[3] is None) and (got[3] is None or torch.equal(got[3], want[3]))


def test_backward_twice_gives_the_same_bits():
    """The second backward rebuilds the layout in the forward's chunks (the first used the forward's own)."""
    x, c0, tau = gaussian_layer(2000, 2, 16, seed=14)
    xr = x.clone().requires_grad_(True)
    w, c, _ = dkm_sparse(xr, None, c0, tau, top=3, max_iters=4, tol=torch.tensor(0.0, dtype=F64), rows=300)
    loss = (w * torch.randn_like(w)).sum() + c.sum()
    (first,) = torch.autograd.grad(loss, xr, retain_graph=True)
    (second,) = torch.autograd.grad(loss, xr)
    assert torch.equal(first, second)


def test_coordinate_major():
    x = torch.randn(2, 5, 3, dtype=F64)
    assert torch.equal(coordinate_major(x), x.permute(2, 0, 1))
    wide = torch.randn(1, 4, 20, dtype=F64)
    assert torch.equal(coordinate_major(wide), wide.permute(2, 0, 1))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("d", [1, 2, 3])
def test_rows_gathers_like_indexing(dtype, d):
    table = torch.randn(d, 9, dtype=dtype).t()  # (9, d), not contiguous
    index = torch.tensor([3, 0, 8, 3, 5])
    got = gather_rows(table, index)
    assert got.shape == (5, d) and torch.equal(got, table[index])


def test_merged_joins_chunks_in_order_up_to_the_limit():
    """Chunks left by repairs are joined (rows and their order kept) while a chunk stays within the limit."""
    gen = torch.Generator().manual_seed(5)

    def chunk(start, r, per_row_tau):
        rows = torch.arange(start, start + r)
        inv_tau = torch.rand(r, generator=gen) if per_row_tau else torch.tensor([4.0])
        return SoftChunk(rows, torch.randint(0, 8, (3, r), generator=gen), torch.randn(2, r, generator=gen),
                         torch.rand(r, generator=gen), inv_tau)

    parts = [chunk(0, 5, False), chunk(5, 3, False), chunk(8, 4, False)]
    (one,) = merged(parts)
    assert torch.equal(one.rows, torch.arange(12)) and one.inv_tau.numel() == 1
    assert torch.equal(one.keys, torch.cat([p.keys for p in parts], 1))
    assert torch.equal(one.xt, torch.cat([p.xt for p in parts], 1)) and torch.equal(one.m, torch.cat([p.m for p in parts]))
    mixed = [chunk(0, 5, True), chunk(5, 3, False)]  # one temperature per row as soon as one chunk has them
    (joined,) = merged(mixed)
    assert torch.equal(joined.inv_tau, torch.cat([mixed[0].inv_tau, torch.full((3,), 4.0)]))
    split = merged(parts, limit=8)  # 5 + 3 fit, the next 4 start a new chunk
    assert [ch.rows.numel() for ch in split] == [8, 4]
    assert merged(parts[:1])[0] is parts[0]


@pytest.mark.parametrize("with_m", [False, True])
def test_joining_the_repairs_chunks_keeps_the_step(with_m, monkeypatch):
    """Joining the repairs' chunks changes the step only by rounding (float64)."""
    x, m, c0 = problem(2, 600, 2, 8, seed=21, with_m=with_m)
    tau = torch.full((2,), 0.05, dtype=F64)
    kw = dict(top=3, max_iters=4, tol=torch.tensor(0.0, dtype=F64), rows=64)
    repairs, repair = [], selection.repair
    monkeypatch.setattr(selection, "repair", lambda *a: repairs.append(1) or repair(*a))
    joined = run(dkm_sparse, x, m, c0, tau, gw=torch.ones_like(x), gc=torch.zeros_like(c0), **kw)
    assert repairs, "the case should choose some rows again"
    monkeypatch.setattr(selection, "merged", lambda soft: soft)
    apart = run(dkm_sparse, x, m, c0, tau, gw=torch.ones_like(x), gc=torch.zeros_like(c0), **kw)
    for a, b in zip(joined, apart):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)  # (the gradient: sums in another order, solved)

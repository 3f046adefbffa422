"""The DKM op (``torchdkm.cluster.op``): forward fixed point, implicit backward, chunking."""

from __future__ import annotations

import pytest
import torch
from engine_api import dkm, dkm_sparse, dkm_unrolled
from engine_api import problem as engine_problem
from torch.autograd import gradcheck

from torchdkm.cluster import DenseAttention, engine, rows_for

F64 = torch.float64


def problem(groups, n, d, k, *, seed=0, with_m=False, dtype=F64):
    """Random vectors, multiplicities in [0.25, 2.25) and initial centroids near the first k vectors."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, n, d, generator=g, dtype=dtype)
    c0 = x[:, :k].clone() + 0.1
    m = torch.rand(groups, n, generator=g, dtype=dtype) * 2 + 0.25 if with_m else None
    return x, m, c0


@pytest.fixture(params=["default", "series"])
def backward_mode(request, monkeypatch):
    """Run a gradient test with the op's default backward, and again forcing the Neumann series.

    The op may solve ``(I - dF/dc)^T v = g`` exactly for small ``k x d`` and sums a
    Neumann series otherwise; ``EXPLICIT_LIMIT = 0`` forces the series on these tiny cases.
    """
    if request.param == "series":
        monkeypatch.setattr(engine, "EXPLICIT_LIMIT", 0)
    return request.param


def full(groups, value, dtype=F64):
    return torch.full((groups,), value, dtype=dtype)


def attn(x, c, tau):
    """Reference attention ``softmax_j(-|x_i - c_j|^2 / tau)``: ``(G, n, k)``."""
    return torch.softmax(-torch.cdist(x, c).square() / tau.view(-1, 1, 1), -1)


def step(x, m, c, tau):
    """Reference DKM update ``F(c) = A^T m x / A^T m`` and the masses ``A^T m``."""
    a = attn(x, c, tau) * (torch.ones_like(x[..., 0]) if m is None else m)[..., None]
    den = a.sum(1)
    return a.transpose(1, 2) @ x / den[..., None], den


def converged(x, m, c0, tau, max_iters=100_000):
    """The op's converged centroids, checked to be a fixed point of the reference update."""
    _, c = dkm(x, m, c0, tau, max_iters=max_iters, tol=torch.tensor(1e-13, dtype=x.dtype), rows=4)
    assert torch.allclose(step(x, m, c, tau)[0], c, atol=1e-11, rtol=0), "the forward iteration did not converge"
    return c


# (groups, n, d, k, multiplicities, tau, seed): scalar and vector cases, G = 1 and G > 1, all in
# a soft regime with distinct centroids (checked below), so the fixed-point part of the gradient matters.
GRAD_CASES = [
    pytest.param(1, 7, 1, 3, False, 0.4, 0, id="d1"),
    pytest.param(1, 7, 1, 3, True, 0.4, 0, id="d1-m"),
    pytest.param(3, 6, 1, 2, True, 0.4, 0, id="d1-m-G3"),
    pytest.param(2, 6, 2, 2, False, 0.8, 1, id="d2-G2"),
    pytest.param(3, 6, 3, 3, True, 0.4, 2, id="d3-m-G3"),
]


@pytest.mark.parametrize(("groups", "n", "d", "k", "with_m", "tau", "seed"), GRAD_CASES)
def test_gradient_matches_finite_differences(groups, n, d, k, with_m, tau, seed, backward_mode):
    x, m, c0 = problem(groups, n, d, k, with_m=with_m, seed=seed)
    t = full(groups, tau)
    c = converged(x, m, c0, t)
    # The case is soft (some vector's attention is spread over several centroids) and not degenerate.
    assert float(attn(x, c, t).max(-1).values.min()) < 0.95
    assert float((torch.cdist(c, c) + 99 * torch.eye(k, dtype=F64)).min()) > 0.4
    x.requires_grad_(True)

    def f(x):
        # rows=4 < n: every pass is chunked.
        return dkm(x, m, c0, t, max_iters=5000, tol=torch.tensor(1e-13, dtype=F64), rows=4, grad_tol=1e-14)

    assert gradcheck(f, (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_dense_attention_output_is_dkm():
    """The attention's own update and output, called by hand, are what the op returns."""
    x, m, c0 = problem(2, 8, 2, 3, with_m=True)
    t, tol = full(2, 0.5), torch.tensor(1e-12, dtype=F64)
    w1, c1 = dkm(x, m, c0, t, max_iters=50, tol=tol, rows=3, grad_tol=1e-6)
    attention = DenseAttention(engine_problem(x, m, c0, t, rows=3, max_iters=50, tol=tol))
    c = c0
    for _ in range(50):
        new = attention.update(c)
        if (new - c).abs().max() <= tol:
            c = new
            break
        c = new
    assert torch.equal(c, c1) and torch.equal(attention.output(c), w1)


@pytest.mark.parametrize("with_m", [False, True])
@pytest.mark.parametrize("d", [1, 3])
def test_forward_reaches_kmeans_fixed_point(d, with_m):
    x, m, c0 = problem(2, 20, d, 4, with_m=with_m, seed=3)
    t = full(2, 0.3)
    w, c = dkm(x, m, c0, t, max_iters=10_000, tol=torch.tensor(1e-13, dtype=F64), rows=7)
    # F(c*) == c*, with F written out: c_j = sum_i A_ij m_i x_i / sum_i A_ij m_i.
    assert torch.allclose(step(x, m, c, t)[0], c, atol=1e-11, rtol=0)
    # The library's own update agrees, masses included.
    again = DenseAttention(engine_problem(x, m, c0, t, rows=7)).update(c)
    assert torch.allclose(again, c, atol=1e-11, rtol=0)
    # The output is the attention-weighted centroid of every vector.
    assert torch.allclose(w, attn(x, c, t) @ c, atol=1e-12, rtol=0)
    # ...and it is not trivially the start: the iteration moved the centroids.
    assert (c - c0).abs().max() > 1e-2


def lloyd_reference(x, c, iters=200):
    """Plain hard k-means (one group, no multiplicities), written independently of torchdkm."""
    for _ in range(iters):
        assign = torch.cdist(x, c).argmin(1)
        new = torch.stack([x[assign == j].mean(0) if (assign == j).any() else c[j] for j in range(c.shape[0])])
        if torch.equal(new, c):
            break
        c = new
    return c, torch.cdist(x, c).argmin(1)


@pytest.mark.parametrize("d", [1, 2])
def test_tiny_tau_is_hard_kmeans(d):
    # Three well separated blobs: Lloyd's fixed point is unambiguous.
    g = torch.Generator().manual_seed(5)
    centres = torch.tensor([[-4.0, 0.0], [0.0, 3.0], [5.0, -1.0]], dtype=F64)[:, :d]
    x = (centres.repeat_interleave(10, 0) + 0.5 * torch.randn(30, d, generator=g, dtype=F64))[None]
    c0 = x[:, [0, 10, 20]] + 0.3
    ref_c, ref_assign = lloyd_reference(x[0], c0[0])
    t = full(1, 1e-6)
    w, c = dkm(x, None, c0, t, max_iters=1000, tol=torch.tensor(1e-12, dtype=F64), rows=8)
    assert torch.allclose(c[0], ref_c, atol=1e-10, rtol=0)
    # Soft output == snapped output: every vector becomes its nearest centroid.
    assert torch.allclose(w[0], c[0][ref_assign], atol=1e-10, rtol=0)
    assert torch.equal(torch.cdist(x[0], c[0]).argmin(1), ref_assign)


def test_tiny_tau_matches_sklearn_kmeans():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    x, _, _ = problem(1, 60, 2, 5, seed=11)
    init = x[0, torch.randperm(60, generator=torch.Generator().manual_seed(0))[:5]].clone()
    km = sklearn_cluster.KMeans(5, init=init.numpy(), n_init=1, tol=0.0, max_iter=500, algorithm="lloyd").fit(
        x[0].numpy()
    )
    t = full(1, 1e-7)
    w, c = dkm(x, None, init[None], t, max_iters=2000, tol=torch.tensor(0.0, dtype=F64), rows=16)
    assert torch.allclose(c[0], torch.from_numpy(km.cluster_centers_), atol=1e-9, rtol=0)
    assert torch.equal(torch.cdist(x[0], c[0]).argmin(1), torch.from_numpy(km.labels_).long())


@pytest.mark.parametrize(
    ("groups", "d", "with_m", "tau"),
    [(1, 1, False, 0.4), (2, 1, True, 0.4), (2, 2, False, 0.8), (3, 3, True, 0.5)],
)
def test_implicit_gradient_matches_unrolled_autograd(groups, d, with_m, tau, backward_mode):
    """Unrolled autograd from c* for T iterations differs from the implicit gradient by O(rho^T)."""
    x, m, c0 = problem(groups, 12, d, 3, with_m=with_m, seed=7)
    t = full(groups, tau)
    c_star = converged(x, m, c0, t)
    g = torch.Generator().manual_seed(8)
    gw = torch.randn(x.shape, generator=g, dtype=F64)
    gc = torch.randn(c_star.shape, generator=g, dtype=F64)

    xa = x.clone().requires_grad_(True)
    w, c = dkm(xa, m, c0, t, max_iters=10_000, tol=torch.tensor(1e-13, dtype=F64), rows=5, grad_tol=1e-13)
    implicit = torch.autograd.grad((w * gw).sum() + (c * gc).sum(), xa)[0]

    xb = x.clone().requires_grad_(True)
    w_ref, c_ref = dkm_unrolled(xb, m, c_star, t, iters=400)
    unrolled = torch.autograd.grad((w_ref * gw).sum() + (c_ref * gc).sum(), xb)[0]

    assert torch.allclose(w, w_ref, atol=1e-10, rtol=0)
    assert torch.allclose(c, c_ref, atol=1e-10, rtol=0)
    # Stated tolerance: 1e-7 relative to the gradient's size.
    assert (implicit - unrolled).abs().max() <= 1e-7 * unrolled.abs().max()


def test_implicit_gradient_is_not_the_one_step_gradient():
    """Sanity check of the test above: few unrolled iterations give a visibly different gradient."""
    x, m, c0 = problem(1, 12, 1, 3, seed=7)
    t = full(1, 0.4)
    c_star = converged(x, m, c0, t)
    gc = torch.ones_like(c_star)
    xa = x.clone().requires_grad_(True)
    _, c = dkm(xa, m, c0, t, max_iters=10_000, tol=torch.tensor(1e-13, dtype=F64), rows=5, grad_tol=1e-13)
    implicit = torch.autograd.grad((c * gc).sum(), xa)[0]
    xb = x.clone().requires_grad_(True)
    _, c1 = dkm_unrolled(xb, m, c_star, t, iters=1)
    one = torch.autograd.grad((c1 * gc).sum(), xb)[0]
    assert (implicit - one).abs().max() > 1e-3 * implicit.abs().max()


@pytest.mark.parametrize(("terms", "d", "with_m", "sparse"), [(1, 1, False, False), (3, 2, True, False), (2, 1, True, True)])
def test_grad_terms_is_the_gradient_of_that_many_unrolled_iterations(terms, d, with_m, sparse):
    """``grad_terms=n``: autograd through ``n`` iterations from the settled centroids (coremltools' kind of gradient)."""
    x, m, c0 = problem(2, 12, d, 3, with_m=with_m, seed=5)
    t = full(2, 0.5)
    c_star = converged(x, m, c0, t)
    g = torch.Generator().manual_seed(9)
    gw, gc = torch.randn(x.shape, generator=g, dtype=F64), torch.randn(c_star.shape, generator=g, dtype=F64)
    xa = x.clone().requires_grad_(True)
    tol = torch.tensor(1e-13, dtype=F64)
    if sparse:  # every centroid in the selection: the same attention as dense, through the sparse variant's passes
        w, c, _ = dkm_sparse(xa, m, c0, t, top=3, rows=5, max_iters=10_000, tol=tol, grad_tol=0.0, grad_terms=terms)
    else:
        w, c = dkm(xa, m, c0, t, max_iters=10_000, tol=tol, rows=5, grad_tol=0.0, grad_terms=terms)
    truncated = torch.autograd.grad((w * gw).sum() + (c * gc).sum(), xa)[0]
    xb = x.clone().requires_grad_(True)
    w_ref, c_ref = dkm_unrolled(xb, m, c_star, t, iters=terms)
    unrolled = torch.autograd.grad((w_ref * gw).sum() + (c_ref * gc).sum(), xb)[0]
    assert (truncated - unrolled).abs().max() <= 1e-9 * unrolled.abs().max()
    xc = x.clone().requires_grad_(True)
    w, c = dkm(xc, m, c0, t, max_iters=10_000, tol=tol, rows=5, grad_tol=1e-13)
    exact = torch.autograd.grad((w * gw).sum() + (c * gc).sum(), xc)[0]
    assert (exact - truncated).abs().max() > 1e-3 * exact.abs().max()  # (the option changes something)


@pytest.mark.parametrize(("d", "with_m"), [(1, False), (1, True), (4, True)])
def test_chunking_does_not_change_results(d, with_m):
    x, m, c0 = problem(3, 23, d, 4, with_m=with_m, seed=2)
    t, tol = full(3, 0.5), torch.tensor(1e-9, dtype=F64)
    g = torch.Generator().manual_seed(3)
    gw = torch.randn(x.shape, generator=g, dtype=F64)
    results = []
    for rows in (1, 5, 23, 1000):
        xr = x.clone().requires_grad_(True)
        w, c = dkm(xr, m, c0, t, max_iters=200, tol=tol, rows=rows, grad_tol=1e-10)
        (grad,) = torch.autograd.grad((w * gw).sum() + c.sum(), xr)
        results.append((w, c, grad))
    for w, c, grad in results[1:]:
        assert torch.allclose(w, results[0][0], atol=1e-12, rtol=0)
        assert torch.allclose(c, results[0][1], atol=1e-12, rtol=0)
        assert torch.allclose(grad, results[0][2], atol=1e-10, rtol=0)


def test_zero_multiplicity_vectors_do_not_move_centroids():
    x, m, c0 = problem(1, 10, 2, 3, with_m=True, seed=4)
    t, tol = full(1, 0.5), torch.tensor(1e-12, dtype=F64)
    _, c_ref = dkm(x[:, :7], m[:, :7], c0, t, max_iters=500, tol=tol, rows=4)
    m0 = m.clone()
    m0[:, 7:] = 0
    x0 = x.clone()
    x0[:, 7:] = 1e3  # far away: with a nonzero weight they would drag a centroid
    _, c = dkm(x0, m0, c0, t, max_iters=500, tol=tol, rows=4)
    assert torch.allclose(c, c_ref, atol=1e-12, rtol=0)


def test_empty_centroid_keeps_its_value_and_gradients_stay_finite():
    x, _, _ = problem(1, 10, 2, 2, seed=6)
    c0 = torch.cat([x[:, :2].clone(), torch.full((1, 1, 2), 1e3, dtype=F64)], 1)  # the third is far from all
    t = full(1, 0.1)
    xr = x.clone().requires_grad_(True)
    w, c = dkm(xr, None, c0, t, max_iters=100, tol=torch.tensor(1e-12, dtype=F64), rows=4)
    assert torch.equal(c[0, 2], c0[0, 2])
    assert torch.isfinite(w).all() and torch.isfinite(c).all()
    (grad,) = torch.autograd.grad(w.sum() + c.sum(), xr)
    assert torch.isfinite(grad).all()


def test_float32_matches_float64():
    x, m, c0 = problem(2, 30, 1, 4, with_m=True, seed=9)
    t = full(2, 0.3)
    w64, c64 = dkm(x, m, c0, t, max_iters=30, tol=torch.tensor(0.0, dtype=F64), rows=8)
    w32, c32 = dkm(x.float(), m.float(), c0.float(), t.float(), max_iters=30, tol=torch.tensor(0.0), rows=8)
    assert w32.dtype == torch.float32
    assert torch.allclose(w32.double(), w64, atol=1e-5, rtol=0)
    assert torch.allclose(c32.double(), c64, atol=1e-5, rtol=0)


def test_max_iters_caps_the_iterations():
    x, m, c0 = problem(2, 12, 2, 3, seed=1, with_m=True)
    t = full(2, 0.5)
    c = c0
    for iters in (1, 2, 3):
        c = step(x, m, c, t)[0]
        w, c_op = dkm(x, m, c0, t, max_iters=iters, tol=torch.tensor(0.0, dtype=F64), rows=4)
        assert torch.allclose(c_op, c, atol=1e-12, rtol=0)
        assert torch.allclose(w, attn(x, c, t) @ c, atol=1e-12, rtol=0)


def test_tolerance_stops_the_iterations_early():
    x, m, c0 = problem(1, 12, 1, 3, seed=1)
    t = full(1, 0.5)
    # With a huge tol the first step already moves less than tol: one iteration only.
    _, c = dkm(x, m, c0, t, max_iters=50, tol=torch.tensor(1e6, dtype=F64), rows=4)
    assert torch.allclose(c, step(x, m, c0, t)[0], atol=1e-12, rtol=0)


@pytest.mark.parametrize(("k", "d"), [(16, 1), (256, 4), (4, 2)])
def test_rows_per_chunk_grows_with_the_budget(k, d):
    assert rows_for(1.0, 2, k, d, 4) == 1  # never zero rows
    small, large = rows_for(1e5, 2, k, d, 4), rows_for(1e8, 2, k, d, 4)
    assert 1 <= small < large
    # Every row costs at least its k attention entries.
    assert large * 2 * k * 4 <= 1e8
    assert rows_for(1e8, 2, 2 * k, d, 4) < large


def test_scalars_far_from_zero_keep_float32_precision():
    """Scalar distances are exact differences: an offset of 1e3 costs no precision in float32."""
    g = torch.Generator().manual_seed(12)
    x = (torch.randn(1, 64, 1, generator=g, dtype=F64) * 0.01).round(decimals=4)
    c0 = torch.tensor([[[-0.01], [0.0], [0.01]]], dtype=F64)
    t, tol = full(1, 2e-5), torch.tensor(0.0, dtype=F64)
    w_ref, c_ref = dkm(x, None, c0, t, max_iters=10, tol=tol, rows=16)
    offset = 1000.0
    w32, c32 = dkm((x + offset).float(), None, (c0 + offset).float(), t.float(), max_iters=10, tol=tol.float(), rows=16)
    # float32 resolves 1000 to 6e-5, a few percent of a logit here: the outputs stay within 2e-3 of
    # the float64 ones (measured 5e-4); expanding |x - c|^2 = x^2 - 2xc + c^2 would be off by ~1e-2.
    assert (w32.double() - offset - w_ref).abs().max() < 2e-3
    assert (c32.double() - offset - c_ref).abs().max() < 2e-3

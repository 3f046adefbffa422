"""Uniquification: DKM once per distinct 16-bit value must equal DKM on every weight.

Every test runs twice: with the native kernels and with the torch kernels
(:mod:`torchdkm.kernels`), selected explicitly through the clusterers' ``backend``.
"""

from __future__ import annotations

import functools

import pytest
import torch

import torchdkm.cluster
import torchdkm.kernels.cpu
import torchdkm.kernels.default
from torchdkm.cluster import Layout
from torchdkm.cluster import unique as unique_mod
from torchdkm.config import LayerConfig
from torchdkm.kernels import select

F64 = torch.float64
WeightClusterer = torchdkm.cluster.WeightClusterer
BACKEND = {"name": None}


@pytest.fixture(autouse=True)
def chosen_backend(backend, monkeypatch):
    """Every clusterer and every distinct table of a test uses the ``backend`` fixture's kernels."""
    monkeypatch.setitem(BACKEND, "name", backend)
    monkeypatch.setitem(globals(), "WeightClusterer", functools.partial(torchdkm.cluster.WeightClusterer, backend=backend))
    return backend


def distinct(weight, layout, dtype, compute):
    return unique_mod.distinct(weight, layout, dtype, compute, select("cpu", weight.dtype, BACKEND["name"]))


def rounded(shape, dtype, *, seed=0, scale=1.0):
    """Random weights of ``dtype`` whose values are exactly representable in float16."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).half().to(dtype)


def check_distinct(weight, layout, dtype, found):
    keys = weight.reshape(-1).to(dtype).to(found.values.dtype)
    # Every weight maps to a slot holding its (rounded) value.
    assert torch.equal(found.expand(found.values), keys)
    # Per group: counts add up to the group's real size, and the values with counts are distinct.
    assert found.counts.sum(1).tolist() == [float(c) for c in layout.real_counts()]
    for g in range(layout.groups):
        live = found.values[g, :, 0][found.counts[g] > 0]
        assert live.unique().numel() == live.numel()
        rows = weight.reshape(layout.out, -1)[g * layout.group_size : (g + 1) * layout.group_size]
        assert live.numel() == rows.reshape(-1).to(dtype).unique().numel()
    # Every weight's slot lies in its own group's row of the table.
    group_of_weight = torch.arange(layout.out).repeat_interleave(layout.row_len) // layout.group_size
    assert torch.equal(found.index // found.per_group, group_of_weight)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("out", "group_size"), [(12, None), (12, 5), (130, 2)])
def test_distinct_table(dtype, out, group_size):
    weight = torch.randn(out, 10) * 0.1
    weight[:, :3] = 0.5  # repeated values
    weight[0, 3] = -0.0  # a signed zero: its own bit pattern, value 0
    layout = Layout.of(weight.shape, 1, group_size)
    found = distinct(weight, layout, dtype, torch.float32)
    check_distinct(weight, layout, dtype, found)


def test_distinct_bincount_and_unique_fallback_agree(monkeypatch):
    weight = torch.randn(70, 9)
    layout = Layout.of(weight.shape, 1, 2)  # 35 groups: the bincount table
    table = distinct(weight, layout, torch.float16, torch.float32)
    monkeypatch.setattr(unique_mod, "MAX_TABLE_GROUPS", 1)  # force the torch.unique route
    fallback = distinct(weight, layout, torch.float16, torch.float32)
    check_distinct(weight, layout, torch.float16, fallback)
    assert torch.equal(table.expand(table.values), fallback.expand(fallback.values))
    for g in range(layout.groups):
        a = sorted(zip(table.values[g, :, 0].tolist(), table.counts[g].tolist()))
        b = sorted(zip(fallback.values[g, :, 0].tolist(), fallback.counts[g].tolist()))
        assert [p for p in a if p[1] > 0] == [p for p in b if p[1] > 0]


def soft_both(weight, mode, *, bits=3, group_size=None, max_iters=5, tau=0.05, seed=1):
    """Soft weight, centroids and weight gradient from the exact and the uniquified path."""
    common = dict(bits=bits, group_size=group_size, max_iters=max_iters, tau=tau, tol=0.0, min_numel=0)
    exact = WeightClusterer("layer", LayerConfig(cluster_dtype="exact", **common), weight.shape)
    uniq = WeightClusterer("layer", LayerConfig(cluster_dtype=mode, **common), weight.shape)
    assert exact.plan(weight).cluster_dtype is None
    assert uniq.plan(weight).path == "unique", "the test must exercise the uniquified path"
    c0 = exact.init(weight)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed), dtype=F64)
    results = []
    for clusterer in (exact, uniq):
        w = weight.clone().requires_grad_(True)
        r = clusterer.soft(w, c0)
        assert r.weight.dtype == weight.dtype and r.weight.shape == weight.shape
        (grad,) = torch.autograd.grad((r.weight.to(F64) * upstream).sum(), w)
        results.append((r.weight.detach().to(F64), r.centroids.to(F64), grad.to(F64)))
    return results


def assert_close(a, b, rel):
    scale = max(float(a.abs().max()), 1e-30)
    assert float((a - b).abs().max()) <= rel * scale, f"max diff {float((a - b).abs().max())} > {rel} x {scale}"


@pytest.mark.parametrize(("group_size", "out"), [(None, 12), (4, 12), (5, 12), (2, 130)])
def test_unique_equals_exact_float64(group_size, out):
    """float64 weights that float16 represents exactly: both paths compute in float64 and agree to 1e-10."""
    weight = rounded((out, 16), F64)
    (w_e, c_e, g_e), (w_u, c_u, g_u) = soft_both(weight, "float16", group_size=group_size, max_iters=8)
    assert_close(w_e, w_u, 1e-10)
    assert_close(c_e, c_u, 1e-10)
    assert_close(g_e, g_u, 1e-10)


@pytest.mark.parametrize("mode", ["auto", "float16"])
@pytest.mark.parametrize("group_size", [None, 3, 2])
def test_unique_equals_exact_float32(mode, group_size):
    """float32 weights exactly representable in float16: outputs and centroids agree to 1e-5 relative.

    Gradients to 1e-2 of the largest one: with a sharp temperature both float32 paths
    sit about 3e-3 from the float64 gradient (logits of order 1e3 in float32), and
    the float64 test above pins the paths to each other at 1e-10.
    """
    out = 130 if group_size == 2 else 12  # 65 groups > 64: the torch.unique fallback
    weight = rounded((out, 16), torch.float32, seed=3)
    (w_e, c_e, g_e), (w_u, c_u, g_u) = soft_both(weight, mode, group_size=group_size)
    assert_close(w_e, w_u, 1e-5)
    assert_close(c_e, c_u, 1e-5)
    assert_close(g_e, g_u, 1e-2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group_size", [None, 4])
def test_unique_equals_exact_16bit_weights(dtype, group_size):
    """16-bit weights are uniquified in their own dtype (lossless): agree up to one rounding of the output."""
    weight = rounded((12, 16), dtype, seed=4)
    (w_e, c_e, g_e), (w_u, c_u, g_u) = soft_both(weight, "auto", group_size=group_size)
    eps = float(torch.finfo(dtype).eps)
    assert_close(w_e, w_u, eps)
    assert_close(c_e, c_u, 1e-5)
    assert_close(g_e, g_u, 4 * eps)


def test_bfloat16_mode_on_float32_weights():
    weight = rounded((12, 16), torch.float32, seed=5).bfloat16().float()
    (w_e, c_e, g_e), (w_u, c_u, g_u) = soft_both(weight, "bfloat16")
    assert_close(w_e, w_u, 1e-5)
    assert_close(c_e, c_u, 1e-5)
    assert_close(g_e, g_u, 1e-2)


def test_unique_gradient_is_straight_through_the_rounding():
    """A float32 weight gets the gradient of its float16 rounding."""
    raw = torch.randn(12, 16, generator=torch.Generator().manual_seed(6))
    cfg = LayerConfig(bits=3, tol=0.0, min_numel=0, cluster_dtype="float16")
    clusterer = WeightClusterer("layer", cfg, raw.shape)
    c0 = clusterer.init(raw)
    grads = []
    for w in (raw, raw.half().float()):
        w = w.clone().requires_grad_(True)
        (grads.append(torch.autograd.grad(clusterer.soft(w, c0).weight.square().sum(), w)[0]),)
    # The soft output depends only on the rounded values; the gradient differs only through the direct
    # term (the upstream gradient 2*out), which is the same: the two gradients are equal.
    assert torch.equal(grads[0], grads[1])


def test_auto_picks_the_path():
    cfg = LayerConfig(bits=2, min_numel=0)
    c = WeightClusterer("layer", cfg, (4, 4))
    assert c.plan(torch.randn(4, 4)).cluster_dtype == torch.float16
    big = torch.randn(4, 4) * 1e6  # beyond float16's range: float16 is tried, then bfloat16
    assert c.plan(big).cluster_dtype == torch.float16
    soft = c.soft(big, c.init(big))  # the step clusters the bfloat16 values
    assert torch.isfinite(soft.weight).all() and soft.centroids.abs().max() > 6e4
    assert c.plan(torch.randn(4, 4).half()).cluster_dtype == torch.float16
    assert c.plan(torch.randn(4, 4).bfloat16()).cluster_dtype == torch.bfloat16
    assert c.plan(torch.randn(4, 4, dtype=F64)).cluster_dtype is None
    assert WeightClusterer("v", cfg.replace(dim=2), (4, 4)).plan(torch.randn(4, 4)).cluster_dtype is None
    exact = WeightClusterer("e", cfg.replace(cluster_dtype="exact"), (4, 4))
    assert exact.plan(torch.randn(4, 4)).cluster_dtype is None
    bf = WeightClusterer("b", cfg.replace(cluster_dtype="bfloat16"), (4, 4))
    assert bf.plan(torch.randn(4, 4).half()).cluster_dtype == torch.bfloat16


def test_distinct_with_more_than_32768_groups():
    """group * 65536 must not overflow (keys are int64)."""
    weight = torch.randn(32769, 2, generator=torch.Generator().manual_seed(13))
    layout = Layout.of(weight.shape, 1, 1)  # one LUT per row: 32769 groups
    found = distinct(weight, layout, torch.float16, torch.float32)
    assert torch.equal(found.expand(found.values), weight.reshape(-1).half().float())
    assert torch.equal(found.counts.sum(1), torch.full((32769,), 2.0))
    assert torch.equal(found.index // found.per_group, torch.arange(32769).repeat_interleave(2))


def test_unique_equals_exact_with_more_than_32768_groups():
    weight = rounded((32769, 4), F64, seed=14)
    (w_e, c_e, g_e), (w_u, c_u, g_u) = soft_both(weight, "float16", bits=1, group_size=1)
    assert_close(w_e, w_u, 1e-10)
    assert_close(c_e, c_u, 1e-10)
    assert_close(g_e, g_u, 1e-10)


@pytest.mark.parametrize("group_size", [None, 4])
def test_passes_in_pieces_equal_one_piece(monkeypatch, group_size, backend):
    """Counting, gathering and summing over the weights piece by piece (patterns recomputed) changes nothing.

    (torch code: pieces; native loops: chunks on several threads, and float32 blocks in the sums.)
    """
    weight = rounded((12, 16), torch.bfloat16, seed=7)
    w_one, c_one, g_one = soft_both(weight, "auto", group_size=group_size)[1]
    monkeypatch.setattr(torchdkm.kernels.default, "PIECE", 7)  # pieces that split rows and groups
    monkeypatch.setattr(torchdkm.kernels.default, "COUNT_PIECE", 5)
    monkeypatch.setattr(torchdkm.kernels.default, "SUM_PIECE", 6)
    monkeypatch.setattr(torchdkm.kernels.cpu, "MIN_PARALLEL", 1)
    torch.set_num_threads(3)  # (the conftest fixture restores the thread count)
    w_many, c_many, g_many = soft_both(weight, "auto", group_size=group_size)[1]
    assert torch.equal(w_one, w_many) and torch.equal(c_one, c_many)
    assert_close(g_one, g_many, 1e-6)  # (the gradient sums add in other pieces)
    layout = Layout.of(weight.shape, 1, group_size)
    found = distinct(weight, layout, torch.bfloat16, torch.float32)
    check_distinct(weight, layout, torch.bfloat16, found)


def test_weight_changed_before_backward_is_an_error():
    """The backward reads the weight's patterns again: autograd refuses a weight modified in place meanwhile."""
    weight = rounded((12, 16), torch.bfloat16, seed=8).requires_grad_(True)
    clusterer = WeightClusterer("layer", LayerConfig(bits=2, min_numel=0), weight.shape)
    out = clusterer.soft(weight, clusterer.init(weight)).weight
    with torch.no_grad():
        weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()

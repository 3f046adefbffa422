"""The native CPU kernels (``torchdkm.kernels.cpu``) against plain torch, their build, and the registry's choice."""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch

from torchdkm import kernels
from torchdkm.kernels import build, cpu, default

PATTERNS = 1 << 16


@pytest.fixture(params=["scalar", "avx512"])
def loops(request, monkeypatch):
    """The native loops, with the gathers' AVX-512 versions off, then on (where the CPU has them)."""
    if build.library() is None:
        pytest.skip("no native loops here (test_builds_where_a_compiler_exists says whether that is expected)")
    before = build.simd()
    if build.simd(request.param == "avx512") != (request.param == "avx512"):
        pytest.skip("this CPU has no AVX-512")
    yield cpu
    build.simd(before)


@pytest.fixture(params=[1, 3], ids=["one-chunk", "three-threads"])
def threads(request, monkeypatch):
    """One chunk, or three chunks on three threads (boundaries inside groups)."""
    monkeypatch.setattr(cpu, "MIN_PARALLEL", 1)
    torch.set_num_threads(request.param)  # (restored by the conftest fixture)
    return request.param


def test_builds_where_a_compiler_exists():
    if shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    assert build.library() is not None, "a C compiler exists but the native loops did not build"


def weights(numel: int, dtype=torch.bfloat16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(numel, generator=g) * 0.05).to(dtype)
    w[::7] = w[0]  # repeated patterns
    w.view(torch.uint16)[5::40] = 0xFFFF  # the last pattern of a group's table (a NaN in bfloat16)
    return w


def keys_of(w: torch.Tensor, group_numel: int) -> torch.Tensor:
    """Reference: each weight's entry in table space (pattern + 65536 x group)."""
    patterns = w.view(torch.uint16).to(torch.int64)
    return patterns + PATTERNS * (torch.arange(w.numel()) // group_numel)


#: (numel, weights per group), last group partial; groups of 16 and 17 weights cross 16-weight vector steps.
CASES = [(1000, 1000), (1000, 300), (999, 111), (64, 1), (301, 17), (96, 16)]


@pytest.mark.parametrize(("numel", "group_numel"), CASES)
def test_count(loops, threads, numel, group_numel):
    w = weights(numel)
    groups = -(-numel // group_numel)
    table = loops.count(w.view(torch.uint16), group_numel, groups * PATTERNS)
    assert torch.equal(table, torch.bincount(keys_of(w, group_numel), minlength=groups * PATTERNS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize(("numel", "group_numel"), CASES)
def test_expand(loops, threads, dtype, numel, group_numel):
    w = weights(numel)
    groups = -(-numel // group_numel)
    table = torch.randn(groups * PATTERNS).to(dtype)
    table[7] = float("nan")  # bits are copied as they are
    out = loops.expand(w.view(torch.uint16), group_numel, table)
    expected = table[keys_of(w, group_numel)]
    assert out.dtype == dtype and torch.equal(out.view(-1).view(torch.uint8), expected.view(torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("numel", "group_numel"), CASES)
def test_sum_per_key(loops, threads, dtype, numel, group_numel):
    w = weights(numel)
    groups = -(-numel // group_numel)
    values = torch.randn(numel).to(dtype)
    keys = keys_of(w, group_numel)
    live = torch.unique(keys)
    table = loops.sum_per_key(w.view(torch.uint16), group_numel, values, live, groups * PATTERNS, torch.float32)
    expected = torch.zeros(groups * PATTERNS, dtype=torch.float64).index_add_(0, keys, values.double())[live]
    assert table.dtype == torch.float64
    torch.testing.assert_close(table, expected, rtol=1e-6, atol=1e-6)


def test_sum_blocks_carry_every_live_key(loops, monkeypatch):
    """More weights than one float32 block (2**17): each block's sums reach the float64 table."""
    numel = (1 << 17) * 2 + 5
    w = weights(numel, seed=3)
    values = torch.full((numel,), 0.25)
    keys = keys_of(w, numel)
    live = torch.unique(keys)
    table = loops.sum_per_key(w.view(torch.uint16), numel, values, live, PATTERNS, torch.float32)
    assert torch.equal(table, (torch.bincount(keys, minlength=PATTERNS).double() * 0.25)[live])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("numel", "group_numel"), CASES)
def test_affine(loops, threads, dtype, numel, group_numel):
    w = weights(numel)
    groups = -(-numel // group_numel)
    shift, slope = torch.randn(groups * PATTERNS), torch.randn(groups * PATTERNS)
    grad = torch.randn(numel).to(dtype)
    grad[3] = float("nan")
    out = loops.affine(w.view(torch.uint16), group_numel, shift, slope, grad)
    keys = keys_of(w, group_numel)
    expected = (shift[keys] + grad.float() * slope[keys]).to(dtype)  # float32, rounded once
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("filled", [(), (0,), (3, 65535, 65536, 2 * PATTERNS - 1), tuple(range(2 * PATTERNS))])
def test_present_equals_nonzero(loops, filled):
    table = torch.zeros(2 * PATTERNS, dtype=torch.int64)
    table[list(filled)] = 2
    assert torch.equal(loops.present(table), torch.nonzero(table).flatten())


def test_the_registry_picks_a_native_loop_only_for_dtypes_it_takes(loops):
    bf16 = kernels.select("cpu", torch.bfloat16, "native")
    assert bf16.backend == "native" and bf16.count is cpu.count and bf16.affine is cpu.affine
    assert bf16.affine_table == torch.float32
    half = kernels.select("cpu", torch.float16, "native")  # no float16 sum or affine loop: the torch kernels
    assert half.sum_per_key is default.sum_per_key and half.affine is default.affine and half.affine_table is None
    assert half.expand is cpu.expand
    fallback = kernels.select("cpu", torch.bfloat16, "torch")
    assert all(getattr(fallback, name) is getattr(default, name) for name in kernels.NAMES)
    with pytest.raises(ValueError, match="backend"):
        kernels.select("cpu", torch.float32, "fast")


def test_the_dispatcher_op_equals_the_kernels(loops):
    p = weights(1000).view(torch.uint16)
    assert torch.equal(torch.ops.torchdkm.count(p, 300, 4 * PATTERNS), default.count(p, 300, 4 * PATTERNS))
    sums = torch.zeros(2, 5, dtype=torch.float64)
    torch.ops.torchdkm.scatter(sums, torch.tensor([0, 4, 4]), torch.ones(2, 3))
    assert sums[:, 4].tolist() == [2.0, 2.0]


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("TORCHDKM_NATIVE", "0")
    assert not kernels.native_available()
    assert kernels.select("cpu", torch.bfloat16).backend == "torch"


def test_a_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    """No compiler: one warning naming it, ``kernels()`` is None, and uniquified DKM still runs (torch code)."""
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TORCHDKM_CACHE", str(tmp_path / "cache"))
    build.forget()
    try:
        with pytest.warns(UserWarning, match="no-such-cc"):
            assert build.library() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # tried once per process: no second warning
            assert build.library() is None
        assert kernels.select("cpu", torch.bfloat16).backend == "torch"
        _check_unique_step_runs()
    finally:
        build.forget()


def _check_unique_step_runs():
    from torchdkm.cluster import WeightClusterer
    from torchdkm.config import LayerConfig

    weight = (torch.randn(8, 8) * 0.05).to(torch.bfloat16).requires_grad_(True)
    clusterer = WeightClusterer("layer", LayerConfig(bits=2, min_numel=0), weight.shape)
    out = clusterer.soft(weight, clusterer.init(weight)).weight
    out.float().sum().backward()
    assert weight.grad is not None and bool(torch.isfinite(weight.grad.float()).all())


def test_a_compiler_error_warns_with_its_message(monkeypatch, tmp_path):
    """A compiler that fails: the warning carries its message, and nothing half-built is left in the cache."""
    fake = tmp_path / "bad-cc"
    fake.write_text("#!/bin/sh\necho 'bad-cc: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    monkeypatch.setenv("TORCHDKM_CACHE", str(tmp_path / "cache"))
    build.forget()
    try:
        with pytest.warns(UserWarning, match="cannot compile"):
            assert build.library() is None
        assert list((tmp_path / "cache").iterdir()) == []
    finally:
        build.forget()


def test_build_is_cached(monkeypatch, tmp_path):
    """The compiled loops go to the cache folder once; a fresh process state loads them from there."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler on this machine")
    monkeypatch.setenv("TORCHDKM_CACHE", str(tmp_path))
    build.forget()
    try:
        assert build.library() is not None
        built = list(tmp_path.glob("native_loops-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        build.forget()
        assert build.library() is not None
        assert built[0].stat().st_mtime_ns == stamp
    finally:
        build.forget()



def test_a_forked_process_starts_its_own_thread_pool(loops, monkeypatch):
    """A pool started before a fork has no threads in the child: the child (another pid) starts its own.

    (Simulated by another pid: a real forked child would hang in torch's own OpenMP regions first.)
    """
    monkeypatch.setattr(cpu, "MIN_PARALLEL", 1)
    torch.set_num_threads(2)
    p = weights(1000).view(torch.uint16)
    first = loops.count(p, 1000, PATTERNS)
    pool = cpu._pool[0]
    monkeypatch.setattr(cpu.os, "getpid", lambda: -1)
    assert torch.equal(loops.count(p, 1000, PATTERNS), first)
    assert cpu._pool[0] is not pool and cpu._pool[2] == -1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("transposed", [False, True], ids=["contiguous", "strided"])
def test_scatter_equals_torch_scatter_add(loops, dtype, transposed):
    g = torch.Generator().manual_seed(1)
    cols, items, bins = 5, 3000, 17
    keys = torch.randint(0, bins, (items,), generator=g).to(torch.uint8)  # (any integer dtype)
    src = torch.randn(items, cols, generator=g).to(dtype).t() if transposed else torch.randn(cols, items).to(dtype)
    sums = torch.randn(cols, bins, dtype=torch.float64)
    expected = sums.clone()
    default.scatter(expected, keys, src)
    loops.scatter(sums, keys, src)
    assert torch.equal(sums, expected)  # float64 adds in item order, bit for bit
    spare = torch.zeros(cols, bins + 1, dtype=torch.float64)  # rows contiguous, the row stride not bins
    loops.scatter(spare[:, :bins], keys, src)
    assert not spare[:, bins].any()
    reference = torch.zeros(cols, bins, dtype=torch.float64)
    default.scatter(reference, keys, src)
    assert torch.equal(spare[:, :bins], reference)


def test_scatter_rejects_a_key_out_of_range_and_adds_nothing(loops):
    sums = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(IndexError, match="key 4 at item 2 is outside"):
        loops.scatter(sums, torch.tensor([0, 1, 4]), torch.ones(2, 3))
    assert not sums.any()


def test_scatter_refuses_what_it_does_not_take(loops):
    keys = torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match="float64"):
        loops.scatter(torch.zeros(2, 4), keys, torch.ones(2, 3))  # float32 sums
    with pytest.raises(ValueError, match="contiguous rows"):
        loops.scatter(torch.zeros(4, 2, dtype=torch.float64).t(), keys, torch.ones(2, 3))  # strided rows
    assert kernels.select("cpu", torch.float16).scatter is cpu.scatter  # (the compute dtype, float32, is taken)


def test_sum_refuses_to_lose_a_key_missing_from_the_live_ones(loops):
    w = weights(100)
    keys = keys_of(w, 100)
    live = torch.unique(keys)[1:]  # one key that occurs is left out
    with pytest.raises(ValueError, match="not among the live keys"):
        loops.sum_per_key(w.view(torch.uint16), 100, torch.ones(100), live, PATTERNS, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [1, 2, 4, 5])
@pytest.mark.parametrize("first", ["all", "second"])
@pytest.mark.parametrize("multiplicity", [False, True], ids=["m=1", "m"])
def test_gram_scatter_equals_the_torch_kernel_bit_for_bit(loops, dtype, d, first, multiplicity):
    g = torch.Generator().manual_seed(d)
    start = 0 if first == "all" else 1 + d
    terms = 1 + d + d * (d + 1) // 2 - start
    xf = torch.randn(d, 3, 700, generator=g).to(dtype)
    xt = xf[:, :, 100:600]  # (d, G, r), strided like the selection's rows
    m = torch.rand(3, 700, generator=g).to(dtype)[:, 100:600] if multiplicity else None
    if m is not None:
        m[:, ::9] = 0  # padding rows (skipped by the loop: they add zeros)
    keys = torch.randint(0, 11, (3 * 500,), generator=g)
    expected, got = torch.zeros(terms, 11, dtype=torch.float64), torch.zeros(terms, 11, dtype=torch.float64)
    default.gram_scatter(expected, keys, xt, m, start)
    loops.gram_scatter(got, keys, xt, m, start)
    assert torch.equal(got, expected)
    flat, flat_m = xf.reshape(d, -1)[:, :500], None if m is None else m.reshape(-1)[:500]  # (d, r) rows
    expected.zero_(), got.zero_()
    default.gram_scatter(expected, keys[:500], flat, flat_m, start)
    loops.gram_scatter(got, keys[:500], flat, flat_m, start)
    assert torch.equal(got, expected)


def test_gram_scatter_rejects_a_key_out_of_range_and_adds_nothing(loops):
    sums = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(IndexError, match="key 4 at row 1 is outside"):
        loops.gram_scatter(sums, torch.tensor([0, 4]), torch.ones(1, 2), None, 0)
    assert not sums.any()
    with pytest.raises(ValueError, match="sums"):
        loops.gram_scatter(torch.zeros(2, 4, dtype=torch.float64), torch.tensor([0, 1]), torch.ones(1, 2), None, 0)


def row_sets_case(dtype, g=3, d=4, r=600, k=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    xt = torch.randn(d, g, r, generator=gen).to(dtype).transpose(0, 1)  # (G, d, r), coordinate-major like the rows
    c = (torch.randn(g, k, d, generator=gen) * 0.8).to(dtype)
    inv_tau = (1.0 / torch.tensor([0.05, 0.002, 0.3])[:g]).to(dtype).view(-1, 1)  # soft, mostly hard, soft
    pad = torch.zeros(g, r, dtype=torch.bool)
    pad[-1, -40:] = True
    eps = torch.finfo(dtype).eps
    return xt, c, inv_tau, pad, 8.0 - math.log(eps), 1.0


def exact_distances(xt, c):
    """(G, k, r) squared distances in float64 from the differences."""
    return (xt.double().unsqueeze(1) - c.double().unsqueeze(-1)).square().sum(2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("top", [1, 2, 4])
def test_row_sets_is_the_torch_kernel_with_tighter_bounds(loops, threads, dtype, top):
    """Same sets, hard rows a superset of the torch kernel's, scores at least as high, and every bound safe."""
    xt, c, inv_tau, pad, hard_score, reselect = row_sets_case(dtype)
    ti, th, ts, tl = default.row_sets(xt, c, inv_tau, top, pad, None, None, None, hard_score, reselect)
    ni, nh, ns, nl = loops.row_sets(xt, c, inv_tau, top, pad, None, None, None, hard_score, reselect)
    real = ~pad
    assert 0 < int(th[real].sum()) < int(real.sum()), "the case should have hard and soft rows"
    assert bool((nh >= th).all()) and torch.equal(nh[pad], pad[pad])
    assert torch.equal(ni[:, 0][real], ti[:, 0][real])  # no near-ties in random data
    soft = real & ~nh
    assert torch.equal(ni.permute(1, 0, 2)[:, soft], ti.permute(1, 0, 2)[:, soft])
    assert bool((ns[real] >= ts[real] - 1e-4 * ts[real].abs().clamp_min(1)).all())
    assert bool(torch.isinf(ns[pad]).all()) and bool(torch.isinf(nl[pad]).all())
    # the bounds behind the scores hold for the exact distances
    dist = exact_distances(xt, c)
    sorted_dist = dist.sort(1).values
    k = c.shape[1]
    bound = torch.where(nh, sorted_dist[:, 1], sorted_dist[:, min(top, k - 1)])
    log_out = torch.where(nh, math.log(k - 1), math.log(k - top))
    exact_score = (bound - sorted_dist[:, 0]) * inv_tau.double() - log_out
    assert bool((ns.double()[real] <= exact_score[real] + 1e-6 * exact_score[real].abs() + 1e-6).all())
    assert bool((nl[real] >= 0).all()) and bool((nl[real] <= bound[real].sqrt().to(dtype) * (1 + 1e-6)).all())


def test_row_sets_rounds_no_hard_row_soft(loops):
    """A row the torch kernel scores hard is hard here too, also when it is all but a tie."""
    xt, c, inv_tau, pad, hard_score, reselect = row_sets_case(torch.float32, g=1, r=50)
    c[0, 1] = c[0, 0] + 1e-4  # two centroids almost on top of each other: the rows near them soft
    _, th, _, _ = default.row_sets(xt, c, inv_tau, 4, None, None, None, None, hard_score, reselect)
    _, nh, _, _ = loops.row_sets(xt, c, inv_tau, 4, None, None, None, None, hard_score, reselect)
    assert bool((nh >= th).all()) and not bool(nh.all())


def test_sparse_steps_agree_across_backends():
    """One sparse DKM step (forward and backward) with the native kernels and with the torch kernels."""
    if build.library() is None:
        pytest.skip("no native loops here")
    from torchdkm.cluster import WeightClusterer
    from torchdkm.config import LayerConfig

    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(48, 64, generator=gen, dtype=torch.float64) * 0.05
    results = {}
    for backend in ("native", "torch"):
        cl = WeightClusterer("layer", LayerConfig(bits=4, dim=4, max_iters=3, top_m=4), weight.shape, backend=backend)
        w = weight.clone().requires_grad_()
        out = cl.soft(w, cl.init(weight)).weight
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results[backend] = (out.detach(), w.grad)
    for a, b in zip(results["native"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [2, 16, 100])
def test_nearest_two_is_the_torch_kernel_untruncated(loops, threads, dtype, k):
    gen = torch.Generator().manual_seed(k)
    xt = torch.randn(4, 3, 333, generator=gen).to(dtype).transpose(0, 1)  # (G, d, r), coordinate-major
    c = torch.randn(3, k, 4, generator=gen).to(dtype)
    ti, tf, ts = default.nearest_two(xt, c)
    ni, nf, ns = loops.nearest_two(xt, c)
    assert torch.equal(ni, ti)  # (no near-ties in random data)
    exact = exact_distances(xt, c).sort(1).values
    for got, packed, true in ((nf, tf, exact[:, 0]), (ns, ts, exact[:, 1])):
        torch.testing.assert_close(got.double(), true, rtol=8 * torch.finfo(dtype).eps, atol=0)
        torch.testing.assert_close(packed, got, rtol=1e-4, atol=1e-4)  # (a matmul's rounding, truncated)

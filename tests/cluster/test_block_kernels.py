"""The block-scale kernels (``normalise``, ``rescale`` and their gradients): the torch kernels against the
chain of torch ops they replace (autograd's gradient of it included), the native loops against the torch
kernels, and the gradient of :class:`BlockScales` by finite differences."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from torchdkm.cluster import scales as scales_module
from torchdkm.cluster.scales import BlockScales
from torchdkm.kernels import build, cpu, default

F64 = torch.float64
#: (rows, row_len, block): blocks that divide the row, a short last block, one block per row
SHAPES = [(6, 64, 16), (5, 70, 32), (4, 10, 4), (3, 9, 9)]


def with_ties(rows: int, row_len: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Weights on a coarse grid (many equal values: ties at the blocks' extremes), one row of zeros."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-4, 5, (rows, row_len), generator=g).to(dtype) / 4
    w[0] = 0
    return w


def reference(weight: torch.Tensor, block: int, offset: bool):
    """The normalisation as a chain of torch ops, rounding straight through (what the Function replaces)."""
    blocked = default.blocked(weight, block, "replicate")
    st = lambda v: v.detach().to(scales_module.STORED).to(v.dtype) + (v - v.detach())  # noqa: E731
    if offset:
        high, low = blocked.amax(-1), blocked.amin(-1)
        scale, shift = st((high - low) / 2), st((high + low) / 2)
    else:
        scale, shift = st(blocked.abs().amax(-1)), None
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    expand = lambda t: t.repeat_interleave(block, dim=1)[:, : weight.shape[1]]  # noqa: E731
    flat = weight - expand(shift) if shift is not None else weight
    return flat / expand(safe), scale, shift


def rescaled(n: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor | None, block: int) -> torch.Tensor:
    expand = lambda t: t.repeat_interleave(block, dim=1)[:, : n.shape[1]]  # noqa: E731
    out = n * expand(scale)
    return out + expand(shift) if shift is not None else out


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize(("rows", "row_len", "block"), SHAPES)
def test_the_function_matches_the_chain_of_torch_ops(rows, row_len, block, offset):
    """Forward bit for bit; gradient (through a rescale too, as in training) to rounding."""
    blocks = BlockScales(rows, row_len, block, offset)
    weight = with_ties(rows, row_len, F64).requires_grad_(True)
    mine = weight.detach().clone().requires_grad_(True)
    n, s, o = reference(weight, block, offset)
    m, ms, mo = blocks.normalise(mine)
    assert torch.equal(n, m) and torch.equal(s, ms) and (o is None or torch.equal(o, mo))
    probe = torch.randn(rows, row_len, dtype=F64, generator=torch.Generator().manual_seed(1))
    soft = lambda t: t * 0.75 + t.pow(2) * 0.125  # noqa: E731  (stands for DKM between the two)
    (rescaled(soft(n), s, o, block) * probe).sum().backward()
    (blocks.apply(soft(m), ms, mo) * probe).sum().backward()
    torch.testing.assert_close(mine.grad, weight.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("offset", [False, True])
def test_gradcheck_with_unrounded_scales(monkeypatch, offset):
    monkeypatch.setattr(scales_module, "STORED", F64)
    blocks = BlockScales(4, 10, 4, offset)
    weight = torch.randn(4, 10, dtype=F64, generator=torch.Generator().manual_seed(2)).requires_grad_(True)
    probe = torch.randn(4, 10, dtype=F64)

    def f(w):
        n, s, o = blocks.normalise(w)
        return blocks.apply(n.sin() * probe, s, o)

    assert gradcheck(f, (weight,), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.fixture
def native():
    if build.library() is None:
        pytest.skip("no native loops here")
    return cpu


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize(("rows", "row_len", "block"), SHAPES)
def test_native_loops_match_the_torch_kernels(native, monkeypatch, threads, rows, row_len, block, offset):
    monkeypatch.setattr(cpu, "MIN_PARALLEL", 1)
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(rows * row_len)
    weight = with_ties(rows, row_len) * 0.37
    grad = torch.randn(rows, row_len, generator=g)
    blocked = default.blocked(weight, block, "replicate")
    high, low = blocked.amax(-1), blocked.amin(-1)
    if not offset:
        high, low = torch.maximum(high, -low), None
    scale = high if low is None else (high - low) / 2
    shift = None if low is None else (high + low) / 2
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    extra_scale, extra_offset = torch.randn(scale.shape, generator=g), torch.randn(scale.shape, generator=g)
    for kernel in ("normalise", "rescale"):
        table = safe if kernel == "normalise" else scale
        assert torch.equal(getattr(native, kernel)(weight, block, table, shift), getattr(default, kernel)(weight, block, table, shift))
    for got, want in zip(native.rescale_grad(grad, weight, block, scale), default.rescale_grad(grad, weight, block, scale)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for extras in ((None, None), (extra_scale, extra_offset if offset else None)):
        args = (grad, weight, block, scale, safe, shift, high, low, *extras)
        torch.testing.assert_close(native.normalise_grad(*args), default.normalise_grad(*args), rtol=1e-5, atol=1e-5)


def test_native_loops_refuse_other_dtypes(native):
    w = torch.randn(2, 8, dtype=F64)
    with pytest.raises(ValueError, match="float32"):
        native.normalise(w, 4, torch.ones(2, 2, dtype=F64), None)


def test_registered_ops_match_the_torch_kernels():
    weight, safe = with_ties(3, 12) + 2, torch.full((3, 3), 2.0)
    assert torch.equal(torch.ops.torchdkm.normalise(weight, 4, safe, None), default.normalise(weight, 4, safe, None))

"""Palettized inference from the packed indices: the LUT kernels against decode-then-matmul.

Every bits/dim/group combination, odd shapes, 1-3 threads, both native instruction paths (and the scalar
loop) and the torch kernel; float64 reference, tolerance ``kernels.lut.RTOL``.  Embedding lookups and
decoded rows are compared bit for bit.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm.cluster import Layout
from torchdkm.kernels import default
from torchdkm.kernels import lut as lut_kernels
from torchdkm.nn import PaletteSpec, keep_decoded
from torchdkm.nn.palettized import palettize_module
from torchdkm.pack import pack

native = pytest.mark.skipif(not lut_kernels.available(), reason="no C compiler: the native loops are not built")
ISAS = ["avx512", "avx2", "scalar"]
# (out, row_len, group_size): odd shapes, partial groups, rows not a multiple of 16 (or of dim: 3 and 5)
SHAPES = [(24, 64, 8), (13, 37, 5), (7, 70, 3), (33, 200, 33), (5, 5, 2)]


def packed_weight(bits: int, dim: int, out: int, row_len: int, group_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    layout = Layout((out, row_len), dim, group_size)
    index = torch.randint(0, 2**bits, (layout.groups, layout.vectors), generator=g)
    lut = torch.randn(layout.groups, 2**bits, dim, generator=g)
    return pack(index.reshape(-1), bits), lut, layout.decode(index, lut)


def check_product(y: torch.Tensor, x: torch.Tensor, dense: torch.Tensor) -> None:
    reference = x.double() @ dense.double().T
    scale = x.double().abs() @ dense.double().abs().T
    assert y.dtype == x.dtype and y.shape == reference.shape
    assert bool(((y.double() - reference).abs() <= lut_kernels.RTOL * scale + 1e-30).all())


@pytest.fixture
def isa():
    """Run with each instruction path, then restore the best."""
    yield lut_kernels.isa
    lut_kernels.isa("avx512")


@native
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dim", [1, 2, 4, 3])
def test_native_kernels_equal_decode_then_matmul(bits, dim, isa):
    for out, row_len, group_size in SHAPES:
        if group_size * row_len < dim:
            continue
        packed, lut, dense = packed_weight(bits, dim, out, row_len, group_size, seed=bits * 10 + dim)
        rows = torch.arange(out)
        assert torch.equal(default.lut_rows(packed, lut, bits, dim, group_size, row_len, rows), dense)
        for path in ISAS:
            isa(path)
            assert torch.equal(lut_kernels.lut_rows(packed, lut, bits, dim, group_size, row_len, rows), dense), path
            for n in (1, 2, 3, 8, 11, 17):  # the direct product (1..16 rows, 8 at a time), then tiles and a GEMM
                x = torch.randn(n, row_len)
                check_product(lut_kernels.lut_linear(x, packed, lut, bits, dim, group_size, out, None), x, dense)


@native
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_kernels_on_threads(threads, monkeypatch, isa):
    monkeypatch.setattr(lut_kernels, "MIN_PARALLEL", 0)
    monkeypatch.setattr(lut_kernels, "MIN_GEMV_PARALLEL", 0)  # the native pool (pool.c), threads parts
    monkeypatch.setattr(lut_kernels, "TILE", 1000)  # several tiles
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for path in ("avx512", "avx2"):  # more rows: lut_gemm.c on AVX-512, decoded tiles and torch's GEMM on AVX2
            isa(path)
            packed, lut, dense = packed_weight(3, 1, 301, 130, 64)
            for n in (1, 5, 40):
                x = torch.randn(n, 130)
                check_product(lut_kernels.lut_linear(x, packed, lut, 3, 1, 64, 301, None), x, dense)
            rows = torch.randint(0, 301, (257,))
            assert torch.equal(lut_kernels.lut_rows(packed, lut, 3, 1, 64, 130, rows), dense[rows])
            packed, lut, dense = packed_weight(4, 2, 23, 40, 5)  # one tile: the whole weight decoded on the threads
            x = torch.randn(40, 40)
            check_product(lut_kernels.lut_linear(x, packed, lut, 4, 2, 5, 23, None), x, dense)
            packed, lut, dense = packed_weight(3, 1, 2, 16, 2)  # fewer rows than threads: no empty part runs
            x = torch.randn(1, 16)
            check_product(lut_kernels.PackedWeight(packed, lut, 3, 1, 2, 2, 16).linear(x, None), x, dense)
    finally:
        torch.set_num_threads(before)


@native
@pytest.mark.skipif(lut_kernels.isa() != "avx512", reason="lut_gemm.c runs on AVX-512 only")
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_native_gemm_blocks_panels_and_threads(threads, monkeypatch):
    """lut_gemm.c: several blocks of rows (512) and of inputs (256, with a tail), panels of 32 outputs with a
    partial last one, the bias, block scales, threads taking panels as they go; as decode-then-matmul."""
    monkeypatch.setattr(lut_kernels, "GEMM_ROWS", 10**6)
    monkeypatch.setattr(lut_kernels, "MIN_GEMV_PARALLEL", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for bits, dim, out, row_len, group, n in [(3, 1, 70, 600, 7, 530), (4, 2, 33, 100, 33, 17), (2, 4, 96, 264, 96, 40)]:
            packed, lut, scales, offsets, dense = scaled_weight(bits, dim, out, row_len, group, 8 * dim, True, seed=bits)
            weight = lut_kernels.PackedWeight(packed, lut, bits, dim, group, out, row_len, scales, offsets, 8 * dim)
            assert weight.gemm
            x, bias = torch.randn(n, row_len), torch.randn(out)
            check_product(weight.linear(x, bias) - bias, x, dense)
            plain = lut_kernels.PackedWeight(packed, lut, bits, dim, group, out, row_len)
            check_product(plain.linear(x, None), x, plain.rows(torch.arange(out)))
        lut_kernels.isa("avx2")  # a weight prepared under AVX-512, used after the cap: decoded tiles
        check_product(plain.linear(x, None), x, plain.rows(torch.arange(out)))
    finally:
        lut_kernels.isa("avx512")
        torch.set_num_threads(before)


@native
def test_native_pool_runs_from_several_python_threads_and_in_a_forked_child(monkeypatch):
    """Callers are serialised (each gets its own product); a forked child starts its own workers."""
    import multiprocessing
    import threading

    monkeypatch.setattr(lut_kernels, "MIN_GEMV_PARALLEL", 0)
    packed, lut, dense = packed_weight(4, 2, 64, 96, 16)
    weight = lut_kernels.PackedWeight(packed, lut, 4, 2, 16, 64, 96)
    inputs = [torch.randn(3 if i % 2 else 40, 96) for i in range(4)]  # the direct product and lut_gemm.c's GEMM
    weight.linear(inputs[0], None)  # the pool's workers start in this process
    outputs: dict[int, torch.Tensor] = {}

    def run(i: int) -> None:
        for _ in range(20):
            outputs[i] = weight.linear(inputs[i], None)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i, x in enumerate(inputs):
        check_product(outputs[i], x, dense)
    context = multiprocessing.get_context("fork")
    with context.Pool(1) as pool:
        y = pool.apply(_pool_child, (packed, lut, inputs[1]))
    check_product(y, inputs[1], dense)


def _pool_child(packed, lut, x):
    lut_kernels.MIN_GEMV_PARALLEL = 0
    torch.set_num_threads(2)
    return lut_kernels.PackedWeight(packed, lut, 4, 2, 16, 64, 96).linear(x, None)


@pytest.mark.parametrize("bits", [1, 3, 4, 8])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_torch_kernel_equals_decode_then_matmul(bits, dim, monkeypatch):
    monkeypatch.setattr(default, "LUT_TILE", 100)  # several tiles
    for out, row_len, group_size in SHAPES:
        packed, lut, dense = packed_weight(bits, dim, out, row_len, group_size)
        for n in (1, 9):
            x = torch.randn(2, n, row_len)
            bias = torch.randn(out)
            y = default.lut_linear(x, packed, lut, bits, dim, group_size, out, bias)
            check_product((y - bias).reshape(-1, out), x.reshape(-1, row_len), dense)


def test_16_bit_luts_decode_bit_for_bit():
    packed, lut, dense = packed_weight(4, 2, 9, 50, 4)
    rows = torch.tensor([8, 0, 3, 3])
    for dtype in (torch.bfloat16, torch.float16):
        want = dense.to(dtype)[rows]  # rounding commutes with the lookup
        assert torch.equal(default.lut_rows(packed, lut.to(dtype), 4, 2, 4, 50, rows), want)
        assert torch.equal(torch.ops.torchdkm.lut_rows(packed, lut.to(dtype), 4, 2, 4, 50, rows), want)


def test_op_rejects_a_short_packed_tensor():
    packed, lut, _ = packed_weight(3, 1, 8, 16, 8)
    if lut_kernels.available():
        with pytest.raises(torchdkm.TorchdkmError, match="need 48 uint8 bytes, got 40"):
            lut_kernels.lut_linear(torch.randn(1, 16), packed[:40], lut, 3, 1, 8, 8, None)


def palettized(module: nn.Module, bits: int = 3, dim: int = 1):
    packed, lut, dense = packed_weight(bits, dim, module.weight.shape[0], module.weight[0].numel(), 8)
    spec = PaletteSpec(tuple(module.weight.shape), bits, dim, 8)
    return palettize_module(module, {"weight": (spec, packed, lut)}), dense.view(module.weight.shape)


def test_embedding_lookup_is_the_dense_lookup_bit_for_bit():
    module, dense = palettized(nn.Embedding(50, 24, padding_idx=3), bits=4, dim=2)
    ids = torch.randint(0, 50, (4, 7))
    assert torch.equal(module(ids), nn.functional.embedding(ids, dense, padding_idx=3))
    with pytest.raises(IndexError):
        module(torch.tensor([50]))


def test_large_conv_runs_a_tile_at_a_time(monkeypatch):
    from torchdkm.nn import inference

    monkeypatch.setattr(inference, "CONV_TILE", 200)
    for conv, x in [
        (nn.Conv2d(4, 16, 3, padding=1, padding_mode="reflect"), torch.randn(2, 4, 7, 7)),
        (nn.Conv2d(8, 16, 3, groups=4), torch.randn(1, 8, 6, 6)),
        (nn.Conv1d(4, 12, 2, stride=2), torch.randn(2, 4, 9)),
    ]:
        module, dense = palettized(conv)
        reference = copy.deepcopy(conv)
        reference.weight = nn.Parameter(dense)
        torch.testing.assert_close(module(x), reference(x), rtol=1e-5, atol=1e-5)


def test_linear_forward_never_decodes_the_weight():
    module, dense = palettized(nn.Linear(1024, 1024), bits=3)
    x = torch.randn(1, 1024)
    module(x)
    calls = []
    original = PaletteSpec.decode
    PaletteSpec.decode = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        y = module(x)
    finally:
        PaletteSpec.decode = original
    assert not calls
    check_product(y - module.bias, x, dense)


@native
def test_decoding_inputs_of_any_layout_take_the_same_product():
    """A few tokens in a (batch, tokens, features) input, contiguous or not, empty, with the bias: the
    module's forward (the direct product without reshapes where it can) is decode-then-matmul."""
    module, dense = palettized(nn.Linear(96, 40), bits=3)
    with torch.no_grad():
        for x in (torch.randn(1, 1, 96), torch.randn(3, 5, 96), torch.randn(2, 8, 96), torch.randn(96, 4).T,
                  torch.randn(4, 2, 96).transpose(0, 1), torch.randn(0, 96)):  # fmt: skip
            y = module(x)
            assert y.shape == (*x.shape[:-1], 40) and y.is_contiguous()
            flat = x.reshape(-1, 96)
            check_product((y - module.bias).reshape(-1, 40), flat, dense)
        with pytest.raises(RuntimeError):
            module(torch.randn(1, 95))


def test_keep_decoded_is_an_opt_in():
    module, dense = palettized(nn.Linear(40, 24))
    keep_decoded(module)
    assert module.decoded_copy() is module.decoded_copy()  # decoded once, kept
    x = torch.randn(3, 40)
    assert torch.equal(module(x), nn.functional.linear(x, dense, module.bias))
    keep_decoded(module, False)
    assert module.decoded_copy() is None


def test_compile_and_export_see_the_op():
    module, dense = palettized(nn.Linear(40, 24))
    x = torch.randn(3, 40)
    exported = torch.export.export(module, (x,))
    assert "torchdkm.lut_linear" in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), module(x))
    y = torch.randn(3, 40, requires_grad=True)
    module(y).sum().backward()  # the input's gradient: grad @ W, a tile at a time
    torch.testing.assert_close(y.grad, dense.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


# -- block scales: weight = LUT[index] * scale[row, block] (+ offset) ------------------------------------------


def scaled_weight(bits: int, dim: int, out: int, row_len: int, group_size: int, block: int, offset: bool, seed: int = 0):
    """A packed weight with float16 block scales (and offsets), and its decoded dense form."""
    packed, lut, plain = packed_weight(bits, dim, out, row_len, group_size, seed)
    g = torch.Generator().manual_seed(seed + 1)
    blocks = -(-row_len // min(block or row_len, row_len))
    scales = torch.rand(out, blocks, generator=g).add(0.5).half()
    offsets = torch.randn(out, blocks, generator=g).half() if offset else None
    dense = default.rescale(plain, min(block or row_len, row_len), scales.float(), None if offsets is None else offsets.float())
    return packed, lut, scales, offsets, dense


@native
@pytest.mark.parametrize("bits", [1, 3, 4, 7])
@pytest.mark.parametrize("dim", [1, 2, 4, 3])
@pytest.mark.parametrize("offset", [False, True])
def test_native_kernels_with_block_scales(bits, dim, offset, isa):
    # blocks of whole 16-index chunks (the vector loops), of one row (0 and longer than a row), and unaligned
    for out, row_len, group_size, block in [(9, 256, 4, 64 * dim), (5, 96 * dim, 5, 0), (7, 70, 3, 1000), (6, 96, 6, 12)]:
        if row_len % dim and block:
            block -= block % dim
        packed, lut, scales, offsets, dense = scaled_weight(bits, dim, out, row_len, group_size, block, offset, seed=bits)
        for path in ISAS:
            isa(path)
            weight = lut_kernels.PackedWeight(packed, lut, bits, dim, group_size, out, row_len, scales, offsets, block)
            assert torch.equal(weight.rows(torch.arange(out), scaled=True), dense), path  # bit for bit
            assert torch.equal(weight.rows(torch.arange(out)), default.lut_rows(packed, lut, bits, dim, group_size, row_len, torch.arange(out)))
            for n in (1, 3, 17):
                x = torch.randn(n, row_len)
                check_product(weight.linear(x, None), x, dense)
                y = lut_kernels.lut_linear(x, packed, lut, bits, dim, group_size, out, None, scales, offsets, block)
                check_product(y, x, dense)
                torch_y = default.lut_linear(x, packed, lut, bits, dim, group_size, out, None, scales, offsets, block)
                check_product(torch_y, x, dense)


@native
def test_block_scales_take_the_direct_product_when_chunks_fit_blocks():
    packed, lut, scales, offsets, _ = scaled_weight(3, 2, 4, 128, 4, 32, True)
    assert lut_kernels.PackedWeight(packed, lut, 3, 2, 4, 4, 128, scales, offsets, 32).direct  # 16 x 2 = 32
    packed, lut, scales, offsets, _ = scaled_weight(3, 2, 4, 128, 4, 16, True)
    assert not lut_kernels.PackedWeight(packed, lut, 3, 2, 4, 4, 128, scales, offsets, 16).direct
    with pytest.raises(torchdkm.TorchdkmError, match=r"scales of shape \(4, 8\) needed for blocks of 16, got \(4, 4\)"):
        lut_kernels.PackedWeight(packed, lut, 3, 2, 4, 4, 128, scales[:, :4], None, 16)


def scaled_linear(block: int = 32, offset: bool = True):
    module = nn.Linear(64, 12)
    packed, lut, scales, offsets, dense = scaled_weight(3, 1, 12, 64, 4, block, offset)
    spec = PaletteSpec((12, 64), 3, 1, 4, scale_block=block, scale_offset=offset)
    return palettize_module(module, {"weight": (spec, packed, lut, scales, offsets)}), dense


@pytest.mark.parametrize("grad", [False, True])
def test_linear_with_block_scales_never_decodes_the_weight(grad):
    module, dense = scaled_linear()
    torch.testing.assert_close(module.weight, dense)  # the decoder and the test agree on the weight
    calls = []
    original = PaletteSpec.decode
    PaletteSpec.decode = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        for n in (1, 40):
            x = torch.randn(n, 64, requires_grad=grad)
            with torch.set_grad_enabled(grad):
                y = module(x)
            check_product((y - module.bias).detach(), x.detach(), dense)
            if grad:  # through torch.ops.torchdkm.lut_linear's autograd: grad @ W, scaled tiles
                y.sum().backward()
                torch.testing.assert_close(x.grad, dense.sum(0).expand(n, -1), rtol=1e-5, atol=1e-5)
    finally:
        PaletteSpec.decode = original
    assert not calls


def test_kept_packed_weight_follows_its_buffers():
    """The forward's prepared packed weight is remade when a buffer changes in place or moves."""
    from torchdkm.nn.inference import packed_weight

    module, _ = scaled_linear()
    x = torch.randn(2, 64)
    with torch.no_grad():
        module(x)
        kept = packed_weight(module)
        assert packed_weight(module) is kept
        module.weight_scales.mul_(2)  # in place, as load_state_dict copies
        y = module(x)
        assert packed_weight(module) is not kept
        check_product(y - module.bias, x, module.weight)  # the weight decoded from the changed buffers
        copied = copy.deepcopy(module)  # the kept weight stays outside the module: copies work
        assert torch.equal(copied(x), y)


@native
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_block_scales_are_read_as_stored(dtype):
    """float16 tables are widened in the loops (subnormals, zeros and signs exactly); float32 ones read as is."""
    packed, lut, plain = packed_weight(4, 1, 6, 64, 3)
    values = torch.tensor([1e-7, -3e-6, 0.0, -0.0, 6.1e-5, -2.5, 65504.0, 1.0], dtype=torch.float16).to(dtype)
    scales, offsets = values[torch.arange(12) % 8].view(6, 2), values[(torch.arange(12) * 3) % 8].view(6, 2)
    dense = default.rescale(plain, 32, scales.float(), offsets.float())
    weight = lut_kernels.PackedWeight(packed, lut, 4, 1, 3, 6, 64, scales, offsets, 32)
    assert weight.scales.dtype == dtype and weight.direct
    assert torch.equal(weight.rows(torch.arange(6), scaled=True), dense)
    x = torch.randn(2, 64)
    check_product(weight.linear(x, None), x, dense)

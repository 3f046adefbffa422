"""Bit packing of indices: round trips, exact sizes, the documented bit order, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchdkm import TorchdkmError
from torchdkm.pack import pack, packed_size, unpack

LENGTHS = [0, 1, 2, 3, 7, 8, 9, 13, 64, 127, 1001]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("count", LENGTHS)
def test_round_trip_and_exact_size(bits, count):
    g = torch.Generator().manual_seed(bits * 10_000 + count)
    indices = torch.randint(0, 2**bits, (count,), generator=g)
    packed = pack(indices, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    assert packed.numel() == packed_size(count, bits) == -(-count * bits // 8)
    out = unpack(packed, bits, count)
    assert out.dtype == torch.int64
    assert torch.equal(out, indices)


@pytest.mark.parametrize("bits", range(1, 9))
def test_bit_order_is_little_endian_stream(bits):
    """Index i occupies stream bits [i*bits, (i+1)*bits), LSB first; bit b is bit b%8 of byte b//8."""
    count = 37
    indices = torch.randint(0, 2**bits, (count,), generator=torch.Generator().manual_seed(bits))
    stream = np.unpackbits(pack(indices, bits).numpy(), bitorder="little")
    assert not stream[count * bits :].any(), "the unused tail bits of the last byte are zero"
    values = stream[: count * bits].reshape(count, bits) @ (1 << np.arange(bits))
    assert values.tolist() == indices.tolist()


@pytest.mark.parametrize("bits", range(1, 9))
def test_extreme_values(bits):
    top = 2**bits - 1
    for indices in (torch.zeros(11, dtype=torch.long), torch.full((11,), top), torch.tensor([0, top] * 6)):
        assert torch.equal(unpack(pack(indices, bits), bits, indices.numel()), indices)


def test_accepts_other_integer_dtypes_and_shapes():
    indices = torch.randint(0, 8, (3, 5), dtype=torch.int32)
    packed = pack(indices, 3)
    assert torch.equal(unpack(packed, 3, 15), indices.reshape(-1).long())
    assert torch.equal(pack(indices.to(torch.uint8), 3), packed)


@pytest.mark.parametrize("bits", range(1, 9))
def test_out_of_range_indices_raise(bits):
    with pytest.raises(TorchdkmError, match=f"bits={bits}"):
        pack(torch.tensor([0, 2**bits]), bits)
    with pytest.raises(TorchdkmError):
        pack(torch.tensor([-1, 0]), bits)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True, None])
def test_bad_bit_widths_raise(bits):
    with pytest.raises(TorchdkmError, match="bits="):
        pack(torch.tensor([0, 1]), bits)
    with pytest.raises(TorchdkmError, match="bits="):
        unpack(torch.zeros(1, dtype=torch.uint8), bits, 1)


def test_unpack_checks_its_input():
    packed = pack(torch.arange(10) % 8, 3)  # 4 bytes
    with pytest.raises(TorchdkmError, match="expected 4 uint8 bytes"):
        unpack(packed[:3], 3, 10)
    with pytest.raises(TorchdkmError, match="expected 4"):
        unpack(torch.cat([packed, packed[:1]]), 3, 10)
    with pytest.raises(TorchdkmError, match="int32"):
        unpack(packed.to(torch.int32), 3, 10)
    with pytest.raises(TorchdkmError):
        unpack(packed.view(2, 2), 3, 10)

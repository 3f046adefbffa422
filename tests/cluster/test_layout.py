"""Layout: cutting a weight into groups of dim-long vectors, padding, and putting it back."""

from __future__ import annotations

import math

import pytest
import torch

from torchdkm.cluster import Layout

# (shape, dim, group_size): Linear, ConvNd and Embedding shapes; divisible and ragged cases.
CASES = [
    ((6, 8), 1, None),
    ((6, 8), 4, None),
    ((6, 8), 3, None),  # 48 weights: divisible overall, and per group
    ((5, 7), 3, 2),  # ragged last group and a partial vector in every group
    ((5, 7), 1, 2),  # ragged last group only
    ((4, 3, 3, 3), 6, 1),  # Conv2d, one LUT per output channel, 27 = 4 x 6 + 3
    ((3, 2, 5), 4, None),  # Conv1d
    ((2, 1, 2, 3, 3), 5, 2),  # Conv3d
    ((9, 4), 2, 4),  # Embedding-like, ragged group of one row
    ((7,), 2, None),  # 1-D weight: one value per row
]


def real_positions(layout: Layout) -> torch.Tensor:
    """Boolean (G, n, dim) mask of the slots that hold real weights, derived from first principles."""
    mask = torch.zeros(layout.groups, layout.vectors * layout.dim, dtype=torch.bool)
    for g in range(layout.groups):
        rows = min(layout.group_size, layout.out - g * layout.group_size)
        mask[g, : rows * layout.row_len] = True
    return mask.view(layout.groups, layout.vectors, layout.dim)


@pytest.mark.parametrize(("shape", "dim", "group_size"), CASES)
def test_round_trip_and_counts(shape, dim, group_size):
    layout = Layout.of(shape, dim, group_size)
    weight = torch.arange(1, math.prod(shape) + 1, dtype=torch.float32).reshape(shape)
    vectors = layout.to_vectors(weight)
    assert vectors.shape == (layout.groups, layout.vectors, dim)
    assert torch.equal(layout.from_vectors(vectors), weight)
    assert sum(layout.real_counts()) == weight.numel() == layout.numel
    # The real slots hold the weights in memory order, group after group; the rest is zero.
    mask = real_positions(layout)
    assert torch.equal(vectors[mask], weight.reshape(-1))
    assert not vectors[~mask].any()
    assert layout.padded == bool((~mask).any())


@pytest.mark.parametrize(("shape", "dim", "group_size"), CASES)
def test_multiplicity_marks_only_whole_real_vectors(shape, dim, group_size):
    layout = Layout.of(shape, dim, group_size)
    m = layout.multiplicity(torch.float32, torch.device("cpu"))
    whole = real_positions(layout).all(-1)
    if not layout.padded:
        assert m is None
        return
    assert torch.equal(m, whole.float())
    partial = real_positions(layout).any(-1) & ~whole
    expected = [(g, v, int(real_positions(layout)[g, v].sum())) for g, v in partial.nonzero().tolist()]
    assert layout.partial_vectors() == expected
    part = layout.partial_mask(torch.device("cpu"))
    if expected:
        groups, index, mask = part
        assert groups.tolist() == [e[0] for e in expected] and index.tolist() == [e[1] for e in expected]
        assert torch.equal(mask, real_positions(layout)[groups, index])
    else:
        assert part is None


def test_groups_and_sizes():
    layout = Layout.of((10, 6), 4, 4)
    assert (layout.out, layout.row_len, layout.group_size, layout.groups) == (10, 6, 4, 3)
    assert layout.group_numel == 24 and layout.vectors == 6
    assert layout.real_counts() == [24, 24, 12]
    assert Layout.of((10, 6), 4, None).group_size == 10  # one LUT for the whole tensor
    assert Layout.of((10, 6), 4, 64).group_size == 10  # a group never exceeds the tensor


def test_unpadded_to_vectors_is_a_view():
    weight = torch.randn(4, 6)
    vectors = Layout.of(weight.shape, 3, 2).to_vectors(weight)
    assert vectors.data_ptr() == weight.data_ptr()


@pytest.mark.parametrize(("shape", "dim", "group_size"), CASES)
def test_decode_gathers_lut_entries(shape, dim, group_size):
    layout = Layout.of(shape, dim, group_size)
    k = 4
    lut = torch.randn(layout.groups, k, dim)
    index = torch.randint(0, k, (layout.groups, layout.vectors))
    dense = layout.decode(index, lut)
    assert dense.shape == shape
    vectors = layout.to_vectors(dense)
    mask = real_positions(layout)
    expected = lut[torch.arange(layout.groups)[:, None], index]  # (G, n, dim)
    assert torch.equal(vectors[mask], expected[mask])

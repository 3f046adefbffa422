"""Uniform quantization and its size accounting: the baselines must be right for the comparison to mean anything."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from experiments.baselines import (
    _round_to_grid,
    bits_by_type,
    fake_quantize,
    uniform_qat_,
    uniform_quantize_,
    uniform_size,
    unpalettized,
)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_each_row_uses_at_most_2_to_the_bits_levels(bits: int) -> None:
    weight = torch.randn(6, 50)
    rounded = fake_quantize(weight, bits)
    for row in rounded:
        assert torch.unique(row).numel() <= 2**bits
    # the clipping search never does worse, row by row, than the plain min-max grid (its first candidate)
    low, high = weight.amin(1, keepdim=True), weight.amax(1, keepdim=True)
    minmax = _round_to_grid(weight, low, high, 2**bits - 1)
    assert ((rounded - weight).pow(2).sum(1) <= (minmax - weight).pow(2).sum(1) + 1e-9).all()
    assert ((minmax - weight).abs().amax(1) <= 0.5 * (high - low).squeeze(1) / (2**bits - 1) * 1.01 + 1e-3).all()


def test_clipping_search_helps_a_row_with_an_outlier() -> None:
    row = torch.cat([torch.linspace(-1, 1, 255), torch.tensor([12.0])])[None]
    minmax = _round_to_grid(row, row.amin(1, keepdim=True), row.amax(1, keepdim=True), 15)
    assert (fake_quantize(row, 4) - row).pow(2).sum() < 0.95 * (minmax - row).pow(2).sum()


def test_row_extremes_are_kept_at_8_bits() -> None:
    weight = torch.randn(4, 64)
    rounded = fake_quantize(weight, 8)
    assert torch.allclose(rounded.amin(1), weight.amin(1), atol=2e-3)
    assert torch.allclose(rounded.amax(1), weight.amax(1), atol=2e-2)


def test_bits_by_type_and_its_errors() -> None:
    assert bits_by_type("fc:3/1, emb:2/1") == {nn.Linear: 3, nn.Embedding: 2}
    assert bits_by_type("cv:4/4, fc:4/2") == {nn.Conv1d: 1, nn.Conv2d: 1, nn.Conv3d: 1, nn.Linear: 2}
    with pytest.raises(ValueError, match="0.5 bits/weight"):
        bits_by_type("fc:4/8")


def test_quantize_in_place_and_size() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4), nn.Embedding(100, 8))
    layers = uniform_quantize_(model, "fc:2/1, emb:4/1", min_numel=0)
    assert [(q.name, q.bits, q.channels) for q in layers] == [("0", 2, 16), ("2", 2, 4), ("3", 4, 100)]
    size, fp32 = uniform_size(model, layers)
    codes = math.ceil(512 * 2 / 8) + math.ceil(64 * 2 / 8) + math.ceil(800 * 4 / 8)
    scales = 4 * (16 + 4 + 100)
    biases = 4 * (16 + 4)
    assert size == codes + scales + biases
    assert fp32 == 4 * (512 + 16 + 64 + 4 + 800)
    # per-row grids hold more values than one per-tensor LUT: flagged as not palettized
    assert unpalettized(model, "fc:2/1, emb:4/1", min_numel=0) == [("0", 512), ("2", 64), ("3", 800)]


def test_qat_trains_through_the_rounding() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    uniform_qat_(model, "fc:2/1", min_numel=0)
    out = model(torch.randn(5, 8)).sum()
    out.backward()
    grad = model[0].parametrizations.weight.original.grad
    assert grad is not None and grad.abs().sum() > 0  # straight-through: the gradient reaches the fp32 weight
    assert torch.unique(model[0].weight[0]).numel() <= 4
    layers = uniform_quantize_(model, "fc:2/1", min_numel=0)
    assert not hasattr(model[0], "parametrizations") and layers[0].bits == 2
    assert torch.unique(model[0].weight[0]).numel() <= 4

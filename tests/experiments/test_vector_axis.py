"""The vector-axis probe: cutting along either axis and joining back is the identity; the errors are measured."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from experiments import vector_axis


@pytest.mark.parametrize("axis", vector_axis.AXES)
@pytest.mark.parametrize("shape", [(6, 4, 3, 3), (10, 7)])
def test_cut_then_join_is_the_weight(axis, shape):
    weight = torch.randn(shape)
    vectors, rest = vector_axis.cut(weight, 4, axis)
    assert vectors.shape[1] == 4 and rest.numel() == weight.numel() % 4
    assert torch.equal(vector_axis.joined(vectors, rest, weight, axis), weight)


def test_output_axis_vectors_run_across_channels():
    weight = torch.arange(2 * 3 * 2.0).view(4, 3)  # 4 output channels of 3 inputs
    vectors, _ = vector_axis.cut(weight, 4, "output")
    assert torch.equal(vectors[0], weight[:, 0])  # input 0 of the 4 channels
    vectors, _ = vector_axis.cut(weight, 3, "input")
    assert torch.equal(vectors[1], weight[1])


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")  # fewer distinct vectors than centroids
def test_errors_are_measured_and_written(tmp_path):
    """16 identical channels of 72 values: along the input axis 9 distinct 8-vectors, which 16 centroids
    hold exactly; across channels 72 distinct constant vectors, which they cannot."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Conv2d(16, 4, 1))  # (the second, 64 values, stays out)
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(1, 8, 3, 3).expand(16, 8, 3, 3))
    rows = vector_axis.measure({"tiny": model})
    assert [(r["bits"], r["dim"]) for r in rows] == list(vector_axis.SETTINGS)
    half_bit = rows[0]
    assert half_bit["input_error"] < 1e-6 < 0.01 < half_bit["output_error"] < 1
    assert all(0 <= r["input_error"] < 1 and 0 <= r["output_error"] < 1 for r in rows)
    vector_axis.write(rows, tmp_path)
    saved = json.loads((tmp_path / "vector_axis.json").read_text())
    assert saved["rows"] == rows and "| tiny | 4/8 | 0.5 |" in (tmp_path / "vector_axis.md").read_text()

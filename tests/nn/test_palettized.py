"""Palettized inference modules and the training-time parametrization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchdkm.cluster import Layout
from torchdkm.config import LayerConfig
from torchdkm.kernels import lut as lut_kernels
from torchdkm.nn import (
    DKMParametrization,
    PaletteSpec,
    PalettizedConv1d,
    PalettizedConv2d,
    PalettizedConv3d,
    PalettizedEmbedding,
    PalettizedLinear,
    PalettizedMixin,
    palettized_class,
)
from torchdkm.nn.palettized import is_palettized, palettize_module, palettized_modules, set_submodule
from torchdkm.pack import pack


def palettize(module, bits=2, dim=1, group_size=None, seed=0):
    """Palettize ``module.weight`` with random indices and LUT; return it and the expected dense weight."""
    g = torch.Generator().manual_seed(seed)
    layout = Layout.of(module.weight.shape, dim, group_size)
    spec = PaletteSpec(layout.shape, bits, dim, layout.group_size)
    index = torch.randint(0, 2**bits, (layout.groups, layout.vectors), generator=g)
    lut = torch.randn(layout.groups, 2**bits, dim, generator=g)
    return palettize_module(module, {"weight": (spec, pack(index.reshape(-1), bits), lut)}), layout.decode(index, lut)


@pytest.mark.parametrize(
    ("module", "cls", "inputs"),
    [
        (nn.Linear(12, 5), PalettizedLinear, torch.randn(3, 12)),
        (nn.Conv1d(3, 4, 3), PalettizedConv1d, torch.randn(2, 3, 9)),
        (nn.Conv2d(3, 4, 3, padding=1), PalettizedConv2d, torch.randn(2, 3, 6, 6)),
        (nn.Conv3d(2, 3, 2), PalettizedConv3d, torch.randn(1, 2, 4, 4, 4)),
        (nn.Embedding(20, 6), PalettizedEmbedding, torch.randint(0, 20, (3, 7))),
    ],
)
@pytest.mark.parametrize(("dim", "group_size"), [(1, None), (3, 2)])
def test_palettized_module_decodes_and_forwards(module, cls, inputs, dim, group_size):
    base = type(module)
    new, dense = palettize(module, bits=3, dim=dim, group_size=group_size)
    assert type(new) is cls and isinstance(new, base) and isinstance(new, PalettizedMixin)
    assert new.base_class is base and is_palettized(new) and not is_palettized(module)
    assert torch.equal(new.weight, dense)
    reference = base.__new__(base)
    reference.__dict__.update(module.__dict__)
    reference._parameters = dict(module._parameters)
    reference._parameters["weight"] = nn.Parameter(dense)
    if base is nn.Linear:  # computed from the indices: float32 summation order differs (kernels.lut.RTOL)
        scale = inputs.abs() @ dense.abs().T + new.bias.abs()
        assert bool(((new(inputs) - reference(inputs)).abs() <= lut_kernels.RTOL * scale).all())
    else:  # convolutions decode the weight (a tile at a time), embeddings the rows looked up: bit for bit
        assert torch.equal(new(inputs), reference(inputs))
    # Everything but the weight is shared with the original.
    if getattr(module, "bias", None) is not None:
        assert new.bias is module.bias
    assert set(dict(new.named_parameters())) == ({"bias"} if getattr(module, "bias", None) is not None else set())
    keys = set(new.state_dict())
    assert {"weight_indices", "weight_lut"} <= keys and "weight" not in keys
    assert "palettized(weight: 3/" in repr(new)


def test_weight_is_read_only():
    new, dense = palettize(nn.Linear(4, 4))
    with pytest.raises((AttributeError, KeyError)):
        new.weight = nn.Parameter(torch.zeros(4, 4))
    assert torch.equal(new.weight, dense)


def test_palettized_class_is_cached_and_named():
    assert palettized_class(nn.Linear) is PalettizedLinear
    assert palettized_class(nn.Linear, ("weight",)) is PalettizedLinear

    class MyConv(nn.Conv2d):
        pass

    cls = palettized_class(MyConv)
    assert cls is palettized_class(MyConv) and cls.__name__ == "PalettizedMyConv"
    assert issubclass(cls, MyConv)
    two = palettized_class(nn.Linear, ("weight", "bias"))
    assert two is not PalettizedLinear and two.__name__ == "PalettizedLinear_bias_weight"


def test_palettize_twice_raises():
    new, _ = palettize(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="already palettized"):
        palettize(new)


def test_palette_spec_round_trip():
    spec = PaletteSpec((8, 3, 3, 3), 4, 6, 2)
    again = PaletteSpec.from_dict(spec.to_dict())
    assert again == spec and again.layout == Layout.of((8, 3, 3, 3), 6, 2)
    assert spec.index_count == 4 * 9  # 4 groups of 54 weights = 9 vectors


def test_set_submodule_and_listing():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.ReLU(), nn.Linear(4, 2)))
    new, _ = palettize(model[1][1])
    set_submodule(model, "1.1", new)
    assert model[1][1] is new
    assert [n for n, _ in palettized_modules(model)] == ["1.1"]


def test_parametrization_train_soft_eval_snap():
    weight = torch.randn(16, 8)
    p = DKMParametrization("layer", LayerConfig(bits=2, min_numel=0), weight)
    assert p.centroids.shape == (1, 4, 1)
    start = p.centroids.clone()
    p.eval()
    refreshed = p.clusterer.soft(weight, start).centroids  # one DKM step on the current weights
    assert torch.equal(p(weight), p.clusterer.snap(weight, refreshed))
    assert torch.equal(p.export(weight)[1], refreshed)
    assert torch.equal(p.centroids, start)  # eval never moves the stored centroids
    soft = p.soft(weight)
    assert torch.equal(p.centroids, start)  # neither does soft()
    p.train()
    out = p(weight)
    assert torch.equal(out, soft)
    assert not torch.equal(p.centroids, start)  # one DKM step stored its centroids
    assert "bits=2" in repr(p)

"""ConvTranspose1d/2d/3d and MultiheadAttention's in_proj_weight: prepare, train, finalize, save, load."""

import copy
import warnings

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig
from torchdkm.io.dense import dense_state_dict
from torchdkm.nn import (
    PalettizedConvTranspose1d,
    PalettizedConvTranspose2d,
    PalettizedConvTranspose3d,
    PalettizedMultiheadAttention,
)
from torchdkm.nn.parametrization import dkm_parametrizations


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x, x, x, need_weights=False)[0]


CASES = {
    "ConvTranspose1d": (lambda: nn.ConvTranspose1d(6, 4, 3, stride=2), (2, 6, 7), PalettizedConvTranspose1d),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(6, 8, 3, groups=2), (2, 6, 5, 5), PalettizedConvTranspose2d),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(4, 3, 2), (2, 4, 3, 3, 3), PalettizedConvTranspose3d),
    "MultiheadAttention": (Attention, (2, 5, 16), PalettizedMultiheadAttention),
}


def train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> None:
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    model.train()
    for _ in range(steps):
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("rule", ["*:3/1", "*:4/2@2"])
@pytest.mark.parametrize("kind", list(CASES))
def test_train_finalize_save_load(kind, rule, tmp_path):
    make, shape, palettized = CASES[kind]
    torch.manual_seed(0)
    model, x = make(), torch.randn(shape)
    torchdkm.prepare(model, DKMConfig.parse(rule, min_numel=0))
    train(model, x)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    final = torchdkm.finalize(model)
    layer = final.attn if kind == "MultiheadAttention" else final
    assert type(layer) is palettized
    with torch.no_grad():
        assert torch.equal(final(x), expected)
    path = torchdkm.save(final, tmp_path / "m.dkm.safetensors")
    torch.manual_seed(5)
    loaded = torchdkm.load(path, make())
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
    fresh = make()
    fresh.load_state_dict(dense_state_dict(final))  # dense export loads into the plain class
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), expected)


def test_conv_transpose_groups_its_first_axis():
    """A ConvTranspose weight is (in, out/groups, *k): @GROUP groups input channels, as documented."""
    model = nn.ConvTranspose2d(6, 4, 3)
    torchdkm.prepare(model, DKMConfig.parse("*:2/1@2", min_numel=0))
    (_, _, _, par), = dkm_parametrizations(model)
    assert par.clusterer.layout.groups == 3 and par.centroids.shape == (3, 4, 1)


def test_attention_runs_one_dkm_step_per_forward():
    """MultiheadAttention reads in_proj_weight 3-4 times per forward; the cache makes that one DKM step."""
    torch.manual_seed(0)
    model = torchdkm.prepare(Attention(), DKMConfig.parse("MultiheadAttention:4/1", min_numel=0))
    (_, _, _, par), = dkm_parametrizations(model)
    calls = []
    soft = par.clusterer.soft
    par.clusterer.soft = lambda *a, **k: calls.append(1) or soft(*a, **k)
    train(model, torch.randn(2, 5, 16), steps=2)
    assert len(calls) == 2
    assert not torch.nn.utils.parametrize._cache_enabled  # the hooks leave torch's global cache off


def test_attention_cache_is_released_when_forward_raises():
    model = torchdkm.prepare(Attention(), DKMConfig.parse("MultiheadAttention:4/1", min_numel=0))
    with pytest.raises(AssertionError):
        model(torch.randn(2, 5, 7))  # wrong embedding size
    assert not torch.nn.utils.parametrize._cache_enabled


def test_finalize_removes_the_cache_hooks_and_deepcopy_keeps_them():
    model = torchdkm.prepare(Attention(), DKMConfig.parse("MultiheadAttention:4/1", min_numel=0))
    twin = copy.deepcopy(model)
    assert len(twin.attn._forward_pre_hooks) == 1
    final = torchdkm.finalize(model)
    assert not final.attn._forward_pre_hooks and not final.attn._forward_hooks


def test_attention_with_separate_projections_is_named_not_clustered():
    model = nn.MultiheadAttention(16, 2, kdim=8, vdim=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchdkm.prepare(model, DKMConfig.parse("*:4/1", min_numel=0))
    message = str(caught[0].message)
    assert "q_proj_weight, k_proj_weight, v_proj_weight (512 values): MultiheadAttention with kdim/vdim" in message
    assert [n for n, _, _, _ in dkm_parametrizations(model)] == ["out_proj"]

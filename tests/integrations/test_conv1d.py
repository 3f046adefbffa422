"""transformers' Conv1D (GPT-2): clustered like Linear through a transposed view, palettized, exported.

A Conv1D weight is stored ``(in, out)``.  torchdkm clusters its transpose, so groups count output channels
and vectors run along the input axis exactly as for a Linear holding the transposed matrix.
"""

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import torchdkm
from torchdkm import DKMConfig, TorchdkmError
from torchdkm.io.dense import export_dense
from torchdkm.nn.palettized import palettized_modules

transformers = pytest.importorskip("transformers")
Conv1D = transformers.pytorch_utils.Conv1D


class Mlp(nn.Module):
    """Three Conv1D layers: grouped scalar LUTs, vectors along the input axis, vectors crossing output channels."""

    def __init__(self) -> None:
        super().__init__()
        self.up = Conv1D(64, 32)  # nf=64 outputs, nx=32 inputs: weight (32, 64)
        self.mid = Conv1D(30, 64)  # weight (64, 30)
        self.down = Conv1D(16, 30)  # weight (30, 16): 30 inputs, 4-dim vectors cross into the next channel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.mid(torch.tanh(self.up(x)))))


CONFIG = "up:4/1@16, mid:3/2, down:2/4"


@pytest.fixture(scope="module")
def mlp() -> Mlp:
    torch.manual_seed(0)
    return torchdkm.kmeans_compress(Mlp(), CONFIG).eval()


@pytest.mark.parametrize("rule", ["4/1", "4/2@8", "3/3@5"])
def test_conv1d_is_clustered_as_the_linear_of_its_transpose(rule):
    torch.manual_seed(0)
    conv = nn.Sequential(Conv1D(24, 32))
    linear = nn.Sequential(nn.Linear(32, 24, bias=False))
    with torch.no_grad():
        linear[0].weight.copy_(conv[0].weight.T)
    conv = torchdkm.kmeans_compress(conv, f"0:{rule}")
    linear = torchdkm.kmeans_compress(linear, f"0:{rule}")
    assert type(conv[0]).__name__ == "PalettizedConv1D" and conv[0].palette["weight"].transposed
    assert torch.equal(conv[0].weight_indices, linear[0].weight_indices)
    assert torch.equal(conv[0].weight_lut, linear[0].weight_lut)
    assert torch.equal(conv[0].weight, linear[0].weight.T) and conv[0].weight.is_contiguous()


def test_fc_covers_conv1d_and_training_runs_through_the_transposed_view():
    torch.manual_seed(0)
    model = Mlp()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchdkm.prepare(model, DKMConfig.parse("fc:4/2", min_numel=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 32)
    before = model.up.parametrizations.weight.original.detach().clone()
    model.train()
    model(x).pow(2).mean().backward()
    optimizer.step()
    assert not torch.equal(model.up.parametrizations.weight.original, before)
    assert model.up.weight.shape == (32, 64)  # the module still sees its own (in, out) layout
    model.eval()
    snapped = model(x)
    model = torchdkm.finalize(model)
    assert len(palettized_modules(model)) == 3
    # eval mode during training measured the shipped model (up to the LUT kernel's float32 summation order)
    torch.testing.assert_close(model(x), snapped, rtol=1e-5, atol=1e-6)


def test_save_load_and_dense_export(mlp, tmp_path):
    path = torchdkm.save(mlp, tmp_path / "mlp.dkm.safetensors")
    torch.manual_seed(5)
    loaded = torchdkm.load(path, Mlp())
    x = torch.randn(4, 32)
    assert torch.equal(loaded(x), mlp(x))
    for source in (mlp, path):
        dense_path = export_dense(source, tmp_path / "dense.safetensors")
        dense = Mlp()
        dense.load_state_dict(load_file(dense_path))
        assert dense.up.weight.shape == (32, 64)
        torch.testing.assert_close(dense(x), mlp(x), rtol=1e-5, atol=1e-6)  # (the LUT kernel's summation order)


@pytest.mark.parametrize("grad", [False, True])
def test_palettized_conv1d_forward_never_decodes_the_weight(mlp, grad):
    """Conv1D runs the Linear LUT kernel on its palette (nf outputs), in eager and autograd forwards alike."""
    from torchdkm.nn import PaletteSpec

    x = torch.randn(2, 5, 32, requires_grad=grad)
    reference = Mlp()
    reference.load_state_dict({k: v for k, v in mlp.state_dict().items() if "_" not in k.rpartition(".")[2]}, strict=False)
    for name in ("up", "mid", "down"):
        getattr(reference, name).weight = nn.Parameter(getattr(mlp, name).weight.detach().clone())
    want = reference(x)
    calls = []
    original = PaletteSpec.decode
    PaletteSpec.decode = lambda self, *a: calls.append(1) or original(self, *a)
    try:
        with torch.set_grad_enabled(grad):
            got = mlp(x)
    finally:
        PaletteSpec.decode = original
    assert not calls and got.shape == (2, 5, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_transposed_palette_on_a_file_is_checked(mlp, tmp_path):
    """A Conv1D file does not load into a model whose layer is not a Conv1D of that shape."""
    path = torchdkm.save(mlp, tmp_path / "mlp.dkm.safetensors")
    wrong = Mlp()
    wrong.up = Conv1D(32, 64)  # the transpose's shape
    with pytest.raises(TorchdkmError, match=r"layer 'up' parameter 'weight': shape \[32, 64\] in the file, \[64, 32\]"):
        torchdkm.load(path, wrong)


def test_gpt2_dense_export_loads_into_the_plain_model(tmp_path):
    config = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    model = torchdkm.kmeans_compress(transformers.GPT2LMHeadModel(config), DKMConfig.parse("fc:3/2@16", min_numel=0))
    path = export_dense(torchdkm.save(model.eval(), tmp_path / "gpt2.dkm.safetensors"), tmp_path / "dense.safetensors")
    plain = transformers.GPT2LMHeadModel(config).eval()
    plain.load_state_dict(load_file(path), strict=False)  # lm_head.weight is the tied wte.weight
    assert plain.lm_head.weight is plain.transformer.wte.weight
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-6)  # (the LUT kernel)


def test_core_ml_keeps_conv1d_palettized(mlp):
    pytest.importorskip("coremltools")
    from torchdkm.io.coreml import export_coreml, lut_ops

    warnings.filterwarnings("ignore", module="coremltools")
    mlmodel = export_coreml(mlp, (torch.randn(1, 32),), compute_precision="float32")
    ops = {op.name: op for op in lut_ops(mlmodel)}
    expected = {  # op -> (lut shape, bits, vector axis): LUT groups along axis 1, vectors along axis 0
        "up_weight": ((1, 4, 16, 1), 4, None),
        "mid_weight": ((1, 1, 8, 2), 3, 0),
        "down_weight_vectors": ((1, 1, 4, 4), 2, 1),
    }
    assert {n: (o.lut_shape, o.nbits, o.vector_axis) for n, o in ops.items()} == expected
    assert np.array_equal(ops["up_weight"].op.materialized_val_inference(), mlp.up.weight.numpy())
    assert np.array_equal(ops["mid_weight"].op.materialized_val_inference(), mlp.mid.weight.numpy())
    spec = mlp.down.palette["weight"]
    vectors = spec.layout.to_vectors(mlp.down.weight.T).reshape(spec.layout.groups, -1)
    assert np.array_equal(ops["down_weight_vectors"].op.materialized_val_inference(), vectors.numpy())


@pytest.mark.parametrize("rule", ["fc:3/1#16", "fc:3/2#16a"])
def test_core_ml_takes_conv1d_block_scales_along_its_input_axis(rule):
    """A Conv1D's blocks run along its input axis (rows of the transposed weight): Core ML gets the (out, blocks,
    block) tensor, the LUT op, the blockwise scale (and the offsets' add), transposed back in the graph."""
    pytest.importorskip("coremltools")
    from torchdkm.io.coreml import coreml_ready, export_coreml

    warnings.filterwarnings("ignore", module="coremltools")
    torch.manual_seed(3)
    model = torchdkm.kmeans_compress(Mlp(), torchdkm.DKMConfig.parse(rule, min_numel=0)).eval()
    x = torch.randn(2, 32)
    torch.testing.assert_close(coreml_ready(model)(x), model(x))
    converted = export_coreml(model, (x[:1],), compute_precision="float32")
    ops = [op for f in converted._mil_program.functions.values() for op in f.operations]
    # the LUT op and the blockwise scale, in either order (coremltools moves a scalar LUT's scale onto the LUT)
    chain = [op for op in ops if op.name.startswith("up_weight_blocks") and op.op_type.startswith("constexpr_")]
    assert sorted(op.op_type for op in chain) == ["constexpr_blockwise_shift_scale", "constexpr_lut_to_dense"]
    last = next(op for op in chain if not any(c.op_type.startswith("constexpr_") for c in op.outputs[0].child_ops))
    if last.op_type == "constexpr_lut_to_dense":  # indices into per-block scaled LUTs (64, 2, 1, 8, 1)
        luts = np.asarray(last.lut.op.materialized_val_inference())[:, :, 0, :, 0]
        decoded = np.take_along_axis(luts, last.indices.val.astype(np.int64), axis=-1)
    else:
        decoded = np.asarray(last.materialized_val_inference())
    assert decoded.shape == (64, 2, 16)  # 64 outputs, 32 inputs in blocks of 16
    if rule.endswith("a"):
        added = next(op for op in last.outputs[0].child_ops if op.op_type == "add")
        decoded = decoded + np.asarray(next(v for v in added.inputs.values() if v is not last.outputs[0]).val)
    np.testing.assert_allclose(decoded.reshape(64, 32).T, model.up.weight.detach().numpy(), rtol=1e-6, atol=1e-7)

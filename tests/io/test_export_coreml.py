"""Core ML export: palettized weights become constexpr_lut_to_dense ops that decode to the exact weights."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchdkm
from torchdkm.errors import TorchdkmError
from torchdkm.nn.palettized import palettized_modules

ct = pytest.importorskip("coremltools")
from torchdkm.io.coreml import coreml_ready, export_coreml, lut_ops, weight_file_bytes  # noqa: E402

warnings.filterwarnings("ignore", module="coremltools")


class Net(nn.Module):
    """Every layout case: vector LUT along rows, vectors crossing kernel rows, 5-bit, grouped, ragged groups."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)  # 4/2: vectors along the embedding axis
        self.conv = nn.Conv2d(16, 8, 3)  # 4/4 on a 3x3 kernel: vectors cross kernel rows -> vector matrix
        self.point = nn.Conv2d(8, 8, 1)  # 5/2: 5-bit indices padded to 6, vectors along in_channels
        self.fc1 = nn.Linear(8 * 4 * 4, 64)  # 3/1@16: per-grouped-channel scalar LUTs
        self.fc2 = nn.Linear(64, 10)  # 2/2@4: 10 channels in groups of 4 -> one LUT per channel

    def forward(self, ids):
        x = self.emb(ids).transpose(1, 2).reshape(-1, 16, 6, 6)
        x = torch.relu(self.point(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


CONFIG = "emb:4/2, conv:4/4, point:5/2, fc1:3/1@16, fc2:2/2@4"
# op name -> (lut shape, nbits, vector_axis) the converter must produce
EXPECTED = {
    "emb_weight": ((1, 1, 16, 2), 4, 1),
    "conv_weight_vectors": ((1, 1, 16, 4), 4, 1),
    "point_weight": ((1, 1, 1, 1, 64, 2), 6, 1),
    "fc1_weight": ((4, 1, 8, 1), 3, None),
    "fc2_weight": ((10, 1, 4, 2), 2, 1),
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return torchdkm.kmeans_compress(Net(), torchdkm.DKMConfig.parse(CONFIG, min_numel=0)).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50, (1, 36))


@pytest.fixture(scope="module", params=["trace", "export"])
def converted(model, ids, request):
    return export_coreml(model, (ids,), input_names=["ids"], compute_precision="float32", frontend=request.param)


def expected_dense(model, op_name):
    """What the op must decode to: the weight, or for crossing vectors the (groups, vectors * dim) matrix."""
    module = dict(palettized_modules(model))[op_name.split("_")[0]]
    if op_name.endswith("_vectors"):
        spec = module.palette["weight"]
        return spec.layout.to_vectors(module.weight).reshape(spec.layout.groups, -1)
    return module.weight


def test_ready_copy_computes_the_same(model, ids):
    ready = coreml_ready(model)
    assert not palettized_modules(ready)
    assert type(ready.fc1) is nn.Linear  # back to the original class, metadata as buffers
    # the palettized Linear runs from its indices (float32 summation order differs: torchdkm.kernels.lut.RTOL)
    torch.testing.assert_close(ready(ids), model(ids), rtol=1e-5, atol=1e-5)
    assert palettized_modules(model)  # the model itself is untouched


def test_every_palettized_weight_becomes_a_lut_op(model, converted):
    ops = {op.name.removeprefix("p_"): op for op in lut_ops(converted)}  # torch.export prefixes parameters
    assert set(ops) == set(EXPECTED)
    for name, (lut_shape, nbits, axis) in EXPECTED.items():
        op = ops[name]
        assert (op.lut_shape, op.nbits, op.vector_axis) == (lut_shape, nbits, axis), name
        dense = op.op.materialized_val_inference()
        assert np.array_equal(dense, expected_dense(model, name).detach().numpy()), name


def test_no_dense_copy_of_palettized_weights(model, converted):
    program = converted._mil_program
    consts = [op for op in program.functions["main"].operations if op.op_type == "const"]
    floats = [op.outputs[0].val for op in consts if isinstance(op.outputs[0].val, np.ndarray)]
    big = [v.shape for v in floats if v.dtype.kind == "f" and v.size >= 512]
    assert big == []  # biases and LUTs only: every large float tensor is palettized


def test_weight_file_is_palettized_size(tmp_path):
    torch.manual_seed(0)
    model = torchdkm.kmeans_compress(nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256)), "fc:4/1")
    path = tmp_path / "mlp.mlpackage"
    export_coreml(model.eval(), (torch.randn(1, 256),), path)
    dense_fp16 = 2 * 2 * 256 * 256
    assert weight_file_bytes(path) < 0.3 * dense_fp16  # 4-bit indices: a quarter of fp16, plus LUTs and biases


def test_fp16_luts_decode_to_rounded_weights(model, ids):
    mlmodel = export_coreml(model, (ids,))
    op = {op.name: op for op in lut_ops(mlmodel)}["fc1_weight_cast_fp16"]  # fp16 programs rename the ops
    assert op.op.lut.val.dtype == np.float16
    assert np.array_equal(op.op.materialized_val_inference(), model.fc1.weight.detach().half().numpy())


def test_bad_arguments(model, ids):
    with pytest.raises(TorchdkmError, match="iOS18"):
        export_coreml(model, (ids,), deployment_target="iOS17")
    with pytest.raises(TorchdkmError, match="mlpackage"):
        export_coreml(model, (ids,), "net.mlmodel")
    with pytest.raises(TorchdkmError, match="finalize"):
        coreml_ready(torchdkm.prepare(nn.Sequential(nn.Linear(32, 32)), "fc:2/1"))


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("frontend", ["trace", "export"])
def test_block_scales_become_a_lut_op_then_a_blockwise_scale_op(frontend):
    """Each scaled weight: constexpr_lut_to_dense on (out, blocks, block), then constexpr_blockwise_shift_scale,
    decoding to the torchdkm weight exactly (float32); blocks that do not divide the row (48 of 128) included."""
    torch.manual_seed(1)
    model = torchdkm.kmeans_compress(Scaled(), torchdkm.DKMConfig.parse("conv:2/1#6, fc:3/2#48", min_numel=0)).eval()
    x = torch.randn(1, 4, 6, 6)
    # the same forward up to float32 summation order (the palettized Linear multiplies from the indices),
    # the weights below bit for bit
    torch.testing.assert_close(coreml_ready(model)(x), model(x), rtol=1e-5, atol=1e-6)
    converted = export_coreml(model, (x,), compute_precision="float32", frontend=frontend)
    ops = {op.name.removeprefix("p_"): op for f in converted._mil_program.functions.values() for op in f.operations}
    for layer, shape in (("conv", (8, 6, 6)), ("fc", (10, 8, 16))):
        lut, scale = ops[f"{layer}_weight_blocks"], ops[f"{layer}_weight_blocks_1"]
        assert lut.op_type == "constexpr_lut_to_dense" and scale.op_type == "constexpr_blockwise_shift_scale"
        assert scale.data.op is lut
        decoded = np.asarray(scale.materialized_val_inference())
        assert decoded.shape == shape
        weight = getattr(model, layer).weight.detach().numpy()
        np.testing.assert_array_equal(decoded.reshape(weight.shape), weight)


@pytest.mark.parametrize("frontend", ["trace", "export"])
def test_asymmetric_blocks_add_their_offsets_after_the_blockwise_scale(frontend):
    """``scale_offset``: the LUT op, the blockwise scale, then an ``add`` of the (out, blocks, 1) offsets;
    LUT x scale + offset is the torchdkm weight (float32, to a rounding: torchdkm may fuse the multiply-add)."""
    torch.manual_seed(2)
    config = torchdkm.DKMConfig.parse("conv:2/1#6a, fc:3/2#48a", min_numel=0)
    model = torchdkm.kmeans_compress(Scaled(), config).eval()
    x = torch.randn(1, 4, 6, 6)
    torch.testing.assert_close(coreml_ready(model)(x), model(x))
    converted = export_coreml(model, (x,), compute_precision="float32", frontend=frontend)
    ops = [op for f in converted._mil_program.functions.values() for op in f.operations]
    for layer, shape in (("conv", (8, 6, 6)), ("fc", (10, 8, 16))):
        scale = next(op for op in ops if op.op_type == "constexpr_blockwise_shift_scale" and layer in op.name)
        assert scale.data.op.op_type == "constexpr_lut_to_dense"
        added = next(op for op in scale.outputs[0].child_ops if op.op_type == "add")
        offsets = next(v for v in added.inputs.values() if v is not scale.outputs[0])
        decoded = np.asarray(scale.materialized_val_inference()) + np.asarray(offsets.val)
        assert decoded.shape == shape and offsets.val.shape == (*shape[:2], 1)
        weight = getattr(model, layer).weight.detach().numpy()
        np.testing.assert_allclose(decoded.reshape(weight.shape), weight, rtol=1e-6, atol=1e-7)


def test_block_scales_on_vectors_across_kernel_rows_are_refused_with_a_reason():
    model = torchdkm.kmeans_compress(Scaled(), torchdkm.DKMConfig.parse("conv:2/2#6, fc:3/1", min_numel=0)).eval()
    with pytest.raises(TorchdkmError, match="cross rows"):
        export_coreml(model, (torch.randn(1, 4, 6, 6),))


def test_a_bfloat16_model_exports_from_a_float32_copy():
    """coremltools takes no bfloat16 tensor ("unsupported ScalarType BFloat16"): the export widens it exactly."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).to(torch.bfloat16)
    model = torchdkm.kmeans_compress(model, torchdkm.DKMConfig.parse("fc:3/1#16a", min_numel=0)).eval()
    converted = export_coreml(model, (torch.randn(2, 32, dtype=torch.bfloat16),), compute_precision="float32")
    assert [op.nbits for op in lut_ops(converted)] == [3, 3]  # both weights palettized, none dense
    assert model[0].weight.dtype == torch.bfloat16  # the model itself is untouched

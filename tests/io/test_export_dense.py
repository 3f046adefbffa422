"""Dense export, torch.export and torch.compile of finalized (palettized) models."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import torchdkm
from torchdkm.errors import TorchdkmError
from torchdkm.io.dense import dense_state_dict, dense_tensors, export_dense


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.Linear(16, 5))


CONFIG = torchdkm.DKMConfig.parse("cv:3/2, 3:4/4@4, 4:2/1", min_numel=0)


@pytest.fixture
def model():
    return torchdkm.kmeans_compress(make(), CONFIG).eval()


@pytest.fixture
def x():
    return torch.randn(2, 3, 8, 8)


def test_dense_state_dict_loads_into_original_architecture(model, x):
    plain = make()
    plain.load_state_dict(dense_state_dict(model))  # strict: same keys as the original
    # the palettized Linear runs from its indices: float32 summation order differs (torchdkm.kernels.lut.RTOL)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_from_file_equals_export_from_model(model, x, tmp_path):
    torchdkm.save(model, tmp_path / "m.dkm.safetensors")
    export_dense(tmp_path / "m.dkm.safetensors", tmp_path / "from_file.safetensors")
    export_dense(model, tmp_path / "from_model.safetensors")
    a, b = load_file(tmp_path / "from_file.safetensors"), load_file(tmp_path / "from_model.safetensors")
    assert a.keys() == b.keys() == make().state_dict().keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = make()
    plain.load_state_dict(a)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)  # LUT kernel: kernels.lut.RTOL


def test_tied_tensors_are_written_as_copies(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(40, 32)
            self.body = nn.Linear(32, 32)
            self.head = nn.Linear(32, 40, bias=False)
            self.head.weight = self.emb.weight  # tied, left uncompressed

        def forward(self, ids):
            return self.head(self.body(self.emb(ids)))

    torch.manual_seed(0)
    model = torchdkm.kmeans_compress(Tied(), torchdkm.DKMConfig.parse("body:3/1", min_numel=0))
    torchdkm.save(model, tmp_path / "t.dkm.safetensors")
    export_dense(tmp_path / "t.dkm.safetensors", tmp_path / "t.safetensors")
    state = load_file(tmp_path / "t.safetensors")
    assert torch.equal(state["emb.weight"], state["head.weight"])
    plain = Tied()
    plain.load_state_dict(state)
    ids = torch.randint(0, 40, (3, 5))
    torch.testing.assert_close(plain(ids), model(ids), rtol=1e-5, atol=1e-5)  # LUT kernel: kernels.lut.RTOL


def test_dense_tensors_reports_missing_palette():
    meta = {
        "layers": {
            "fc": {"class": "Linear", "params": {"weight": {"shape": [2, 2], "bits": 1, "dim": 1, "group_size": 2}}}
        }
    }
    with pytest.raises(TorchdkmError, match="missing"):
        dense_tensors(meta, {})


def test_unfinalized_model_is_refused():
    with pytest.raises(TorchdkmError, match="finalize"):
        dense_state_dict(torchdkm.prepare(make(), CONFIG))


def test_torch_export_keeps_indices_and_luts(model, x):
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)  # LUT kernel: kernels.lut.RTOL
    buffers = set(exported.graph_signature.buffers)
    assert {"0.weight_indices", "0.weight_lut", "3.weight_indices", "4.weight_lut"} <= buffers
    assert not any(name.endswith(".weight") for name in exported.graph_signature.parameters if name[0] in "034")


def test_torch_compile_traces_the_decode(model, x):
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # inductor works too, but compiles slowly
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)  # LUT kernel: kernels.lut.RTOL



def test_block_scales_decode_in_the_dense_export(tmp_path):
    """From the model and from the file alone: the scaled (and offset) weights, bit for bit."""

    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(40, 6), nn.Linear(6, 3))
    final = torchdkm.kmeans_compress(model, torchdkm.DKMConfig.parse("fc:2/1#16a", min_numel=0))
    path = tmp_path / "m.dkm.safetensors"
    torchdkm.save(final, path)
    for source in (final, path):
        out = load_file(str(export_dense(source, tmp_path / "dense.safetensors")))
        assert set(out) == {"0.weight", "0.bias", "1.weight", "1.bias"}
        assert torch.equal(out["0.weight"], final[0].weight)

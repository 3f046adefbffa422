"""The torchdkm file: bit-exact round trip, size, and a TorchdkmError for every bad file."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import torchdkm
from torchdkm import DKMConfig, LayerConfig, TorchdkmError
from torchdkm.io import FORMAT_VERSION, read
from torchdkm.io.format import checksum
from torchdkm.nn import PalettizedConv2d, PalettizedEmbedding, PalettizedLinear

CONFIG = DKMConfig.parse("cv:4/2, fc:3/4@8", min_numel=0)


@pytest.fixture
def finalized(make_convnet):
    return torchdkm.finalize(torchdkm.prepare(make_convnet(seed=0), CONFIG))


@pytest.fixture
def saved(finalized, tmp_path):
    path = torchdkm.save(finalized, tmp_path / "model.dkm.safetensors")
    return finalized, path


def assert_same(a, b, inputs):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    with torch.no_grad():
        assert torch.equal(a(*inputs), b(*inputs))


def test_round_trip_is_bit_exact(saved, make_convnet, conv_input):
    model, path = saved
    assert path.is_file()
    loaded = torchdkm.load(path, make_convnet(seed=1))  # a fresh model with other random weights
    assert isinstance(loaded.fc, PalettizedLinear) and isinstance(loaded.conv1, PalettizedConv2d)
    assert loaded.fc.palette == model.fc.palette
    assert_same(model, loaded, (conv_input,))


def test_save_load_save_gives_the_same_bytes(saved, make_convnet, tmp_path):
    _, path = saved
    loaded = torchdkm.load(path, make_convnet(seed=2))
    again = torchdkm.save(loaded, tmp_path / "again.safetensors")
    assert again.read_bytes() == path.read_bytes()


def test_load_into_an_already_palettized_model_raises(saved):
    model, path = saved
    with pytest.raises(TorchdkmError, match="already palettized"):
        torchdkm.load(path, model)


def test_round_trip_of_a_bare_layer(tmp_path):
    torch.manual_seed(0)
    layer = torchdkm.kmeans_compress(nn.Conv1d(4, 6, 3), DKMConfig.parse("*:3/2", min_numel=0))
    path = torchdkm.save(layer, tmp_path / "layer.safetensors")
    loaded = torchdkm.load(path, nn.Conv1d(4, 6, 3))
    assert type(loaded) is type(layer)
    assert_same(layer, loaded, (torch.randn(2, 4, 9),))


class Versioned(nn.Module):
    """Reads its version when loading, as torchvision's MNASNet does (it refuses a state_dict without one)."""

    _version = 2

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.seen = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args):
        self.seen = local_metadata.get("version")
        if self.seen != 2:
            raise ValueError(f"version should be 2, got {self.seen}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args)

    def forward(self, x):
        return self.fc(x)


def test_load_gives_modules_their_state_dict_version(tmp_path):
    torch.manual_seed(0)
    model = torchdkm.kmeans_compress(Versioned(), DKMConfig.parse("fc:3/1", min_numel=0))
    path = torchdkm.save(model, tmp_path / "versioned.safetensors")
    loaded = torchdkm.load(path, Versioned())
    assert loaded.seen == 2
    assert_same(model, loaded, (torch.randn(3, 8),))


def test_round_trip_every_module_type(make_mixednet, mixed_input, tmp_path):
    config = DKMConfig.parse("emb:3/5@7, cv:2/4, fc:4", min_numel=0)
    model = torchdkm.finalize(torchdkm.prepare(make_mixednet(), config))
    path = torchdkm.save(model, tmp_path / "mixed.safetensors")
    loaded = torchdkm.load(path, make_mixednet(seed=3))
    assert isinstance(loaded.emb, PalettizedEmbedding)
    assert_same(model, loaded, mixed_input)


def test_round_trip_with_tied_tensors(make_tiednet, tmp_path):
    """Tensors that share memory are stored once and restored as aliases."""

    class Twin(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(16, 16)
            self.a = nn.Linear(16, 4)
            self.b = nn.Linear(16, 4)
            self.b.weight = self.a.weight

        def forward(self, x):
            h = self.body(x)
            return self.a(h) + self.b(h)

    config = DKMConfig(default=LayerConfig(bits=2, min_numel=0), by_name={"a": None, "b": None})
    torch.manual_seed(0)
    model = torchdkm.finalize(torchdkm.prepare(Twin(), config))
    path = torchdkm.save(model, tmp_path / "twin.safetensors")
    meta, tensors = read(path)
    assert set(meta["aliases"].items()) in ({("b.weight", "a.weight")}, {("a.weight", "b.weight")})
    torch.manual_seed(1)
    loaded = torchdkm.load(path, Twin())
    assert_same(model, loaded, (torch.randn(3, 16),))

    lm = torchdkm.finalize(
        torchdkm.prepare(make_tiednet(), DKMConfig(default=LayerConfig(bits=3, min_numel=0), by_name={"out": None}))
    )
    path = torchdkm.save(lm, tmp_path / "lm.safetensors")
    assert_same(lm, torchdkm.load(path, make_tiednet(seed=5)), (torch.randint(0, 40, (2, 5)),))


def test_file_size_matches_report(saved):
    model, path = saved
    compressed = torchdkm.report(model, show=False).compressed_bytes
    size = path.stat().st_size
    assert abs(size - compressed) <= 0.01 * compressed + 16 * 1024
    assert size >= compressed  # the payload itself is all there


def test_file_size_matches_report_for_a_larger_model(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 128))
    model = torchdkm.kmeans_compress(model, DKMConfig.parse("*:2", max_iters=1))
    path = torchdkm.save(model, tmp_path / "mlp.safetensors")
    compressed = torchdkm.report(model, show=False).compressed_bytes
    assert abs(path.stat().st_size - compressed) <= 0.01 * compressed + 16 * 1024


def test_metadata(saved):
    model, path = saved
    meta, tensors = read(path)
    assert meta["format"] == "torchdkm" and meta["format_version"] == FORMAT_VERSION
    spec = json.loads(json.dumps(model.fc.palette["weight"].to_dict()))
    assert meta["layers"]["fc"] == {"class": "Linear", "params": {"weight": spec}}
    assert set(meta["layers"]) == {"conv1", "conv2", "fc", "head"}
    assert meta["checksum"] == checksum(tensors)
    assert tensors["fc.weight_indices"].dtype == torch.uint8


# -- bad files --------------------------------------------------------------------


def test_missing_file(make_convnet, tmp_path):
    with pytest.raises(TorchdkmError, match="no such file"):
        torchdkm.load(tmp_path / "nope.safetensors", make_convnet())
    with pytest.raises(TorchdkmError, match="a directory without model.safetensors"):
        torchdkm.load(tmp_path, make_convnet())  # a directory, but not one written by compress


@pytest.mark.parametrize("keep", [0, 5, 8, 100, 0.5, -1])
def test_truncated_file(saved, make_convnet, tmp_path, keep):
    _, path = saved
    data = path.read_bytes()
    cut = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:cut])
    with pytest.raises(TorchdkmError, match="cut.safetensors"):
        torchdkm.load(bad, make_convnet())


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_corrupted_tensor_bytes_fail_the_checksum(saved, make_convnet, tmp_path, where):
    _, path = saved
    data = bytearray(path.read_bytes())
    start = 8 + header_length(bytes(data))
    pos = min(start + int((len(data) - start) * where), len(data) - 1)
    data[pos] ^= 0x5A
    bad = tmp_path / "flipped.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(TorchdkmError, match="checksum"):
        torchdkm.load(bad, make_convnet())


def test_corrupted_header(saved, make_convnet, tmp_path):
    _, path = saved
    data = bytearray(path.read_bytes())
    data[8] = ord("#")  # the header's opening brace
    bad = tmp_path / "header.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(TorchdkmError, match="header.safetensors"):
        torchdkm.load(bad, make_convnet())
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(TorchdkmError, match="not a readable safetensors file"):
        torchdkm.load(bad, make_convnet())


def test_plain_safetensors_file_is_rejected(make_convnet, tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in make_convnet().state_dict().items()}, str(path))
    with pytest.raises(TorchdkmError, match="not a torchdkm file"):
        torchdkm.load(path, make_convnet())
    save_file({"x": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    with pytest.raises(TorchdkmError, match="not a torchdkm file"):
        torchdkm.load(path, make_convnet())


def rewrite(path, out, *, meta_change=None, tensor_change=None, raw_meta=None):
    """Write a modified copy of a torchdkm file (metadata and/or tensors) with a valid checksum."""
    meta, tensors = read(path)
    for key in meta["aliases"]:
        tensors.pop(key)
    if tensor_change:
        tensor_change(tensors)
        tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta["checksum"] = checksum(tensors)
    if meta_change:
        meta_change(meta)
    text = raw_meta if raw_meta is not None else json.dumps(meta)
    save_file(tensors, str(out), metadata={"torchdkm": text})
    return out


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda m: m.update(format_version=3), "format_version 3"),
        (lambda m: m.update(format_version=True), "format_version True"),
        (lambda m: m.update(format="other"), "does not describe a torchdkm file"),
        (lambda m: m.pop("layers"), "'layers'"),
        (lambda m: m.update(aliases=[]), "'aliases'"),
        (lambda m: m.pop("checksum"), "'checksum'"),
        (lambda m: m["layers"]["fc"].pop("params"), "'fc' is malformed"),
        (lambda m: m["layers"]["fc"]["params"]["weight"].pop("bits"), "malformed palette"),
        (lambda m: m["layers"]["fc"]["params"]["weight"].update(bits=9), "invalid bits"),
        (lambda m: m["layers"]["fc"]["params"]["weight"].update(bits=2), "indices should be"),
        (lambda m: m["layers"]["fc"]["params"]["weight"].update(dim=2), "indices should be"),
        (lambda m: m["layers"]["fc"].update({"class": "Conv2d"}), "Conv2d in the file but a Linear"),
        (lambda m: m["aliases"].update({"fc.extra": "missing"}), "alias 'fc.extra'"),
    ],
)
def test_inconsistent_metadata(saved, make_convnet, tmp_path, change, needle):
    _, path = saved
    bad = rewrite(path, tmp_path / "meta.safetensors", meta_change=change)
    with pytest.raises(TorchdkmError, match=needle):
        torchdkm.load(bad, make_convnet())


def test_metadata_that_is_not_json(saved, make_convnet, tmp_path):
    _, path = saved
    bad = rewrite(path, tmp_path / "json.safetensors", raw_meta="{oops")
    with pytest.raises(TorchdkmError, match="not valid JSON"):
        torchdkm.load(bad, make_convnet())


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda t: t.update({"fc.weight_lut": t["fc.weight_lut"] * float("nan")}), "NaN/Inf"),
        (lambda t: t.pop("fc.weight_lut"), "missing"),
        (lambda t: t.update({"fc.weight_lut": t["fc.weight_lut"][:, :4]}), "LUT should be"),
        (lambda t: t.update({"fc.weight_lut": t["fc.weight_lut"].to(torch.int32)}), "LUT should be"),
        (lambda t: t.update({"fc.weight_indices": t["fc.weight_indices"][:-1]}), "indices should be"),
        (lambda t: t.update({"fc.weight_indices": t["fc.weight_indices"].to(torch.int16)}), "indices should be"),
        (lambda t: t.pop("fc.bias"), "does not match the model"),
        (lambda t: t.update({"fc.extra": torch.zeros(1)}), "does not match the model"),
    ],
)
def test_bad_tensors_with_a_valid_checksum(saved, make_convnet, tmp_path, change, needle):
    _, path = saved
    bad = rewrite(path, tmp_path / "tensors.safetensors", tensor_change=change)
    with pytest.raises(TorchdkmError, match=needle):
        torchdkm.load(bad, make_convnet())


class Wider(nn.Module):
    """The ConvNet's names with a different fc width."""

    def __init__(self, fc_out=20, drop=None):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12 * 4 * 4, fc_out)
        self.head = nn.Linear(fc_out, 10)
        if drop:
            delattr(self, drop)


@pytest.mark.parametrize(
    ("model", "needle"),
    [
        (lambda: Wider(fc_out=24), "shape"),
        (lambda: Wider(drop="head"), "no module 'head'"),
        (lambda: nn.Sequential(nn.Linear(4, 4)), "no module"),
        (lambda: Wider(drop="conv1"), "no module 'conv1'"),
    ],
)
def test_wrong_architecture(saved, model, needle):
    _, path = saved
    with pytest.raises(TorchdkmError, match=needle):
        torchdkm.load(path, model())


def test_wrong_module_class(saved):
    _, path = saved
    model = Wider()
    model.fc = nn.Conv2d(192, 20, 1)
    with pytest.raises(TorchdkmError, match="'fc' is a Linear in the file but a Conv2d"):
        torchdkm.load(path, model)


def test_extra_module_in_the_model(saved, make_convnet):
    _, path = saved
    model = make_convnet()
    model.extra = nn.Linear(2, 2)
    with pytest.raises(TorchdkmError, match="does not match the model"):
        torchdkm.load(path, model)


def test_save_requires_a_finalized_model(make_convnet, tmp_path):
    prepared = torchdkm.prepare(make_convnet(), CONFIG)
    with pytest.raises(TorchdkmError, match="finalize"):
        torchdkm.save(prepared, tmp_path / "x.safetensors")
    with pytest.raises(TorchdkmError, match="no palettized layer"):
        torchdkm.save(make_convnet(), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()

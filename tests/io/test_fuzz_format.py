"""Hostile files and configs, fuzzed with hypothesis.

Every damaged or doctored file must make ``torchdkm.load`` raise
``TorchdkmError``: never another exception, never a crash, never a large
allocation, and never a model that differs from the one saved.  (A damaged
file that still loads must give exactly the saved model: the only such damage
is to bytes that carry nothing, e.g. header padding.)  Configs built from
JSON / dicts must either be valid or raise ``TorchdkmError``.
"""

from __future__ import annotations

import json
import resource
import struct
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import torchdkm
from torchdkm import DKMConfig, LayerConfig, TorchdkmError
from torchdkm.io import read
from torchdkm.io.format import checksum, meta_checksum

FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)


class Net(nn.Module):
    """Two palettized layers (one with groups, one whose vectors cross channels), dense and tied tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.conv = nn.Conv1d(2, 4, 3)
        self.fc = nn.Linear(6, 8)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight


CONFIG = DKMConfig(
    by_type={"cv": LayerConfig(bits=2, dim=4, min_numel=0), "fc": LayerConfig(bits=3, dim=2, min_numel=0)},
    by_name={"out": None},  # tied to emb: stays dense, stored once
)


def fresh(seed: int = 1) -> Net:
    torch.manual_seed(seed)
    return Net()


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """The saved file's bytes, and the state dict a correct load gives."""
    torch.manual_seed(0)
    model = torchdkm.finalize(torchdkm.prepare(Net(), CONFIG))
    path = torchdkm.save(model, tmp_path_factory.mktemp("fuzz") / "model.safetensors")
    meta, _ = read(path)
    assert meta["aliases"] and set(meta["layers"]) == {"conv", "fc"}
    return path.read_bytes(), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("work")


def load_bytes(data: bytes, workdir: Path):
    path = workdir / "candidate.safetensors"
    path.write_bytes(data)
    return torchdkm.load(path, fresh())


def assert_error_or_same(data: bytes, workdir: Path, want: dict) -> None:
    """The contract: a TorchdkmError (and nothing else), or exactly the saved model."""
    try:
        model = load_bytes(data, workdir)
    except TorchdkmError:
        return
    got = model.state_dict()
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), f"silently different {key}"


def split(data: bytes) -> tuple[dict, bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


# -- damaged bytes -------------------------------------------------------------------


@FUZZ
@given(fraction=st.floats(0, 1, exclude_max=True))
def test_truncated_files_raise(original, workdir, fraction):
    data, _ = original
    with pytest.raises(TorchdkmError):
        load_bytes(data[: int(len(data) * fraction)], workdir)


@FUZZ
@given(flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=3))
def test_bit_flips_anywhere(original, workdir, flips):
    data, want = original
    damaged = bytearray(data)
    for where, bit in flips:
        damaged[int(where * len(data))] ^= 1 << bit
    assert_error_or_same(bytes(damaged), workdir, want)


@FUZZ
@given(data_=st.data())
def test_bit_flips_in_the_header(original, workdir, data_):
    """The header (JSON: names, shapes, offsets, the torchdkm metadata) is where one flip can mislead."""
    data, want = original
    end = 8 + struct.unpack("<Q", data[:8])[0]
    damaged = bytearray(data)
    for _ in range(data_.draw(st.integers(1, 2))):
        damaged[data_.draw(st.integers(0, end - 1))] ^= 1 << data_.draw(st.integers(0, 7))
    assert_error_or_same(bytes(damaged), workdir, want)


# -- doctored torchdkm metadata -----------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([0, 1, -1, 2, 3, 4, 8, 9, 255, 2**31, 2**63, 10**30])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=10,
)


def paths(value, prefix=()):
    """Every path into a JSON document."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from paths(item, (*prefix, index))


def mutate(meta: dict, path: tuple, action: str, value) -> dict:
    meta = json.loads(json.dumps(meta))
    *parents, last = path
    node = meta
    for key in parents:
        node = node[key]
    if action == "delete" and isinstance(node, dict):
        del node[last]
    elif action == "bump" and isinstance(node[last], int) and not isinstance(node[last], bool):
        node[last] += value if isinstance(value, int) and not isinstance(value, bool) else 1
    else:
        node[last] = value
    return meta


@FUZZ
@given(data_=st.data())
def test_doctored_metadata(original, workdir, data_):
    """Any value anywhere in the metadata (missing keys, wrong types, huge or negative shapes / bits / dim /
    group_size): with the metadata checksum left as is, and recomputed as a forger would."""
    data, want = original
    header, body = split(data)
    meta = json.loads(header["__metadata__"]["torchdkm"])
    targets = [p for p in paths(meta) if p and p[-1] != "meta_checksum"]
    path = data_.draw(st.sampled_from(targets))
    action = data_.draw(st.sampled_from(["replace", "delete", "bump"]))
    value = data_.draw(st.integers(-3, 3) if action == "bump" else JSON)
    doctored = mutate(meta, path, action, value)
    if (
        data_.draw(st.booleans())
        and isinstance(doctored.get("layers"), dict)
        and isinstance(doctored.get("aliases"), dict)
    ):
        doctored["meta_checksum"] = meta_checksum(doctored)
    header["__metadata__"]["torchdkm"] = json.dumps(doctored)
    assert_error_or_same(join(header, body), workdir, want)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("shape", [2**31, 2**31], "shape"),
        ("shape", [2**62, 2**62, 2**62], "shape"),
        ("shape", [-8, 6], "shape"),
        ("shape", [8.0, 6.0], "malformed"),
        ("shape", "86", "malformed"),
        ("bits", 10**6, "invalid bits"),
        ("bits", -3, "invalid bits"),
        ("bits", 3.5, "malformed"),
        ("bits", True, "malformed"),
        ("bits", float("inf"), "malformed"),
        ("dim", 2**40, "indices should be"),
        ("dim", 0, "invalid bits/dim"),
        ("group_size", 2**40, "invalid bits/dim/group_size"),
        ("group_size", -1, "invalid bits/dim/group_size"),
        ("group_size", 5, "indices should be"),
    ],
)
def test_huge_or_bad_palette_fields_fail_before_any_allocation(original, workdir, field, value, needle):
    """Checked against the model first: the error names the field, and memory does not grow."""
    data, _ = original
    header, body = split(data)
    meta = json.loads(header["__metadata__"]["torchdkm"])
    meta["layers"]["fc"]["params"]["weight"][field] = value
    meta["meta_checksum"] = meta_checksum(meta)
    header["__metadata__"]["torchdkm"] = json.dumps(meta)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(TorchdkmError, match=needle):
        load_bytes(join(header, body), workdir)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024  # KiB on Linux


def test_consistent_but_wrong_metadata_fails_the_metadata_checksum(workdir):
    """A group_size that decodes to the same sizes (vectors crossing channels) is caught by the checksum."""
    torch.manual_seed(0)
    layer = torchdkm.kmeans_compress(nn.Linear(2, 20), DKMConfig.parse("*:2/4@7", min_numel=0))
    path = torchdkm.save(layer, workdir / "layer.safetensors")
    header, body = split(path.read_bytes())
    meta = json.loads(header["__metadata__"]["torchdkm"])
    meta["layers"][""]["params"]["weight"]["group_size"] = 8  # 3 groups of 4 vectors either way
    header["__metadata__"]["torchdkm"] = json.dumps(meta)
    with pytest.raises(TorchdkmError, match="metadata checksum"):
        torchdkm.load(_write(workdir, join(header, body)), nn.Linear(2, 20))
    meta["meta_checksum"] = meta_checksum(meta)  # a forger: loads, but it is what the metadata says
    header["__metadata__"]["torchdkm"] = json.dumps(meta)
    torchdkm.load(_write(workdir, join(header, body)), nn.Linear(2, 20))


def _write(workdir: Path, data: bytes) -> Path:
    path = workdir / "written.safetensors"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda m: m["aliases"].update({"fc.bias": "conv.bias"}), "also stored"),
        (lambda m: m["aliases"].update({"out.weight": ["emb.weight"]}), "missing tensor"),
        (lambda m: m["layers"]["fc"].update({"class": ["Linear"] * 3}), "in the file but a Linear"),
        (lambda m: m["layers"]["fc"].update({"params": {}}), "malformed"),
        (lambda m: m["layers"]["fc"]["params"]["weight"].update({"extra": 1}), "malformed"),
    ],
)
def test_doctored_metadata_cases(original, workdir, change, needle):
    data, _ = original
    header, body = split(data)
    meta = json.loads(header["__metadata__"]["torchdkm"])
    change(meta)
    meta["meta_checksum"] = meta_checksum(meta)
    header["__metadata__"]["torchdkm"] = json.dumps(meta)
    with pytest.raises(TorchdkmError, match=needle):
        load_bytes(join(header, body), workdir)


@pytest.mark.parametrize("text", ["1" * 5000, "[" * 100_000, '{"format": "torchdkm"'])
def test_metadata_json_that_python_cannot_parse(original, workdir, text):
    data, _ = original
    header, body = split(data)
    header["__metadata__"]["torchdkm"] = text
    with pytest.raises(TorchdkmError, match="not valid JSON"):
        load_bytes(join(header, body), workdir)


# -- doctored tensors and safetensors header -------------------------------------------

DTYPES = [torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8, torch.int8, torch.bool]


@FUZZ
@given(data_=st.data())
def test_wrong_tensor_dtypes_and_shapes_with_a_valid_checksum(original, workdir, data_):
    data, want = original
    header, _ = split(data)
    meta = json.loads(header["__metadata__"]["torchdkm"])
    tensors = _stored(data, workdir)
    key = data_.draw(st.sampled_from(sorted(tensors)))
    action = data_.draw(st.sampled_from(["dtype", "flatten", "unsqueeze", "shorter", "longer", "drop", "extra"]))
    t = tensors[key]
    if action == "dtype":
        tensors[key] = t.to(data_.draw(st.sampled_from([d for d in DTYPES if d != t.dtype])))
    elif action == "flatten":
        tensors[key] = t.reshape(-1) if t.dim() != 1 else t.reshape(1, -1)
    elif action == "unsqueeze":
        tensors[key] = t.unsqueeze(data_.draw(st.integers(0, t.dim())))
    elif action == "shorter":
        tensors[key] = t.reshape(-1)[: max(0, t.numel() - data_.draw(st.integers(1, 3)))]
    elif action == "longer":
        tensors[key] = torch.cat([t.reshape(-1), t.reshape(-1)[:1].repeat(data_.draw(st.integers(1, 3)))])
    elif action == "drop":
        del tensors[key]
    else:
        tensors[data_.draw(st.sampled_from([key + "x", "fc.weight", "conv.weight", "extra"]))] = t.clone()
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta["checksum"] = checksum(tensors)
    path = workdir / "tensors.safetensors"
    save_file(tensors, str(path), metadata={"torchdkm": json.dumps(meta)})
    assert_error_or_same(path.read_bytes(), workdir, want)


def _stored(data: bytes, workdir: Path) -> dict[str, torch.Tensor]:
    path = workdir / "stored.safetensors"
    path.write_bytes(data)
    meta, tensors = read(path)
    return {k: v for k, v in tensors.items() if k not in meta["aliases"]}


@FUZZ
@given(data_=st.data())
def test_doctored_safetensors_header(original, workdir, data_):
    """Huge or inconsistent declared shapes, offsets and dtypes: refused before anything is allocated."""
    data, want = original
    header, body = split(data)
    key = data_.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    entry = header[key]
    field = data_.draw(st.sampled_from(["shape", "data_offsets", "dtype"]))
    if field == "dtype":
        entry["dtype"] = data_.draw(st.sampled_from(["F16", "BF16", "F64", "I32", "U8", "I8", "BOOL", "F8_E4M3", "X"]))
    else:
        big = st.sampled_from([0, 1, 2**31, 2**40, 2**62, 2**64 - 1]) | st.integers(0, 4096)
        entry[field] = data_.draw(st.lists(big, min_size=0 if field == "shape" else 2, max_size=4))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert_error_or_same(join(header, body), workdir, want)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 50 * 1024


# -- configs from JSON / dicts ----------------------------------------------------------

FIELD_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
FIELDS = st.sampled_from([*LayerConfig.__dataclass_fields__, "bitz", "colour"])
RULE = st.none() | st.dictionaries(FIELDS, FIELD_VALUES, max_size=3) | FIELD_VALUES
DOCUMENT = st.fixed_dictionaries(
    {},
    optional={
        "version": FIELD_VALUES,
        "default": RULE,
        "by_type": st.dictionaries(st.sampled_from(["fc", "cv", "Linear", "Conv9d", "*"]), RULE, max_size=2)
        | FIELD_VALUES,
        "by_name": st.dictionaries(st.sampled_from(["head", "encoder.*", ""]), RULE, max_size=2) | FIELD_VALUES,
        "extra": FIELD_VALUES,
    },
)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(document=DOCUMENT)
def test_config_documents_are_valid_or_raise_torchdkm_error(document):
    try:
        text = json.dumps(document, allow_nan=True)
    except (TypeError, ValueError):
        return
    for build in (lambda: DKMConfig.from_dict(document), lambda: DKMConfig.from_json(text)):
        try:
            config = build()
        except TorchdkmError:
            continue
        again = DKMConfig.from_dict(config.to_dict())  # whatever is accepted round-trips
        assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("document", "needles"),
    [
        ({"by_type": [1]}, ["by_type", "list"]),
        ({"by_type": "fc"}, ["by_type", "str"]),
        ({"by_type": ["ab"]}, ["by_type", "list"]),
        ({"by_name": 5}, ["by_name", "int"]),
        ({"version": True}, ["version=True"]),
        ({"version": 1.0}, ["version=1.0"]),
        ({"by_name": {"head": {"bits": "4"}}}, ["by_name['head']", "bits='4'"]),
        ({"default": {"group_size": True}}, ["default", "group_size=True"]),
        ({"default": {"min_numel": 1.5}}, ["default", "min_numel=1.5"]),
    ],
)
def test_config_errors_name_the_bad_key(document, needles):
    for build in (lambda: DKMConfig.from_dict(document), lambda: DKMConfig.from_json(json.dumps(document))):
        with pytest.raises(TorchdkmError) as err:
            build()
        for needle in needles:
            assert needle in str(err.value)

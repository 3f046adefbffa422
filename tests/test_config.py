"""Configuration: LayerConfig validation, DKMConfig rules, precedence, shorthand, serialisation."""

from __future__ import annotations

import json

import pytest
from torch import nn

from torchdkm import DKMConfig, LayerConfig, TorchdkmError
from torchdkm.matching import SUPPORTED_TYPES, TYPE_GROUPS

# -- LayerConfig ------------------------------------------------------------


def test_layer_config_defaults_and_properties():
    cfg = LayerConfig()
    assert (cfg.bits, cfg.dim, cfg.k, cfg.bits_per_weight) == (4, 1, 16, 4.0)
    cfg = LayerConfig(bits=6, dim=4)
    assert cfg.k == 64 and cfg.bits_per_weight == 1.5
    assert cfg.replace(bits=2).k == 4 and cfg.bits == 6  # frozen: replace makes a copy
    with pytest.raises(AttributeError):
        cfg.bits = 3  # type: ignore[misc]


@pytest.mark.parametrize("bits", [1, 8])
def test_bits_bounds_are_accepted(bits):
    assert LayerConfig(bits=bits).k == 2**bits


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("bits", 0),
        ("bits", 9),
        ("bits", -1),
        ("bits", 4.0),
        ("bits", True),
        ("bits", "4"),
        ("dim", 0),
        ("dim", -2),
        ("dim", 1.5),
        ("tau", 0),
        ("tau", 0.0),
        ("tau", -0.1),
        ("tau", float("nan")),
        ("tau", float("inf")),
        ("tau", "0.1"),
        ("max_iters", 0),
        ("tol", -1e-3),
        ("tol", float("nan")),
        ("group_size", 0),
        ("group_size", 2.5),
        ("param", ""),
        ("param", 3),
        ("min_numel", -1),
        ("cluster_dtype", "float32"),
        ("cluster_dtype", "fp16"),
        ("chunk_mb", 0),
        ("chunk_mb", float("inf")),
    ],
)
def test_bad_field_raises_naming_field_and_value(field, value):
    with pytest.raises(TorchdkmError) as err:
        LayerConfig(**{field: value})
    message = str(err.value)
    assert f"{field}=" in message
    assert repr(value) in message


def test_torchdkm_error_is_a_value_error():
    with pytest.raises(ValueError):
        LayerConfig(bits=0)


def test_layer_config_dict_round_trip():
    cfg = LayerConfig(bits=3, dim=2, tau=0.02, group_size=16, param="weight", min_numel=0, cluster_dtype="exact")
    assert LayerConfig.from_dict(cfg.to_dict()) == cfg
    assert LayerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_layer_config_from_dict_rejects_unknown_keys_and_non_dicts():
    with pytest.raises(TorchdkmError, match="'bitz'"):
        LayerConfig.from_dict({"bitz": 4})
    with pytest.raises(TorchdkmError, match="list"):
        LayerConfig.from_dict([("bits", 4)])  # type: ignore[arg-type]
    with pytest.raises(TorchdkmError, match="my rule: bits=0"):
        LayerConfig.from_dict({"bits": 0}, where="my rule")


# -- DKMConfig: resolution and precedence ------------------------------------


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(8, 8)
        self.key = nn.Linear(8, 8)
        self.value = nn.Linear(8, 8)
        self.conv = nn.Conv2d(2, 4, 3)


class MyLinear(nn.Linear):
    pass


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([Block(), Block()])
        self.head = MyLinear(8, 2)
        self.emb = nn.Embedding(10, 8)
        self.act = nn.ReLU()


@pytest.fixture
def model():
    return Model()


def resolve(config, model, name):
    return config.resolve(name, model.get_submodule(name))


def bits_of(config, model, name):
    layer = resolve(config, model, name)
    return None if layer is None else layer.bits


def test_default_rule_covers_supported_modules_only(model):
    config = DKMConfig(default=LayerConfig(bits=3))
    for name in ("encoder.0.query", "encoder.1.conv", "head", "emb"):
        assert bits_of(config, model, name) == 3
    for name in ("act", "encoder", "encoder.0", ""):
        assert resolve(config, model, name) is None
    assert resolve(DKMConfig(), model, "head") is None  # no rule: nothing is clustered


def test_name_beats_type_beats_global(model):
    config = DKMConfig(
        default=LayerConfig(bits=2),
        by_type={"Linear": LayerConfig(bits=3)},
        by_name={"encoder.0.query": LayerConfig(bits=5)},
    )
    assert bits_of(config, model, "encoder.0.query") == 5  # name
    assert bits_of(config, model, "encoder.0.key") == 3  # type
    assert bits_of(config, model, "encoder.0.conv") == 2  # global
    assert bits_of(config, model, "emb") == 2


def test_exact_name_beats_glob_and_longer_glob_beats_shorter(model):
    config = DKMConfig(
        default=LayerConfig(bits=1),
        by_name={
            "encoder.*": LayerConfig(bits=2),
            "encoder.*.query": LayerConfig(bits=3),
            "encoder.1.query": LayerConfig(bits=4),
            "*.key": LayerConfig(bits=5),
        },
    )
    assert bits_of(config, model, "encoder.1.query") == 4  # exact name
    assert bits_of(config, model, "encoder.0.query") == 3  # longer glob
    assert bits_of(config, model, "encoder.0.value") == 2  # shorter glob
    assert bits_of(config, model, "encoder.0.key") == 2  # "encoder.*" beats "*.key": more literal text
    assert bits_of(config, model, "head") == 1


def test_class_name_beats_shorthand_group(model):
    config = DKMConfig(by_type={"cv": LayerConfig(bits=2), "Conv2d": LayerConfig(bits=6), "fc": LayerConfig(bits=3)})
    assert bits_of(config, model, "encoder.0.conv") == 6
    assert bits_of(config, model, "encoder.0.query") == 3
    config = DKMConfig(by_type={"fc": LayerConfig(bits=3), "Linear": LayerConfig(bits=7)})
    assert bits_of(config, model, "encoder.0.query") == 7


def test_type_rules_follow_the_class_hierarchy(model):
    config = DKMConfig(by_type={"Linear": LayerConfig(bits=3)})
    assert bits_of(config, model, "head") == 3  # MyLinear is a Linear
    config = DKMConfig(by_type={"fc": LayerConfig(bits=2)})
    assert bits_of(config, model, "head") == 2
    assert resolve(config, model, "emb") is None


def test_dict_rules_update_fields_and_config_rules_replace(model):
    config = DKMConfig(
        default=LayerConfig(bits=2, dim=2, tau=0.01),
        by_type={"Linear": {"bits": 3}, "Conv2d": LayerConfig(bits=5)},
        by_name={"encoder.0.query": {"group_size": 4}},
    )
    query = resolve(config, model, "encoder.0.query")
    assert (query.bits, query.dim, query.tau, query.group_size) == (3, 2, 0.01, 4)
    key = resolve(config, model, "encoder.0.key")
    assert (key.bits, key.dim, key.tau, key.group_size) == (3, 2, 0.01, None)
    conv = resolve(config, model, "encoder.0.conv")
    assert conv == LayerConfig(bits=5)  # a LayerConfig replaces what is below it
    # A dict with nothing below it starts from LayerConfig's defaults.
    only = DKMConfig(by_type={"emb": {"bits": 2}})
    assert resolve(only, model, "emb") == LayerConfig(bits=2)


def test_none_excludes(model):
    config = DKMConfig(
        default=LayerConfig(bits=2),
        by_type={"Embedding": None},
        by_name={"encoder.*.key": None, "head": None},
    )
    assert resolve(config, model, "emb") is None
    assert resolve(config, model, "encoder.1.key") is None
    assert resolve(config, model, "head") is None
    assert bits_of(config, model, "encoder.1.value") == 2
    # A more specific rule can bring an excluded module back.
    config.by_name["emb"] = LayerConfig(bits=4)
    assert bits_of(config, model, "emb") == 4


def test_name_patterns_matching_nothing(model):
    config = DKMConfig(by_name={"encoder.*.query": {}, "decoder.*": {}, "head": {}, "hed": {}})
    names = [n for n, _ in model.named_modules()]
    assert config.name_patterns_matching_nothing(names) == ["decoder.*", "hed"]


# -- the shorthand ------------------------------------------------------------


def test_parse_paper_shorthand():
    config = DKMConfig.parse("cv:6/6, fc:6/4")
    assert config.default is None and config.by_name == {}
    assert config.by_type == {"cv": LayerConfig(bits=6, dim=6), "fc": LayerConfig(bits=6, dim=4)}


@pytest.mark.parametrize(
    ("text", "where", "key", "expected"),
    [
        ("*:4", "default", None, LayerConfig(bits=4)),
        ("all:2/2", "default", None, LayerConfig(bits=2, dim=2)),
        ("fc:6/4@64", "by_type", "fc", LayerConfig(bits=6, dim=4, group_size=64)),
        ("conv:3@8", "by_type", "conv", LayerConfig(bits=3, group_size=8)),
        ("Conv2d:5/2", "by_type", "Conv2d", LayerConfig(bits=5, dim=2)),
        ("emb:8", "by_type", "emb", LayerConfig(bits=8)),
        ("  linear : 2 / 3 @ 16 ", "by_type", "linear", LayerConfig(bits=2, dim=3, group_size=16)),
        ("encoder.*.query:3/2", "by_name", "encoder.*.query", LayerConfig(bits=3, dim=2)),
        ("head:1", "by_name", "head", LayerConfig(bits=1)),
    ],
)
def test_parse_variants(text, where, key, expected):
    config = DKMConfig.parse(text)
    got = config.default if where == "default" else getattr(config, where)[key]
    assert got == expected


def test_parse_combined_rules_and_extra_fields(model):
    config = DKMConfig.parse("*:2, fc:4/2@4, encoder.1.*:3", tau=0.02, min_numel=0)
    assert config.default == LayerConfig(bits=2, tau=0.02, min_numel=0)
    assert config.by_type["fc"] == LayerConfig(bits=4, dim=2, group_size=4, tau=0.02, min_numel=0)
    assert config.by_name["encoder.1.*"] == LayerConfig(bits=3, tau=0.02, min_numel=0)
    assert bits_of(config, model, "encoder.1.key") == 3
    assert bits_of(config, model, "encoder.0.key") == 4
    assert bits_of(config, model, "emb") == 2


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("cv", "'cv'"),
        ("cv:", "'cv:'"),
        ("cv:x", "'cv:x'"),
        ("cv:6/", "'cv:6/'"),
        ("cv:6/6/6", "'cv:6/6/6'"),
        ("cv:6@", "'cv:6@'"),
        ("cv:-1", "'cv:-1'"),
        ("cv:6,", "rule 2 of 'cv:6,' is empty (a trailing or doubled comma?)"),
        ("cv 6/6", "'cv 6/6'"),
        ("cv:0", "bits=0"),
        ("cv:9/4", "bits=9"),
        ("fc:4/0", "dim=0"),
        ("fc:4@0", "group_size=0"),
    ],
)
def test_parse_rejects_bad_strings(text, needle):
    with pytest.raises(TorchdkmError) as err:
        DKMConfig.parse(text)
    assert needle in str(err.value)


def test_parse_rejects_bad_extra_fields():
    with pytest.raises(TorchdkmError, match="tau=-1"):
        DKMConfig.parse("fc:4", tau=-1)
    with pytest.raises(TorchdkmError, match="'colour'"):
        DKMConfig.parse("fc:4", colour="red")
    with pytest.raises(TorchdkmError):
        DKMConfig.parse(None)  # type: ignore[arg-type]


# -- construction errors ------------------------------------------------------


@pytest.mark.parametrize("key", ["Linearr", "conv2d", "LayerNorm", "mlp", "*"])
def test_unknown_by_type_key(key):
    with pytest.raises(TorchdkmError, match=repr(key)):
        DKMConfig(by_type={key: LayerConfig()})


def test_every_shorthand_and_class_key_is_accepted():
    for key in list(TYPE_GROUPS) + list(SUPPORTED_TYPES):
        assert DKMConfig(by_type={key: {"bits": 2}}).by_type[key] == {"bits": 2}


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        (dict(default={"bits": 0}), ["default", "bits=0"]),
        (dict(default={"tau": float("nan")}), ["default", "tau=nan"]),
        (dict(by_type={"fc": {"dim": 0}}), ["by_type['fc']", "dim=0"]),
        (dict(by_type={"fc": {"bitz": 2}}), ["by_type['fc']", "'bitz'"]),
        (dict(by_name={"head": {"tau": 0}}), ["by_name['head']", "tau=0"]),
        (dict(by_name={"head": {"tau": -1.0}}), ["by_name['head']", "tau=-1.0"]),
        (dict(by_name={"head": {"color": 1}}), ["by_name['head']", "'color'"]),
        (dict(by_name={"head": 4}), ["by_name['head']", "int"]),
        (dict(default="fc:4"), ["default", "str"]),
        (dict(version=2), ["version=2"]),
    ],
)
def test_bad_config_raises_naming_key_and_value(kwargs, needles):
    with pytest.raises(TorchdkmError) as err:
        DKMConfig(**kwargs)
    for needle in needles:
        assert needle in str(err.value)


def test_by_type_and_by_name_must_be_dicts():
    with pytest.raises(TorchdkmError, match="dicts"):
        DKMConfig(by_type=[("fc", None)])  # type: ignore[arg-type]
    with pytest.raises(TorchdkmError, match="dicts"):
        DKMConfig(by_name="head")  # type: ignore[arg-type]


# -- serialisation -------------------------------------------------------------


def rich_config():
    return DKMConfig(
        default=LayerConfig(bits=2, dim=2, tau=0.01),
        by_type={"cv": LayerConfig(bits=6, dim=6), "Linear": {"bits": 3}, "emb": None},
        by_name={"encoder.*.query": {"group_size": 4}, "head": None, "encoder.0.key": LayerConfig(bits=8)},
    )


def same_resolution(a, b, model):
    for name, module in model.named_modules():
        assert a.resolve(name, module) == b.resolve(name, module), name


def test_dict_and_json_round_trip(model):
    config = rich_config()
    data = config.to_dict()
    assert data["version"] == 1
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    again = DKMConfig.from_dict(data)
    assert again.to_dict() == data
    same_resolution(config, again, model)
    from_json = DKMConfig.from_json(config.to_json())
    assert from_json.to_dict() == data
    same_resolution(config, from_json, model)
    parsed = DKMConfig.parse("cv:6/6, fc:6/4@32, *:2")
    assert DKMConfig.from_json(parsed.to_json()).to_dict() == parsed.to_dict()


def test_from_dict_and_from_json_errors():
    with pytest.raises(TorchdkmError, match="'defaults'"):
        DKMConfig.from_dict({"defaults": None})
    with pytest.raises(TorchdkmError, match="list"):
        DKMConfig.from_dict([])  # type: ignore[arg-type]
    with pytest.raises(TorchdkmError, match="invalid JSON"):
        DKMConfig.from_json("{not json")
    with pytest.raises(TorchdkmError, match="version=99"):
        DKMConfig.from_json('{"version": 99}')
    with pytest.raises(TorchdkmError, match="bits=0"):
        DKMConfig.from_json('{"default": {"bits": 0}}')
    with pytest.raises(TorchdkmError, match="'bitz'"):
        DKMConfig.from_json('{"by_name": {"head": {"bitz": 1}}}')

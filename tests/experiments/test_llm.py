"""The language-model experiment: baselines' sizes and rounding, and the whole pipeline on a tiny random LLaMA.

The real run (SmolLM2-135M, ``make reproduce-llm``) takes over an hour; here
every method runs on a 90k-parameter LLaMA with a byte tokenizer, in seconds.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from experiments import llm_baselines as base
from experiments.common import run_spread
from experiments.llm import Options, cli, main, options, run, tasks, wait_for_plan


def test_round_blocks_keeps_at_most_2_to_the_bits_values_per_block_and_their_extremes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 6))  # 40 = one block of 32 and a tail of 8
    original = model[0].weight.detach().clone()
    base.round_blocks(model, 3, 32)
    weight = model[0].weight.detach()
    for part, before in zip(torch.split(weight, 32, dim=1), torch.split(original, 32, dim=1)):
        for row, row_before in zip(part, before):
            assert torch.unique(row).numel() <= 8
            assert float((row - row_before).abs().max()) <= float(row_before.max() - row_before.min()) / 14 + 1e-3
            assert float(row.min()) == pytest.approx(float(row_before.min()), abs=1e-3)


def test_sizes_count_codes_scales_luts_and_every_other_tensor_once() -> None:
    embedding = nn.Embedding(64, 32)
    head = nn.Linear(32, 64, bias=False)
    head.weight = embedding.weight  # tied: counted once
    model = nn.ModuleDict({"emb": embedding, "head": head, "norm": nn.LayerNorm(32)})
    assert base.all_in_bytes(model, base.block_bytes(3, 32)) == 64 * 32 * 3 // 8 + 64 * 1 * 4 + 4 * 64
    assert base.all_in_bytes(model, base.lut_channel_bytes(2)) == 64 * 32 * 2 // 8 + 4 * 4 * 2 + 64 * 2 + 4 * 64
    assert base.all_in_bytes(model, base.lut_channel_bytes(2, scale=False)) == 64 * 32 * 2 // 8 + 4 * 4 * 2 + 4 * 64
    unchanged = base.unless_unchanged(model, base.block_bytes(3, 32))
    assert base.all_in_bytes(model, unchanged) == 4 * 64 * 32 + 4 * 64


def test_coreml_config_leaves_a_tied_embedding_to_its_linear() -> None:
    embedding, head, other = nn.Embedding(8, 4), nn.Linear(4, 8), nn.Embedding(8, 4)
    head.weight = embedding.weight
    model = nn.ModuleDict({"emb": embedding, "head": head, "other": other})
    assert base.coreml_layers(model, {"n_bits": 2})["module_name_configs"] == {"emb": None}


def test_tiny_run_records_every_method_with_sizes_and_completions(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("coremltools")
    path = run(Options.tiny(out=tmp_path, progress=False, coreml_dkm_minutes=1.0))
    data = json.loads((tmp_path / "llm_tiny.json").read_text())
    methods = {r["method"] for r in data["records"]}
    want = {"fp32", "round-to-nearest", "k-means per tensor", "coremltools PTQ", "k-means planned",
            "k-means planned + GPTQ", "DKM (torchdkm)", "coremltools DKM"}  # fmt: skip
    try:
        import hqq  # noqa: F401

        want.add("HQQ")
    except ImportError:
        pass
    assert methods == want
    fp32 = next(r for r in data["records"] if r["method"] == "fp32")
    for r in data["records"]:
        assert r["metrics"]["perplexity"] > 1 and r["bytes"] > 0
        if r["method"] != "fp32":
            assert r["bytes"] < fp32["bytes"] / 5, r
    dkm = [r for r in data["records"] if r["method"] == "DKM (torchdkm)"]
    assert [r["steps"] for r in dkm] == [3, 3]
    for r, target in zip(dkm, (4.5, 4.0)):
        assert r["bits_per_weight"] <= target  # the saved file's size, measured
        assert "plan: " in r["note"]  # the plan each layer got, kept with the result
    assert all("plan: " in r["note"] for r in data["records"] if r["method"].startswith("k-means planned"))
    assert all("from GPTQ (" in r["note"] for r in dkm)  # DKM starts from the compensated weights
    assert len(data["config"]["completions"]) == len(data["records"])
    text = path.read_text()
    assert "## Against the targets" in text and "Greedy completions" in text
    assert (tmp_path / "llm_tiny_tradeoff.png").stat().st_size > 0


def test_parts_run_apart_merge_into_one_report(tmp_path: Path) -> None:
    pytest.importorskip("transformers")

    opts = dict(out=tmp_path, progress=False, round_grid=((3, 32),), hqq_grid=(), tensor_bits=(), coreml_bits=())
    run(Options.tiny(parts=("baselines",), name="a", **opts))
    run(Options.tiny(parts=("dkm",), name="b", targets=(4.5,), **opts))
    assert main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--name", "both", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "both.json").read_text())
    methods = ["fp32", "round-to-nearest", "k-means planned", "k-means planned + GPTQ", "DKM (torchdkm)"]
    assert [r["method"] for r in data["records"]] == methods
    assert len(data["config"]["runs"]) == 2 and len(data["config"]["completions"]) == 5
    assert "DKM 4.5 bpw" in (tmp_path / "both.md").read_text()


def test_straight_through_reaches_every_planned_layer(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("transformers")
    import torchdkm

    seen, prepare = [], torchdkm.prepare
    monkeypatch.setattr(torchdkm, "prepare", lambda model, config, **kw: seen.append(config) or prepare(model, config, **kw))
    opts = Options.tiny(out=tmp_path, progress=False, parts=("dkm",), targets=(4.5,), straight_through=1.0, gptq_windows=0)
    run(opts)
    rules = seen[0].by_name
    assert rules and {rule.straight_through for rule in rules.values()} == {1.0}
    records = json.loads((tmp_path / "llm_tiny.json").read_text())["records"]
    notes = {r["method"]: r["note"] for r in records}
    assert "lr 0.001, straight-through 1, from k-means" in notes["DKM (torchdkm)"]
    assert "straight-through" not in notes["k-means planned"]
    assert options(cli().parse_args(["--straight-through", "0.5"])).straight_through == 0.5


def test_parts_side_by_side_merge_into_one_report(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    opts = Options.tiny(out=tmp_path, progress=False, jobs=2, parts=("dkm", "baselines"), targets=(4.5,),
                        round_grid=((3, 32),), hqq_grid=(), tensor_bits=(), coreml_bits=())  # fmt: skip
    path = run(opts)
    data = json.loads((tmp_path / "llm_tiny.json").read_text())
    methods = ["fp32", "round-to-nearest", "k-means planned", "k-means planned + GPTQ", "DKM (torchdkm)"]
    assert [r["method"] for r in data["records"]] == methods
    assert [r["steps"] for r in data["records"] if r["method"] == "DKM (torchdkm)"] == [3]
    assert data["config"]["jobs"] == 2 and data["config"]["unfinished"] == []
    assert len(data["config"]["runs"]) == 2 and len(data["config"]["completions"]) == 5
    assert data["wall_seconds"] > max(r["seconds"] for r in data["records"])  # from the first part's start
    assert not (tmp_path / "llm_tiny_parts").exists()  # the parts' files are merged, then removed
    assert "DKM 4.5 bpw" in path.read_text()


def test_side_by_side_tasks_start_with_the_plan_and_the_slowest_target() -> None:
    opts = Options.tiny(targets=(3.0, 4.0, 2.5))
    assert tasks(opts) == [("plan", None), ("baselines", None), ("dkm", 4.0), ("dkm", 3.0), ("dkm", 2.5), ("coreml-dkm", None)]
    assert tasks(replace(opts, parts=("dkm",))) == [("plan", None), ("fp32", None), ("dkm", 4.0), ("dkm", 3.0), ("dkm", 2.5)]
    assert tasks(replace(opts, parts=("baselines",))) == [("baselines", None)]
    with pytest.raises(ValueError, match="jobs: at least 1"):
        run(replace(opts, jobs=0))


def test_the_command_line_takes_one_seed_and_the_jobs() -> None:
    opts = options(cli().parse_args(["--seeds", "1", "--jobs", "2", "--targets", "3", "2.5"]))
    assert (opts.seed, opts.jobs, opts.targets) == (1, 2, (3.0, 2.5))
    assert options(cli().parse_args([])).seed == Options().seed
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "1"])  # one seed a run: not silently the first


def test_a_target_waiting_for_a_failed_plan_stops(tmp_path: Path) -> None:
    plan = tmp_path / "plan.pt"
    plan.with_suffix(".failed").touch()
    with pytest.raises(RuntimeError, match="its task failed"):
        wait_for_plan(plan, poll=0.01)


def test_spread_processes_report_every_exit_code_in_order() -> None:
    ended = []
    codes = run_spread(os._exit, [(0,), (3,), (0,)], 2, on_exit=lambda i, code: ended.append((i, code)))
    assert codes == [0, 3, 0]
    assert sorted(ended) == [(0, 0), (1, 3), (2, 0)]


def test_coremltools_dkm_past_its_wall_time_cap_is_killed_and_said(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    opts = Options.tiny(out=tmp_path, progress=False, parts=("coreml-dkm",), coreml_dkm_minutes=0.0,
                        coreml_grace_minutes=0.01)  # fmt: skip
    path = run(opts)
    data = json.loads((tmp_path / "llm_tiny.json").read_text())
    assert [r["method"] for r in data["records"]] == ["fp32"]
    assert "killed at its 0.01-minute wall-time cap" in data["config"]["unfinished"][0]
    assert "coremltools DKM: no result" in path.read_text()
    assert not (tmp_path / "llm_tiny_coreml_dkm.json").exists()

"""experiments/llm_scales.py on the tiny random LLaMA: its scale bytes are the planner's, and it writes its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import torchdkm

pytest.importorskip("transformers")

from experiments.llm import Experiment, Options, measure_plan  # noqa: E402
from experiments.llm_scales import compare, main, rows_and_length, scale_bytes, with_8bit_scales  # noqa: E402


@pytest.fixture(scope="module")
def planned():
    ex = Experiment(Options.tiny(progress=False))
    return measure_plan(ex), ex.teacher


def test_float16_scale_bytes_are_what_the_planner_counts(planned) -> None:
    plan, model = planned
    checked = 0
    for layer in plan.layers:
        rows, row_len = rows_and_length(model, layer)
        plain = {(c.bits, c.group_size): size for c, size, _ in layer.options if c.scale_block is None}
        for config, size, _ in layer.options:
            if config.scale_block is not None and (config.bits, config.group_size) in plain:
                assert size - plain[config.bits, config.group_size] == scale_bytes(config, rows, row_len)[0]
                checked += 1
    assert checked > 0


def test_8bit_scales_cost_less_and_keep_every_option(planned) -> None:
    plan, model = planned
    cheaper = with_8bit_scales(plan, model)
    for before, after in zip(plan.layers, cheaper.layers):
        rows, row_len = rows_and_length(model, before)
        costs = {str(c): size for c, size, _ in after.options}
        assert len(costs) == len(before.options) and [o[1] for o in after.options] == sorted(costs.values())
        for config, size, _ in before.options:
            half, codes = scale_bytes(config, rows, row_len)
            assert costs[str(config)] == size - half + codes and codes <= half
    # 10 rows of 576 in blocks of 32, scale and offset: 360 float16 values, or 360 codes and 2 x 10 factors
    assert scale_bytes(torchdkm.LayerConfig(bits=3, scale_block=32, scale_offset=True), 10, 576) == (720, 400)
    assert scale_bytes(torchdkm.LayerConfig(bits=3), 10, 576) == (0, 0)
    rows = compare(plan, model, (4.5,))
    assert rows[0]["scale_bytes"] >= 0 and rows[0]["error_8bit"] > 0 and rows[0]["error_float16"] > 0


def test_the_command_writes_its_table(tmp_path: Path) -> None:
    assert main(["--tiny", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "llm_scale_cost.json").read_text())
    assert [r["target"] for r in data["rows"]] == list(Options.tiny().targets)
    assert "| target bpw |" in (tmp_path / "llm_scale_cost.md").read_text()


def test_the_matching_plan_is_the_smallest_on_the_grid(planned) -> None:
    plan, _ = planned
    from experiments.llm_scales import STEP, error_sum, smallest_matching

    target = Options.tiny().targets[-1]
    wanted = error_sum(plan.retarget(target + 7 * STEP))
    found = smallest_matching(plan, target, wanted)
    assert found is not None and found <= target + 7 * STEP + 1e-9
    assert error_sum(plan.retarget(found)) <= wanted
    if found > target:
        assert error_sum(plan.retarget(found - STEP)) > wanted
    assert smallest_matching(plan, target, -1.0) is None  # no plan has a negative error

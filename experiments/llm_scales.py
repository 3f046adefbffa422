"""What 8-bit block scales would buy the language-model plan, priced before building them.

    python -m experiments.llm_scales                 # measures SmolLM2-135M's plan (~6 min on one core)
    python -m experiments.llm_scales --plan plan.pt  # a plan saved by experiments.llm's side-by-side run
    python -m experiments.llm_scales --tiny          # the tiny random LLaMA (seconds)

The plan of :mod:`experiments.llm` (every layer option's size and Fisher-weighted error, as
:func:`torchdkm.plan_to_size` measures them) stores each block's scale (and offset) in float16: at 3 bits
per weight all in they are a few percent of the file.  Stored as 8-bit codes times one float16 factor per
row (double quantization, as llama.cpp's k-quants and QLoRA store theirs), each scaled option would cost
less; spending the same budgets on the cheaper options gives the planner's own objective (the summed
Fisher error of the chosen options) at each target, against the float16 plans of slightly larger sizes.
An upper bound on what the change buys: the 8-bit codes' own rounding error is not counted.

Outputs: ``results/llm_scale_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

import torchdkm
from experiments.common import environment
from experiments.llm import Experiment, Options, measure_plan
from torchdkm.select import is_transposed

RESULTS = Path(__file__).resolve().parent.parent / "results"
#: How much larger a float16 plan may grow, in steps of this many bits per weight, to match the 8-bit one.
STEP, WIDEST = 0.01, 1.0


def scale_bytes(config: torchdkm.LayerConfig, rows: int, row_len: int) -> tuple[int, int]:
    """Bytes of one option's block scales (and offsets): float16 as stored, and as 8-bit codes with a
    float16 factor per row and table."""
    if config.scale_block is None:
        return 0, 0
    tables = 2 if config.scale_offset else 1
    blocks = rows * math.ceil(row_len / (config.scale_block or row_len)) * tables
    return 2 * blocks, blocks + 2 * rows * tables


def rows_and_length(model: nn.Module, layer: torchdkm.budget.LayerChoice) -> tuple[int, int]:
    """Output channels and weights per channel of a planned weight (transformers' ``Conv1D`` transposed)."""
    module = model.get_submodule(layer.module)
    weight = getattr(module, layer.name.rsplit(".", 1)[1])
    rows = weight.shape[-1] if is_transposed(module) else weight.shape[0]
    return rows, weight.numel() // rows


def with_8bit_scales(plan: torchdkm.SizePlan, model: nn.Module) -> torchdkm.SizePlan:
    """The same measured options, each scaled one costed with 8-bit scales (cheapest first again); the plan's
    other fields shared, not copied (its Fisher weights are as large as the model)."""
    layers = []
    for layer in plan.layers:
        rows, row_len = rows_and_length(model, layer)
        costed = []
        for config, size, error in layer.options:
            half, codes = scale_bytes(config, rows, row_len)
            costed.append((config, size - half + codes, error))
        layers.append(replace(layer, options=sorted(costed, key=lambda option: option[1]), chosen=0))
    return replace(plan, layers=layers)


def error_sum(plan: torchdkm.SizePlan) -> float:
    return sum(layer.error for layer in plan.layers)


def smallest_matching(plan: torchdkm.SizePlan, target: float, error: float) -> float | None:
    """The smallest float16 plan, ``target`` plus a multiple of :data:`STEP` up to :data:`WIDEST`, whose summed
    error is at most ``error``: a bisection (a larger budget never raises the greedy plan's error), as each
    plan of SmolLM2 takes seconds to spend."""
    low, high = 0, round(WIDEST / STEP)  # error(low) > error is not assumed: low = 0 is the target itself
    if error_sum(plan.retarget(target + high * STEP)) > error:
        return None
    while low < high:
        middle = (low + high) // 2
        if error_sum(plan.retarget(target + middle * STEP)) <= error:
            high = middle
        else:
            low = middle + 1
    return target + low * STEP


def compare(plan: torchdkm.SizePlan, model: nn.Module, targets: tuple[float, ...]) -> list[dict]:
    """Per target: the float16 scales' share of the file and both plans' summed errors, and the float16 plan
    size that matches the 8-bit one's error (None: not within :data:`WIDEST` bits per weight more)."""
    cheaper, rows = with_8bit_scales(plan, model), []
    for target in targets:
        half, codes = plan.retarget(target), cheaper.retarget(target)
        spent = sum(scale_bytes(layer.config, *rows_and_length(model, layer))[0] for layer in half.layers)
        matched = smallest_matching(plan, target, error_sum(codes))
        rows.append({"target": target, "file_bytes": half.bytes, "scale_bytes": spent,
                     "scale_bpw": 8 * spent / half.parameters, "error_float16": error_sum(half),
                     "error_8bit": error_sum(codes), "float16_plan_matching": matched})  # fmt: skip
    return rows


def write(rows: list[dict], name: str, source: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"environment": environment(), "plan": source, "rows": rows}, indent=1) + "\n")
    lines = [f"# What 8-bit block scales would buy the plan ({name})", "",
             f"`python -m experiments.llm_scales` (plan: {source}); error: the planner's summed Fisher-weighted error "
             "of the chosen options (lower is better), the 8-bit codes' own rounding not counted", "",
             "| target bpw | file | float16 scales | scales bpw | error, float16 scales | error, 8-bit scales | ratio "
             "| float16 plan with the 8-bit error |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        matched = "beyond +1 bpw" if r["float16_plan_matching"] is None else f"{r['float16_plan_matching']:.2f} bpw"
        lines.append(f"| {r['target']:g} | {r['file_bytes'] / 1e6:.2f} MB | {r['scale_bytes'] / 1e6:.2f} MB | "
                     f"{r['scale_bpw']:.3f} | {r['error_float16']:.4g} | {r['error_8bit']:.4g} | "
                     f"{r['error_8bit'] / r['error_float16']:.3f} | {matched} |")  # fmt: skip
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", type=Path, help="a plan saved by experiments.llm (default: measure it)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random LLaMA (seconds)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="llm_scale_cost")
    args = parser.parse_args(argv)
    opts = Options.tiny(progress=False) if args.tiny else Options(progress=False)
    torch.manual_seed(opts.seed)
    ex = Experiment(opts)
    plan = torch.load(args.plan, weights_only=False) if args.plan else measure_plan(ex)
    source = str(args.plan) if args.plan else "measured in this run"
    write(compare(plan, ex.teacher, opts.targets), args.name, source, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The engine before and after a change, side by side: one DKM training step on the 1M/4M rows of ``bench.dkm_step``.

    git worktree add --detach /tmp/old <commit>      # the checkout to compare against
    python -m bench.engine_compare --old /tmp/old

Each (case, checkout) runs in a fresh subprocess whose working directory is that checkout (so it
imports that checkout's ``torchdkm``), at one torch thread: ``prepare`` one ``nn.Linear``, a few
untimed steps, then the median of ``--steps`` timed steps (forward, MSE loss, backward, SGD), in
wall-clock time and in the process's CPU time (one thread: the CPU time is the work, without the
time this shared machine gives to others).  The checkouts take turns, ``--turns`` times, which one
goes first alternating from turn to turn, and each case's ratios are new / old of the medians of
the turns.  Writes ``bench/results/engine_compare.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from bench.checkouts import git_head, run_in

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: (name, out, in, bits, dim, dtype): the 1M and 4M torchdkm rows of bench.dkm_step.
CASES = [
    ("1M 4-bit dim 1 fp32", 1024, 1024, 4, 1, "float32"),
    ("1M 4-bit dim 2 fp32", 1024, 1024, 4, 2, "float32"),
    ("1M 2-bit dim 2 fp32", 1024, 1024, 2, 2, "float32"),
    ("4M 4-bit dim 1 bf16", 2048, 2048, 4, 1, "bfloat16"),
    ("4M 4-bit dim 2 fp32", 2048, 2048, 4, 2, "float32"),
]
STEP = """
import dataclasses, json, resource, statistics, sys, time, torch, torchdkm
from torch import nn
torch.set_num_threads(1)
out, inp, bits, dim, dtype, steps = json.loads(sys.argv[1])
dtype = getattr(torch, dtype)
g = torch.Generator().manual_seed(0)
layer = nn.Linear(inp, out, bias=False, dtype=dtype)
with torch.no_grad():
    layer.weight.copy_(torch.randn(out, inp, generator=g) * 0.02)
model = nn.Sequential(layer)
x = torch.randn(32, inp, generator=g).to(dtype)
target = model(x).detach()
# the engine alone: the straight-through term (newer than the redesign; automatic at bits / dim <= 1) off
fields = {f.name for f in dataclasses.fields(torchdkm.LayerConfig)}
same = {"straight_through": 0.0} if "straight_through" in fields else {}
torchdkm.prepare(model, torchdkm.DKMConfig.parse(f"fc:{bits}/{dim}", min_numel=0, **same))
opt = torch.optim.SGD(model.parameters(), lr=1e-2)
wall, cpu = [], []
faults = None
for i in range(3 + steps):
    if i == 3:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    start, start_cpu = time.perf_counter(), time.process_time()
    loss = nn.functional.mse_loss(model(x).float(), target.float())
    opt.zero_grad(); loss.backward(); opt.step()
    if i >= 3:
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
print(json.dumps([statistics.median(wall), statistics.median(cpu), faults]))
"""


def time_step(checkout: Path, case: tuple, steps: int) -> tuple[float, float, float]:
    """The median step's (wall-clock, CPU) seconds of ``case`` in ``checkout``, and its minor page faults per step."""
    wall, cpu, faults = run_in(checkout, STEP, [case[1], case[2], case[3], case[4], case[5], steps])
    return float(wall), float(cpu), float(faults)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the commit to compare against")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--cases", nargs="+", help="only the cases whose name contains one of these")
    args = parser.parse_args(argv)
    rows = []
    for case in CASES:
        if args.cases and not any(part in case[0] for part in args.cases):
            continue
        times: dict[str, list[float]] = {key: [] for key in ("old", "new", "old_cpu", "new_cpu", "old_faults", "new_faults")}
        for turn in range(args.turns):
            order = [("old", args.old), ("new", ROOT)]
            for which, checkout in order if turn % 2 == 0 else order[::-1]:
                wall, cpu, faults = time_step(checkout, case, args.steps)
                times[which].append(wall)
                times[f"{which}_cpu"].append(cpu)
                times[f"{which}_faults"].append(faults)
        med = {key: statistics.median(values) for key, values in times.items()}
        row = {"case": case[0], "old_ms": med["old"] * 1e3, "new_ms": med["new"] * 1e3, "ratio": med["new"] / med["old"]}
        row |= {"old_cpu_ms": med["old_cpu"] * 1e3, "new_cpu_ms": med["new_cpu"] * 1e3}
        row |= {"cpu_ratio": med["new_cpu"] / med["old_cpu"], "old_faults": med["old_faults"]}
        row |= {"new_faults": med["new_faults"], "turns": times}
        rows.append(row)
        print(
            f"{case[0]:24s} wall old {row['old_ms']:8.2f} new {row['new_ms']:8.2f} ms  new/old {row['ratio']:5.3f}   "
            f"CPU old {row['old_cpu_ms']:8.2f} new {row['new_cpu_ms']:8.2f} ms  new/old {row['cpu_ratio']:5.3f}",
            flush=True,
        )
    malloc = {key: value for key, value in os.environ.items() if key.startswith("MALLOC_")}
    report = {"old": git_head(args.old), "new": git_head(ROOT), "steps": args.steps, "turns": args.turns}
    report |= {"malloc_env": malloc, "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "engine_compare.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Engine before ({report['old']}) and after ({report['new']}): one DKM step, 1 thread",
        "",
        f"`python -m bench.engine_compare --old <checkout of {report['old']}>`: median of {args.turns} turns, "
        f"each the median of {args.steps} steps; the checkouts alternate (which goes first, too).  Wall-clock "
        "and CPU time (one thread: CPU time leaves out what this shared machine gives to others), and the "
        "minor page faults per step (memory the allocator got fresh from the OS: each costs a zeroed page).  "
        f"glibc allocator settings: {malloc or 'the defaults'}.",
        "",
        "| case | old ms | new ms | new / old | old CPU ms | new CPU ms | new / old (CPU) | old faults | new faults |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['case']} | {r['old_ms']:.2f} | {r['new_ms']:.2f} | {r['ratio']:.3f} | {r['old_cpu_ms']:.2f} | "
        f"{r['new_cpu_ms']:.2f} | {r['cpu_ratio']:.3f} | {r['old_faults']:.0f} | {r['new_faults']:.0f} |"
        for r in rows
    ]
    (args.out_dir / "engine_compare.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

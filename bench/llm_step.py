"""A language model's DKM training step, layer by layer, before and after a change: SmolLM2-135M's shapes.

    git worktree add --detach /tmp/old <commit>      # the checkout to compare against (or --old /work/main)
    python -m bench.llm_step --old /tmp/old

``prepare(model, "fc:3/1#64a, emb:3/1#64a")`` on SmolLM2-135M costs far more than the plain model's
forward and backward: its 211 ``Linear`` layers (the largest 1536 x 576) and its 49152 x 576 embedding
are uniquified 3-bit LUTs with per-block-of-64 scales and offsets.  Each case here is one such layer
(random weights, std 0.05), timed in a fresh subprocess whose working directory is the checkout (so it
imports that checkout's ``torchdkm``): a few untimed steps, then the median of ``--steps`` timed steps
(forward, a squared-output loss, backward, SGD), at ``--threads`` torch threads (default 1).  The plain layer (no
DKM) is timed in the same subprocess, so ``overhead = dkm - plain`` is the DKM machinery's cost.  The
checkouts take turns ``--turns`` times; ratios are new / old of the medians.  Writes
``bench/results/llm_step.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.checkouts import git_head, run_in

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
#: (name, kind, out, in, spec): SmolLM2-135M's largest Linear (an MLP projection), a square attention
#: projection and the tied embedding.
CASES = [
    ("fc 1536x576 3/1#64a", "fc", 1536, 576, "fc:3/1#64a"),
    ("fc 576x576 3/1#64a", "fc", 576, 576, "fc:3/1#64a"),
    ("emb 49152x576 3/1#64a", "emb", 49152, 576, "emb:3/1#64a"),
]
STEP = """
import copy, json, statistics, sys, time, torch, torchdkm
from torch import nn
kind, out, inp, spec, steps, threads = json.loads(sys.argv[1])
torch.set_num_threads(threads)
torch.manual_seed(0)
if kind == "emb":
    layer, x = nn.Embedding(out, inp), torch.randint(0, out, (4, 128))
else:
    layer, x = nn.Linear(inp, out, bias=False), torch.randn(4 * 128, inp)
with torch.no_grad():
    layer.weight.normal_(0, 0.05)
plain = nn.Sequential(layer)
model = torchdkm.prepare(copy.deepcopy(plain), torchdkm.DKMConfig.parse(spec, min_numel=0), progress=False).train()

def median_step(m):
    opt = torch.optim.SGD(m.parameters(), lr=1e-4)
    times = []
    for i in range(2 + steps):
        start = time.perf_counter()
        loss = m(x).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)

print(json.dumps([median_step(plain), median_step(model)]))
"""


def time_case(checkout: Path, case: tuple, steps: int, threads: int) -> tuple[float, float]:
    plain, dkm = run_in(checkout, STEP, [case[1], case[2], case[3], case[4], steps, threads])
    return plain, dkm


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", type=Path, required=True, help="a checkout of the commit to compare against")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a busy machine)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    for case in CASES:
        turns: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for _ in range(args.turns):
            for which, checkout in (("old", args.old), ("new", ROOT)):
                turns[which].append(time_case(checkout, case, args.steps, args.threads))
        row: dict = {"case": case[0], "turns": turns}
        for which in ("old", "new"):
            row[f"{which}_plain_ms"] = statistics.median(p for p, _ in turns[which]) * 1e3
            row[f"{which}_dkm_ms"] = statistics.median(d for _, d in turns[which]) * 1e3
            row[f"{which}_overhead_ms"] = statistics.median(d - p for p, d in turns[which]) * 1e3
        row["step_ratio"] = row["new_dkm_ms"] / row["old_dkm_ms"]
        row["overhead_ratio"] = row["new_overhead_ms"] / row["old_overhead_ms"]
        rows.append(row)
        print(
            f"{case[0]:24s} plain {row['new_plain_ms']:8.1f} ms  dkm old {row['old_dkm_ms']:8.1f} new "
            f"{row['new_dkm_ms']:8.1f} ms  overhead old {row['old_overhead_ms']:8.1f} new {row['new_overhead_ms']:8.1f} "
            f"ms  new/old {row['overhead_ratio']:5.3f}",
            flush=True,
        )
    report = {"old": git_head(args.old), "new": git_head(ROOT), "steps": args.steps, "turns": args.turns}
    report |= {"threads": args.threads, "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "llm_step.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# SmolLM2-135M layers, one DKM training step: before ({report['old']}) and after ({report['new']})",
        "",
        f"`python -m bench.llm_step --old <checkout of {report['old']}>`: median of {args.turns} turns, each the "
        f"median of {args.steps} steps (forward, backward, SGD); the checkouts alternate; {args.threads} torch thread(s). "
        "Overhead: the DKM step minus the plain layer's, in the same process.",
        "",
        "| case | plain ms | old DKM ms | new DKM ms | old overhead ms | new overhead ms | overhead new / old |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['case']} | {r['new_plain_ms']:.1f} | {r['old_dkm_ms']:.1f} | {r['new_dkm_ms']:.1f} | "
        f"{r['old_overhead_ms']:.1f} | {r['new_overhead_ms']:.1f} | {r['overhead_ratio']:.3f} |"
        for r in rows
    ]
    (args.out_dir / "llm_step.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

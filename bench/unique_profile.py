"""Where a uniquified DKM step's time goes, phase by phase, beside the plain layer's step.

``python -m bench.unique_profile`` (default: 4M bf16 weights, 4-bit, one torch thread) trains the
layer of ``bench.dkm_step``'s ``bf16`` row (same weights, batch, loss and SGD step) once plain and
once with torchdkm, timing the forward, the backward and the optimizer step of each, and within
torchdkm's step the parts it adds: the four passes over the weight (count, gather the soft weight,
sum the gradient per pattern, gather each weight's gradient), the DKM math on the distinct values
(iterations, output, implicit backward) and the temperature.  Every time is a median over the
timed steps, also given in elementwise passes over the weight (``w * 1.0``).  It prints a table
and writes ``bench/results/unique_profile.{json,md}``.

The parts are timed by wrapping the functions that do them (the passes of
``torchdkm.cluster.unique.Distinct``, the engine's iterations and the dense attention's passes over
the distinct values, the clusterer's ``margin``), whichever kernels run them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench._dkm_worker import LEARNING_RATE, Case, build_problem, make_palettizer
from bench.dkm_step import CML_DEFAULT_ITERS, RESULTS_DIR, TORCHDKM_DEFAULT_TAU, machine_info, parse_size, time_pass
from torchdkm._source import source_digest
from torchdkm.cluster import clusterer, dense, engine, unique
from torchdkm.kernels import native_available

#: (module, attribute, the part it is counted in).
PARTS = [
    (clusterer, "distinct", "count the patterns"),
    (unique.Distinct, "expand", "gather the soft weight"),
    (unique.Distinct, "sum_per_slot", "sum the gradient per pattern"),
    (unique.Distinct, "gather_affine", "gather each weight's gradient"),
    (engine, "iterate", "DKM on the distinct values"),
    (dense.DenseAttention, "output", "DKM on the distinct values"),
    (dense.DenseAttention, "gram_pass", "DKM on the distinct values"),
    (dense.DenseAttention, "adjoint_pass", "DKM on the distinct values"),
    (clusterer, "margin", "temperature"),
]
PHASES = ("forward", "backward", "optimizer step")


@contextlib.contextmanager
def timed_parts(seconds: dict[str, float]) -> Iterator[None]:
    """Add the time spent in each of :data:`PARTS` to ``seconds[part]`` while inside."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in PARTS]

    def wrap(function: Callable, part: str) -> Callable:
        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[part] += time.perf_counter() - start

        return timed

    for (owner, name, part), (_, _, function) in zip(PARTS, originals):
        setattr(owner, name, wrap(function, part))
    try:
        yield
    finally:
        for owner, name, function in originals:
            setattr(owner, name, function)


def profile(case: Case, warmup: int) -> dict[str, float]:
    """Median seconds per step of each phase (and, for torchdkm, of each part) over ``case.steps`` steps."""
    model, x, target, _ = build_problem(case)
    model = make_palettizer(case).prepare(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    samples: dict[str, list[float]] = defaultdict(list)
    for step in range(warmup + case.steps):
        parts: dict[str, float] = defaultdict(float)
        with timed_parts(parts):
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.mse_loss(model(x), target)
            forward = time.perf_counter()
            loss.backward()
            backward = time.perf_counter()
            optimizer.step()
            end = time.perf_counter()
        if step < warmup:
            continue
        phases = {"forward": forward - start, "backward": backward - forward, "optimizer step": end - backward}
        for name, value in {**phases, "step": end - start, **parts}.items():
            samples[name].append(value)
    return {name: statistics.median(values) for name, values in samples.items()}


def build_rows(plain: dict[str, float], dkm: dict[str, float], pass_s: float) -> list[dict[str, Any]]:
    """The phases of both steps, then what torchdkm's step adds, split into its parts (each with its share)."""
    rows = [
        {
            "what": name,
            "plain_s": plain[name],
            "torchdkm_s": dkm[name],
            "added_passes": (dkm[name] - plain[name]) / pass_s,
        }
        for name in (*PHASES, "step")
    ]
    added = dkm["step"] - plain["step"]
    parts = {part: dkm.get(part, 0.0) for part in dict.fromkeys(part for _, _, part in PARTS)}
    parts["optimizer step, beyond the plain one"] = dkm["optimizer step"] - plain["optimizer step"]
    parts["other (autograd, bookkeeping of the distinct values)"] = added - sum(parts.values())
    for what, seconds in parts.items():
        share = seconds / added if added > 0 else None
        rows.append(
            {"what": what, "plain_s": None, "torchdkm_s": seconds, "added_passes": seconds / pass_s, "share": share}
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    ms = lambda s: "-" if s is None else f"{s * 1e3:.2f} ms"  # noqa: E731
    share = lambda r: "-" if r.get("share") is None else f"{100 * r['share']:.0f} %"  # noqa: E731
    lines = [
        "# Where a uniquified DKM step's time goes",
        "",
        f"- Command: `{report['command']}` ({report['date']}, load average {report['load'][0]:.2f} -> "
        f"{report['load'][1]:.2f}; torchdkm sources sha256 {report['source_sha256']})",
        f"- Layer: {report['size']} = {report['numel']:,} weights, {report['dtype']}, {report['bits']}-bit, dim 1; "
        f"{report['steps']} timed steps (medians); torch threads {report['threads']}; "
        f"one pass (`w * 1.0`) = {report['pass_s'] * 1e6:.1f} µs; native loops: {report['native']}",
        "",
        "| phase / part | plain layer | torchdkm | added, in passes | share of what torchdkm adds |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['what']} | {ms(row['plain_s'])} | {ms(row['torchdkm_s'])} | {row['added_passes']:.1f} | {share(row)} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="4M", help="256K, 1M, 4M, 64x64...")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--steps", type=int, default=30, help="timed steps (after 3 warm-up steps)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    args = p.parse_args(argv)
    args.command = " ".join(["python -m bench.unique_profile", *(sys.argv[1:] if argv is None else argv)])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    label, out_features, in_features = parse_size(args.size)
    load = [os.getloadavg()[0]]
    cases = {
        library: Case(
            library,
            "bf16",
            label,
            out_features,
            in_features,
            bits=bits,
            dim=dim,
            steps=args.steps,
            iters=iters,
            tau=tau,
            threads=args.threads,
        )
        for library, bits, dim, iters, tau in [
            ("none", 0, 0, 0, 0.0),
            ("torchdkm", args.bits, 1, CML_DEFAULT_ITERS, TORCHDKM_DEFAULT_TAU),
        ]
    }
    plain, dkm = (profile(cases[name], warmup=3) for name in ("none", "torchdkm"))
    pass_s = time_pass(out_features, in_features, torch.bfloat16)
    load.append(os.getloadavg()[0])
    report = {
        "command": args.command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load": load,
        "source_sha256": source_digest(),
        "machine": machine_info(),
        "size": label,
        "numel": out_features * in_features,
        "dtype": "bfloat16",
        "bits": args.bits,
        "steps": args.steps,
        "threads": args.threads,
        "native": "yes" if native_available() else "no (torch fallback)",
        "pass_s": pass_s,
        "plain": plain,
        "torchdkm": dkm,
        "rows": build_rows(plain, dkm, pass_s),
    }
    text = markdown(report)
    print(text)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "unique_profile.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / "unique_profile.md").write_text(text)
    print(f"wrote {args.out_dir / 'unique_profile.json'} and {args.out_dir / 'unique_profile.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

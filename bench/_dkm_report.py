"""Ratios, targets and tables for ``bench.dkm_step``.

Every number may be a bound: a coremltools run killed at its timeout reports
the time it had spent so far as a *lower bound* on its first-step or step
time, and the child's largest RSS the parent saw as a lower bound on its peak.
:class:`Bounded` carries that through the ratios, and a target whose verdict a
bound cannot settle is reported as ``unknown``, never as a pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LIB_ORDER = {"none": 0, "torchdkm": 1, "coremltools": 2}
VARIANT_ORDER = {"default": 0, "exact": 1, "bf16": 2, "bf16-torch": 3}
DTYPE_OF_VARIANT = {"bf16": "bfloat16", "bf16-torch": "bfloat16"}


@dataclass(frozen=True)
class Bounded:
    """A measured value; ``bound`` is ``""`` (exact), ``">="`` (true value is at least) or ``"<="``."""

    value: float | None
    bound: str = ""

    def __truediv__(self, other: Bounded) -> Bounded:
        """``self / other``: dividing by a lower bound gives an upper bound and vice versa; mixed bounds are unknown."""
        if self.value is None or other.value is None or other.value == 0:
            return Bounded(None)
        flip = {"": "", ">=": "<=", "<=": ">="}[other.bound]
        bounds = {b for b in (self.bound, flip) if b}
        if len(bounds) > 1:
            return Bounded(None)
        return Bounded(self.value / other.value, bounds.pop() if bounds else "")


@dataclass(frozen=True)
class Target:
    """A goal on one ratio (or on ``step_passes`` / ``overhead_passes``) of one configuration."""

    name: str
    size: str
    bits: int
    dim: int
    variant: str
    metric: str
    op: str
    threshold: float


TARGETS = (
    Target("step >= 50x faster", "1M", 4, 1, "default", "step_speedup", ">=", 50.0),
    Target("first step >= 100x faster", "1M", 4, 1, "default", "first_speedup", ">=", 100.0),
    Target("peak RSS <= 1/5", "1M", 4, 1, "default", "rss_ratio", "<=", 0.2),
    Target("MSE no worse", "1M", 4, 1, "default", "mse_ratio", "<=", 1.0),
    Target("step >= 10x faster", "1M", 4, 2, "default", "step_speedup", ">=", 10.0),
    Target("peak RSS <= 1/3", "1M", 4, 2, "default", "rss_ratio", "<=", 1 / 3),
    Target("16-bit uniquified: step - plain step <= 20 passes", "4M", 4, 1, "bf16", "overhead_passes", "<=", 20.0),
)


# -- lookups ---------------------------------------------------------------------


def result_key(result: dict[str, Any]) -> tuple[str, str, str, int, int]:
    case = result["case"]
    return (case["library"], case["variant"], case["size"], case["bits"], case["dim"])


def metric(result: dict[str, Any] | None, field: str) -> Bounded:
    """``result[field]`` as a :class:`Bounded` (a lower bound if the run timed out before measuring it)."""
    if result is None or result.get(field) is None:
        return Bounded(None)
    return Bounded(float(result[field]), ">=" if field in result.get("lower_bounds", ()) else "")


def row_dtype(result: dict[str, Any]) -> str:
    return DTYPE_OF_VARIANT.get(result["case"]["variant"], "float32")


def pass_seconds(passes: dict[tuple[str, str], dict[str, Any]], size: str, dtype: str) -> float | None:
    entry = passes.get((size, dtype))
    return None if entry is None else float(entry["pass_s"])


def step_passes(result: dict[str, Any], results: dict, passes: dict[tuple[str, str], dict[str, Any]]) -> Bounded:
    """Median step time in units of one elementwise pass over the weight (same size and dtype).

    ``results`` is unused; the signature matches :func:`overhead_passes`.
    """
    seconds = pass_seconds(passes, result["case"]["size"], row_dtype(result))
    return metric(result, "step_s") / Bounded(seconds)


def overhead_passes(result: dict[str, Any], results: dict[tuple, dict[str, Any]], passes: dict) -> Bounded:
    """(step - the plain layer's step) in elementwise passes: what clustering adds to the floor.

    From the row's paired steps where it has them (both steps and the pass timed in its own process,
    see ``bench/_dkm_worker.py``); else from its step and the plain row's, two processes apart.
    """
    if result.get("paired_overhead_s") is not None and result.get("paired_pass_s"):
        return Bounded(float(result["paired_overhead_s"]) / float(result["paired_pass_s"]))
    case = result["case"]
    bf16 = DTYPE_OF_VARIANT.get(case["variant"]) == "bfloat16"
    plain = results.get(("none", "bf16" if bf16 else "default", case["size"], 0, 0))
    step, floor = metric(result, "step_s"), metric(plain, "step_s")
    if step.value is None or floor.value is None or floor.bound or plain is result:
        return Bounded(None)
    seconds = pass_seconds(passes, case["size"], row_dtype(result))
    return Bounded(step.value - floor.value, step.bound) / Bounded(seconds)


def sort_key(result: dict[str, Any]) -> tuple:
    case = result["case"]
    return (
        case["out_features"] * case["in_features"],
        case["bits"],
        case["dim"],
        LIB_ORDER.get(case["library"], 9),
        VARIANT_ORDER.get(case["variant"], 9),
    )


# -- ratios and targets ----------------------------------------------------------


def compute_ratios(results: dict[tuple, dict[str, Any]]) -> list[dict[str, Any]]:
    """coremltools / torchdkm times and torchdkm / coremltools memory and MSE, per fp32 torchdkm row."""
    rows = []
    for key, mine in sorted(results.items(), key=lambda item: sort_key(item[1])):
        library, variant, size, bits, dim = key
        theirs = results.get(("coremltools", "default", size, bits, dim))
        if library != "torchdkm" or variant in DTYPE_OF_VARIANT or theirs is None:
            continue
        rows.append(
            {
                "size": size,
                "bits": bits,
                "dim": dim,
                "variant": variant,
                "step_speedup": metric(theirs, "step_s") / metric(mine, "step_s"),
                "first_speedup": metric(theirs, "first_step_s") / metric(mine, "first_step_s"),
                "rss_ratio": metric(mine, "rss_peak_bytes") / metric(theirs, "rss_peak_bytes"),
                "alloc_ratio": metric(mine, "alloc_peak_bytes") / metric(theirs, "alloc_peak_bytes"),
                "mse_ratio": metric(mine, "mse") / metric(theirs, "mse"),
            }
        )
    return rows


def verdict(value: Bounded, op: str, threshold: float) -> str:
    """``pass``, ``FAIL`` or ``unknown`` (not measured, or a bound on the wrong side)."""
    if value.value is None:
        return "unknown"
    holds = value.value >= threshold if op == ">=" else value.value <= threshold
    if not value.bound:
        return "pass" if holds else "FAIL"
    if value.bound == op:  # the true value is even further on the good side of the bound
        return "pass" if holds else "unknown"
    return "unknown" if holds else "FAIL"


def evaluate_targets(results: dict, ratios: list[dict[str, Any]], passes: dict) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        if target.metric in ("step_passes", "overhead_passes"):
            found = results.get(("torchdkm", target.variant, target.size, target.bits, target.dim))
            measure = step_passes if target.metric == "step_passes" else overhead_passes
            value = measure(found, results, passes) if found else Bounded(None)
        else:
            match = [
                r
                for r in ratios
                if (r["size"], r["bits"], r["dim"], r["variant"])
                == (target.size, target.bits, target.dim, target.variant)
            ]
            value = match[0][target.metric] if match else Bounded(None)
        rows.append({"target": target, "value": value, "verdict": verdict(value, target.op, target.threshold)})
    return rows


# -- formatting ------------------------------------------------------------------


def _prefix(b: Bounded) -> str:
    return {"": "", ">=": "≥", "<=": "≤"}[b.bound]


def fmt_seconds(b: Bounded) -> str:
    if b.value is None:
        return "-"
    v = b.value
    if v < 1e-3:
        text = f"{v * 1e6:.1f} µs"
    elif v < 1:
        text = f"{v * 1e3:.{2 if v < 0.01 else 1}f} ms"
    else:
        text = f"{v:.{2 if v < 100 else 0}f} s"
    return _prefix(b) + text


def fmt_bytes(b: Bounded) -> str:
    return "-" if b.value is None else f"{_prefix(b)}{b.value / 2**20:.1f} MiB"


def fmt_float(b: Bounded, spec: str = ".3e", suffix: str = "") -> str:
    return "-" if b.value is None else f"{_prefix(b)}{b.value:{spec}}{suffix}"


RESULT_HEADERS = [
    "library",
    "variant",
    "size",
    "bits",
    "dim",
    "first step",
    "prepare",
    "step (median)",
    "step/pass",
    "(step-plain)/pass",
    "peak RSS Δ",
    "alloc peak Δ",
    "alloc step Δ",
    "MSE",
    "k-means MSE",
    "status",
]


def result_row(result: dict[str, Any], results: dict, passes: dict) -> list[str]:
    case = result["case"]
    plain = case["library"] == "none"
    status = result.get("status", "?")
    if status == "timeout":
        status = f"timeout ({result.get('timeout_s', 0):.0f} s)"
    return [
        case["library"],
        case["variant"],
        case["size"],
        "-" if plain else str(case["bits"]),
        "-" if plain else str(case["dim"]),
        fmt_seconds(metric(result, "first_step_s")),
        fmt_seconds(metric(result, "prepare_s")),
        fmt_seconds(metric(result, "step_s")),
        fmt_float(step_passes(result, results, passes), ".1f"),
        fmt_float(overhead_passes(result, results, passes), ".1f"),
        fmt_bytes(metric(result, "rss_peak_bytes")),
        fmt_bytes(metric(result, "alloc_peak_bytes")),
        fmt_bytes(metric(result, "alloc_step_peak_bytes")),
        fmt_float(metric(result, "mse")),
        fmt_float(metric(result, "kmeans_mse")),
        status,
    ]


RATIO_HEADERS = [
    "size",
    "bits",
    "dim",
    "torchdkm",
    "step: cml/tdkm",
    "first: cml/tdkm",
    "RSS: tdkm/cml",
    "alloc: tdkm/cml",
    "MSE: tdkm/cml",
]


def ratio_row(row: dict[str, Any]) -> list[str]:
    return [
        row["size"],
        str(row["bits"]),
        str(row["dim"]),
        row["variant"],
        fmt_float(row["step_speedup"], ".1f", "x"),
        fmt_float(row["first_speedup"], ".1f", "x"),
        fmt_float(row["rss_ratio"], ".3f"),
        fmt_float(row["alloc_ratio"], ".3f"),
        fmt_float(row["mse_ratio"], ".3f"),
    ]


PASS_HEADERS = ["size", "dtype", "weights", "one pass (w * 1.0)", "read+write GB/s"]


def pass_row(entry: dict[str, Any]) -> list[str]:
    seconds = float(entry["pass_s"])
    return [
        entry["size"],
        entry["dtype"],
        f"{entry['numel']:,}",
        fmt_seconds(Bounded(seconds)),
        f"{2 * entry['bytes'] / seconds / 1e9:.1f}",
    ]


TARGET_HEADERS = ["target", "config", "measured", "goal", "result"]


def target_row(row: dict[str, Any]) -> list[str]:
    t: Target = row["target"]
    spec = ".1f" if "speedup" in t.metric or "passes" in t.metric else ".3f"
    unit = "x" if "speedup" in t.metric else ""
    config = f"{t.size} {t.bits}-bit dim {t.dim} ({t.variant})"
    return [t.name, config, fmt_float(row["value"], spec, unit), f"{t.op} {t.threshold:.3g}{unit}", row["verdict"]]


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def tables(report: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(title, headers, rows)`` of every table, in print order."""
    results = sorted(report["results"].values(), key=sort_key)
    passes = report["passes"]
    pass_entries = sorted(passes.values(), key=lambda e: (e["numel"], e["dtype"]))
    return [
        (
            "Elementwise pass over the weight (the memory-bandwidth floor)",
            PASS_HEADERS,
            [pass_row(e) for e in pass_entries],
        ),
        ("Per configuration", RESULT_HEADERS, [result_row(r, report["results"], passes) for r in results]),
        ("Ratios (cml = coremltools, tdkm = torchdkm)", RATIO_HEADERS, [ratio_row(r) for r in report["ratios"]]),
        ("Targets", TARGET_HEADERS, [target_row(r) for r in report["targets"]]),
    ]


def render_text(report: dict[str, Any]) -> str:
    return "\n\n".join(f"{title}\n{text_table(h, rows)}" for title, h, rows in tables(report))


def jsonable(value: Any) -> Any:
    """Ratios, targets and bounds as plain JSON data."""
    if isinstance(value, Bounded):
        return {"value": value.value, "bound": value.bound}
    if isinstance(value, Target):
        return {k: getattr(value, k) for k in value.__dataclass_fields__}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


METHOD_NOTES = """\
How each number is measured (details: `bench/_dkm_worker.py`):

- Every row runs in a fresh subprocess (`python -m bench._dkm_worker`), so process-wide peaks belong to that row.
- The layer is `nn.Sequential(nn.Linear(in, out))`, weights ~N(0, 0.02) (same seed for every row), batch of 8 rows,
  loss = MSE to the original layer's output, `torch.optim.SGD(lr=1e-2)`.
- **first step**: `prepare` + building the optimizer + one training step. torchdkm runs its k-means
  initialisation in `prepare` (shown separately as **prepare**); coremltools runs it inside the first forward.
- **step**: median of the timed steps after the first (`zero_grad`, forward, backward, `optimizer.step()`,
  and `palettizer.step()` for coremltools).
- **step/pass**: the step time divided by one elementwise pass `w * 1.0` over the weight of the same size and dtype
  (median of 50), measured in the parent process.  Library `none` rows train the plain layer (no clustering): the
  harness's own floor (Linear forward/backward on the batch + SGD over the weight); their MSE is 0 because their
  output is the target (zero loss, zero gradient), which costs the same arithmetic.
  **(step-plain)/pass**: what clustering adds to that floor, in passes.  The bf16 rows measure it in their own
  process (`paired_*` in the JSON): after the steps above, their step and the plain layer's step take turns for as
  many timed steps (turns of 5 untimed and 5 timed steps, so each finds its data as in a run of steady steps; no
  sampler thread running), and one pass is timed there too; the column shows the median over turns of
  (median step - median plain step) / that pass.  From two rows instead, two processes minutes apart on this shared host
  (the same 4M bf16 step took 14.2 ms in one run, 19.5 ms in the next) moved this number by more than its margin.
- **peak RSS Δ**: `getrusage(RUSAGE_SELF).ru_maxrss` after the last step minus the RSS just before `prepare`
  (after imports, model, batch and target exist).  Exact high-water mark; includes freed pages the allocator kept.
- **alloc peak Δ**: largest glibc live-heap size (`mallinfo2()`: `uordblks + hblkhd`, all arenas) seen by a thread
  sampling every ~1 ms during prepare and all steps, minus the same baseline; sampled, so allocations living
  < ~1 ms can be missed.  **alloc step Δ**: the same over the steady steps only.
- **MSE**: mean squared difference (float64) between the finalized dense weight (torchdkm: `finalize(model)[0].weight`,
  decoded from packed indices + LUT; coremltools: `palettizer.finalize()[0].weight`) and the weight before training.
  **k-means MSE** (torchdkm rows): post-training `torchdkm.kmeans_compress` on the same weight, no training.
- Both libraries run the same DKM iteration cap, and coremltools' absolute `palett_tau` is matched to torchdkm's
  temperature at initialisation (`tau x` k-means distortion), unless the run says otherwise; per-row settings are in
  the JSON (`case`).  coremltools: `granularity="per_tensor"`, `enable_per_channel_scale=False`, `lut_dtype="f32"`
  (9.0's replacement for the deprecated `cluster_dtype`), `weight_threshold=0`, other options at their defaults
  (k-means++ init with `kmeans_n_init=10`).  For dim 2 coremltools forms vectors along the output-channel axis,
  torchdkm along the input axis (same statistics for i.i.d. weights).
- A coremltools run killed at `--timeout` is reported as `timeout`; the time it had spent in the unfinished phase
  is a lower bound (≥), and so is the largest RSS the parent saw (polled every 50 ms).  Ratios carry those bounds,
  and a target a bound cannot settle is `unknown`.
- Timings are wall-clock on a shared machine: the load average before/after each row is in the JSON.
"""


def _run_line(run: dict[str, Any]) -> str:
    """One run's command, time, load and the torchdkm code it measured."""
    code = f"git HEAD {(run.get('git_head') or '?')[:12]} + working tree, torchdkm sources sha256 "
    code += str(run.get("torchdkm_source_sha256", "?"))
    load = f"load average {run.get('load_before', 0):.2f} -> {run.get('load_after', 0):.2f}"
    return f"- Command: `{run['command']}` (run {run['id']}, {load}; {code})"


def render_markdown(built: dict[str, Any], machine: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    """The markdown report: provenance, the four tables and how each number is measured."""
    threads = sorted({str(r.get("threads", "?")) for r in built["results"].values()})
    lines = ["# DKM training step: torchdkm vs coremltools `DKMPalettizer`", ""]
    lines += [_run_line(run) for run in runs]
    lines += [
        f"- Machine: {machine['nproc']} CPUs (nproc), {machine['cpu']}, {machine['memory']} RAM, {machine['platform']}",
        f"- Versions: Python {machine['python']}, torch {machine['torch']} (torch threads used by the rows: "
        f"{', '.join(threads)}), coremltools {machine['coremltools']}, torchdkm {machine['torchdkm']}",
        "",
    ]
    for title, headers, rows in tables(built):
        lines += [f"## {title}", "", markdown_table(headers, rows), ""]
    lines += ["## How it is measured", "", METHOD_NOTES]
    return "\n".join(lines)

"""Benchmark one DKM training step: torchdkm vs coremltools 9.0 ``DKMPalettizer`` on one ``nn.Linear``.

    python -m bench.dkm_step                      # everything (coremltools at 4M takes hours)
    python -m bench.dkm_step --sizes 256K 1M --bits 4 --only coremltools --timeout 900
    python -m bench.dkm_step --sizes 4M --only torchdkm

For every (library, size, bits, dim) a fresh subprocess (``bench._dkm_worker``,
whose docstring says exactly how each number is taken) measures the first step
(prepare + first training step), the median step, the peak RSS and the
allocator peak over the baseline, and the weight MSE after finalize.  A
reference row per size trains the plain layer (library ``none``): its step is
the harness's own floor (Linear forward/backward, SGD).  torchdkm
also runs with ``cluster_dtype="exact"`` and with bfloat16 weights (the 16-bit
uniquified mode) at dim 1.  Both libraries get the same iteration cap
(``--iters``, coremltools' default 3) and the same absolute temperature:
torchdkm's ``tau`` is relative to the layer's margin (mean gap between the
squared distances to the second-nearest and the nearest centroid), so
coremltools' ``palett_tau`` is set to torchdkm's absolute temperature at
init, ``tau x margin`` of the same weight (``--cml-tau matched``).

Results merge into ``bench/results/dkm_step.json`` (a rerun replaces only the
rows it measures; ``--fresh`` starts over) and ``bench/results/dkm_step.md``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bench import _dkm_report as report
from bench._dkm_worker import (
    BF16_VARIANTS,
    LIBRARIES,
    PASS_REPS,
    REFERENCE,
    VARIANTS,
    Case,
    make_weight,
    time_pass,
)
from torchdkm import LayerConfig
from torchdkm._source import source_digest
from torchdkm.cluster import WeightClusterer

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
SIZE_ALIASES = {"256K": (512, 512), "1M": (1024, 1024), "4M": (2048, 2048)}
#: coremltools 9.0 defaults (palettization_config.DEFAULT_PALETTIZATION_ADVANCED_OPTIONS).
CML_DEFAULT_TAU = 1e-4
CML_DEFAULT_ITERS = 3
TORCHDKM_DEFAULT_TAU = LayerConfig().tau
RSS_POLL_S = 0.05


# -- command line ------------------------------------------------------------------


def parse_size(text: str) -> tuple[str, int, int]:
    """``"1M"``, ``"4K"``, ``"4096"`` (square) or ``"OUTxIN"`` -> ``(label, out, in)``."""
    label = text.strip()
    if label.upper() in SIZE_ALIASES:
        return (label.upper(), *SIZE_ALIASES[label.upper()])
    if "x" in label.lower():
        out, inp = (int(p) for p in label.lower().split("x"))
        return label, out, inp
    scale = {"K": 2**10, "M": 2**20}.get(label[-1].upper(), 1)
    numel = int(label[:-1] if scale > 1 else label) * scale
    side = math.isqrt(numel)
    if side * side != numel:
        raise ValueError(f"size {text!r} is not a square number of weights; use OUTxIN")
    return label, side, side


def _listed(values: list[str]) -> list[str]:
    return [v for value in values for v in value.split(",") if v]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.dkm_step", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", nargs="+", default=["256K", "1M", "4M"], help="256K, 1M, 4M, 4K, 64x64...")
    p.add_argument("--bits", nargs="+", default=["2", "4"])
    p.add_argument("--dims", nargs="+", default=["1", "2"])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="torchdkm rows (exact, bf16, bf16-torch: dim 1 only)")
    p.add_argument("--only", choices=LIBRARIES, help="run one library only")
    p.add_argument("--steps", type=int, default=20, help="timed steps after the first (torchdkm, plain)")
    p.add_argument("--cml-steps", type=int, default=3, help="timed steps after the first (coremltools)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess before it is killed")
    p.add_argument("--iters", type=int, default=CML_DEFAULT_ITERS, help="DKM iteration cap, both libraries")
    p.add_argument("--tau", type=float, default=TORCHDKM_DEFAULT_TAU, help="torchdkm tau (relative)")
    p.add_argument("--cml-tau", default="matched", help="'matched', 'default' (1e-4) or an absolute value")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--fresh", action="store_true", help="discard earlier results instead of merging")
    p.add_argument("--report-only", action="store_true", help="measure nothing: re-render the stored results")
    args = p.parse_args(argv)
    try:
        args.sizes = [parse_size(s) for s in _listed(args.sizes)]
        args.bits = [int(b) for b in _listed(args.bits)]
        args.dims = [int(d) for d in _listed(args.dims)]
    except ValueError as err:
        p.error(str(err))
    args.variants = _listed(args.variants)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(shlex.quote(a) for a in ["python", "-m", "bench.dkm_step", *given])
    return args


# -- stored results ------------------------------------------------------------------


class ResultStore:
    """Results, elementwise passes and run descriptions, merged across invocations."""

    def __init__(self, path: Path):
        self.path = path
        self.results: dict[tuple, dict[str, Any]] = {}
        self.passes: dict[tuple[str, str], dict[str, Any]] = {}
        self.runs: dict[str, dict[str, Any]] = {}

    @classmethod
    def load(cls, path: Path, fresh: bool) -> ResultStore:
        store = cls(path)
        if fresh or not path.exists():
            return store
        data = json.loads(path.read_text())
        store.results = {report.result_key(r): r for r in data.get("results", [])}
        store.passes = {(e["size"], e["dtype"]): e for e in data.get("passes", [])}
        store.runs = {r["id"]: r for r in data.get("runs", [])}
        return store

    def put(self, result: dict[str, Any]) -> None:
        self.results[report.result_key(result)] = result

    def referenced_runs(self) -> list[dict[str, Any]]:
        used = {r.get("run") for r in self.results.values()} | {e.get("run") for e in self.passes.values()}
        return [run for run_id, run in sorted(self.runs.items()) if run_id in used]


def machine_info() -> dict[str, Any]:
    """nproc, CPU model, memory and library versions of this machine."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in _read_lines("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor() or platform.machine(),
    )
    kib = next((line.split()[1] for line in _read_lines("/proc/meminfo") if line.startswith("MemTotal")), None)
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory": f"{int(kib) / 2**20:.1f} GiB" if kib else "?",
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "coremltools": _version("coremltools"),
        "torchdkm": _version("torchdkm"),
        "psutil": _version("psutil"),
    }


def _git_head() -> str | None:
    """The checked-out commit (read-only ``git rev-parse``); the tree may hold uncommitted edits."""
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def _read_lines(path: str) -> list[str]:
    try:
        return Path(path).read_text().splitlines()
    except OSError:
        return []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- the elementwise floor -------------------------------------------------------------


def measure_passes(args: argparse.Namespace, store: ResultStore, run_id: str) -> None:
    dtypes = ["float32"] + (
        ["bfloat16"] if wants_bf16(args) and args.only != "coremltools" else []
    )
    for label, out, inp in args.sizes:
        for dtype in dtypes:
            torch_dtype = getattr(torch, dtype)
            seconds = time_pass(out, inp, torch_dtype)
            bytes_ = out * inp * torch.empty((), dtype=torch_dtype).element_size()
            store.passes[(label, dtype)] = {
                "size": label,
                "dtype": dtype,
                "numel": out * inp,
                "bytes": bytes_,
                "pass_s": seconds,
                "reps": PASS_REPS,
                "run": run_id,
            }
            print(f"pass  {label:>6} {dtype:<8}  {seconds * 1e3:8.3f} ms", flush=True)


# -- one subprocess per case -------------------------------------------------------------


def child_rss(pid: int) -> int:
    """RSS of process ``pid`` in bytes; 0 once it has exited."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # exited, or no /proc (macOS): ask psutil
        pass
    try:
        import psutil
    except ImportError:
        return 0
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


def wait_watching_rss(proc: subprocess.Popen, timeout: float) -> tuple[bool, int]:
    """Wait for ``proc`` up to ``timeout`` s while tracking its RSS; kill it at the timeout.

    Returns ``(finished, largest RSS seen)``.
    """
    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        try:
            proc.wait(timeout=RSS_POLL_S)
            return True, seen
        except subprocess.TimeoutExpired:
            seen = max(seen, child_rss(proc.pid))
        if time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            return False, seen


def run_case(case: Case, timeout: float, run_id: str) -> dict[str, Any]:
    """Measure ``case`` in a fresh ``python -m bench._dkm_worker`` process."""
    with tempfile.TemporaryDirectory(prefix="dkm_step_") as tmp:
        path, log_path = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, "-m", "bench._dkm_worker", case.to_json(), str(path)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        load_before, start = os.getloadavg()[0], time.time()
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            finished, rss_seen = wait_watching_rss(proc, timeout)
        ended = time.time()
        result = json.loads(path.read_text()) if path.exists() else {"case": asdict(case)}
        log_tail = log_path.read_text()[-2000:]
    result.update(run=run_id, wall_s=ended - start, load_before=load_before, load_after=os.getloadavg()[0])
    if not finished:
        mark_timeout(result, timeout, ended, rss_seen)
    elif proc.returncode != 0 or result.get("status") != "ok":
        result.update(status="error", returncode=proc.returncode, error=log_tail)
    return result


def mark_timeout(result: dict[str, Any], timeout: float, killed_at: float, rss_seen: int) -> None:
    """Turn the partial result of a killed run into honest lower bounds."""
    result.update(status="timeout", timeout_s=timeout)
    bounds = result.setdefault("lower_bounds", [])
    if "first_step_s" not in result and "first_step_started_at" in result:
        result["first_step_s"] = killed_at - result["first_step_started_at"]
        bounds.append("first_step_s")
    elif "step_s" not in result and "steps_started_at" in result:
        result["step_s"] = killed_at - result["steps_started_at"]
        bounds.append("step_s")
    if "rss_peak_bytes" not in result and "baseline_rss_bytes" in result and rss_seen:
        result["rss_peak_bytes"] = rss_seen - result["baseline_rss_bytes"]
        bounds.append("rss_peak_bytes")


def describe(result: dict[str, Any]) -> str:
    """One progress line."""
    case = result["case"]
    config = "plain layer" if case["library"] == REFERENCE else f"{case['bits']}b dim{case['dim']}"
    name = f"{case['library']:<11} {case['variant']:<7} {case['size']:>6} {config:<11}"
    first = report.fmt_seconds(report.metric(result, "first_step_s"))
    step = report.fmt_seconds(report.metric(result, "step_s"))
    rss = report.fmt_bytes(report.metric(result, "rss_peak_bytes"))
    mse = report.fmt_float(report.metric(result, "mse"))
    status = f"[{result['status']}, {result['wall_s']:.0f} s]"
    return f"{name}  first {first:>9}  step {step:>9}  RSS Δ {rss:>11}  MSE {mse}  {status}"


# -- the plan --------------------------------------------------------------------------------


def make_case(args: argparse.Namespace, library: str, variant: str, size: tuple, bits: int, dim: int, **fields) -> Case:
    """A :class:`Case` with this run's settings; ``fields`` override them."""
    settings = {"steps": args.steps, "iters": args.iters, "tau": args.tau, "threads": args.threads, **fields}
    return Case(library, variant, *size, bits=bits, dim=dim, **settings)


def wants_bf16(args: argparse.Namespace) -> bool:
    return bool(set(args.variants) & set(BF16_VARIANTS)) and 1 in args.dims


def reference_cases(args: argparse.Namespace, size: tuple[str, int, int]) -> list[Case]:
    """The plain layer's training step (no clustering), in every dtype the torchdkm rows use."""
    variants = ["default"] + (["bf16"] if wants_bf16(args) else [])
    return [make_case(args, REFERENCE, v, size, 0, 0, iters=0, tau=0.0) for v in variants]


def torchdkm_cases(args: argparse.Namespace, size: tuple[str, int, int], bits: int, dim: int) -> list[Case]:
    """The default row, plus ``exact`` and the bfloat16 rows at dim 1."""
    variants = [v for v in args.variants if v == "default" or dim == 1]
    return [
        make_case(args, "torchdkm", v, size, bits, dim, paired=args.steps if v in BF16_VARIANTS else 0)
        for v in variants
    ]


def coremltools_tau(args: argparse.Namespace, store: ResultStore, size: tuple, bits: int, dim: int) -> float:
    """coremltools' absolute ``palett_tau``: ``--cml-tau``, or matched to torchdkm's temperature at init."""
    if args.cml_tau == "default":
        return CML_DEFAULT_TAU
    if args.cml_tau != "matched":
        return float(args.cml_tau)
    probe = make_case(args, "torchdkm", "default", size, bits, dim)
    weight = make_weight(probe)
    layer = LayerConfig(bits=bits, dim=dim, tau=args.tau, cluster_dtype="exact", min_numel=0)
    clusterer = WeightClusterer("bench", layer, weight.shape)
    return float(clusterer.temperature(weight, clusterer.init(weight)).mean())


def coremltools_case(args: argparse.Namespace, store: ResultStore, size: tuple, bits: int, dim: int) -> Case:
    tau = coremltools_tau(args, store, size, bits, dim)
    return make_case(args, "coremltools", "default", size, bits, dim, steps=args.cml_steps, tau=tau)


def run_and_store(case: Case, args: argparse.Namespace, store: ResultStore, run_id: str) -> None:
    store.put(run_case(case, args.timeout, run_id))
    print(describe(store.results[case.key]), flush=True)


def run_grid(args: argparse.Namespace, store: ResultStore, run_id: str) -> None:
    for size in args.sizes:
        for case in [] if args.only == "coremltools" else reference_cases(args, size):
            run_and_store(case, args, store, run_id)
        for bits in args.bits:
            for dim in args.dims:
                for case in [] if args.only == "coremltools" else torchdkm_cases(args, size, bits, dim):
                    run_and_store(case, args, store, run_id)
                if args.only != "torchdkm":
                    run_and_store(coremltools_case(args, store, size, bits, dim), args, store, run_id)


# -- output --------------------------------------------------------------------------------------


def build_report(store: ResultStore) -> dict[str, Any]:
    ratios = report.compute_ratios(store.results)
    return {
        "results": store.results,
        "passes": store.passes,
        "ratios": ratios,
        "targets": report.evaluate_targets(store.results, ratios, store.passes),
    }


def write_outputs(store: ResultStore, built: dict[str, Any], machine: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = store.referenced_runs()
    data = {
        "machine": machine,
        "runs": runs,
        "passes": sorted(store.passes.values(), key=lambda e: (e["numel"], e["dtype"])),
        "results": sorted(store.results.values(), key=report.sort_key),
        "ratios": report.jsonable(built["ratios"]),
        "targets": report.jsonable(built["targets"]),
    }
    (out_dir / "dkm_step.json").write_text(json.dumps(data, indent=1) + "\n")
    (out_dir / "dkm_step.md").write_text(report.render_markdown(built, machine, runs))


def measure(args: argparse.Namespace, store: ResultStore) -> None:
    """Time the elementwise passes, then every case of the grid, into ``store`` under a new run id."""
    run_id = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    store.runs[run_id] = {
        "id": run_id,
        "command": args.command,
        "load_before": os.getloadavg()[0],
        "git_head": _git_head(),
        "torchdkm_source_sha256": source_digest(ROOT / "torchdkm")  # (this checkout's sources, whatever is installed),
    }
    measure_passes(args, store, run_id)
    run_grid(args, store, run_id)
    store.runs[run_id]["load_after"] = os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    store = ResultStore.load(args.out_dir / "dkm_step.json", args.fresh)
    if not args.report_only:
        measure(args, store)
    built = build_report(store)
    machine = machine_info()
    print("\n" + report.render_text(built))
    write_outputs(store, built, machine, args.out_dir)
    print(f"\nwrote {args.out_dir / 'dkm_step.json'} and {args.out_dir / 'dkm_step.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

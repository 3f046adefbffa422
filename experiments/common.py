"""What every experiment shares: the training loop, result records, summaries, tables and plots.

A :class:`Record` is one (method, setting, seed) measurement; experiments
append records to a :class:`Results`, which writes ``results/<name>.json``
(every record plus the run's environment) and ``results/<name>.md`` (mean and
spread over seeds).  Plots use matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import torchdkm
from torchdkm._source import source_digest

RESULTS = Path("results")


@dataclass
class Record:
    """One measured model: its quality, its size and what it cost to make."""

    method: str
    setting: str
    seed: int
    metrics: dict[str, float]
    bytes: int
    fp32_bytes: int
    bits_per_weight: float  # index (or integer code) bits per compressed weight; 32 for fp32
    steps: int = 0  # training steps the method ran
    seconds: float = 0.0  # wall time of the method (prepare + training + finalize)
    note: str = ""

    @property
    def factor(self) -> float:
        return self.fp32_bytes / self.bytes


@dataclass
class Results:
    """Records of one experiment and where they go."""

    name: str
    config: dict[str, Any]
    records: list[Record] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    #: captured when the run starts: the code that ran, not what the checkout holds when it ends
    environment: dict[str, Any] = field(default_factory=lambda: environment())

    def add(self, record: Record) -> Record:
        self.records.append(record)
        return record

    @classmethod
    def load(cls, path: Path) -> Results:
        """The records :meth:`write` saved (the environment is that of the run that wrote them)."""
        saved = json.loads(path.read_text())
        records = [Record(**{k: v for k, v in r.items() if k != "factor"}) for r in saved["records"]]
        return cls(saved["experiment"], saved["config"], records, environment=saved["environment"])

    def summary(self, metric: str) -> list[dict[str, Any]]:
        """Mean, spread (sample std; 0 with one seed) and min/max of ``metric`` per (method, setting)."""
        groups: dict[tuple[str, str], list[Record]] = {}
        for r in self.records:
            if metric in r.metrics:
                groups.setdefault((r.method, r.setting), []).append(r)
        rows = []
        for (method, setting), recs in groups.items():
            values = [r.metrics[metric] for r in recs]
            rows.append(
                {
                    "method": method,
                    "setting": setting,
                    "n": len(values),
                    "mean": statistics.fmean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "min": min(values),
                    "max": max(values),
                    "bytes": recs[0].bytes,
                    "factor": recs[0].factor,
                    "bits_per_weight": recs[0].bits_per_weight,
                    "steps": max(r.steps for r in recs),
                    "seconds": statistics.fmean(r.seconds for r in recs),
                    "note": "; ".join(sorted({r.note for r in recs if r.note})),
                }
            )
        return rows

    def _environment_at_end(self) -> dict[str, Any]:
        """The environment at the start, flagging torchdkm sources edited while the run went on."""
        now = source_digest()
        if now == self.environment["torchdkm_source_sha256"]:
            return self.environment
        return {**self.environment, "torchdkm_source_sha256_at_end": now}

    def write(self, directory: Path = RESULTS) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        payload = {
            "experiment": self.name,
            "config": self.config,
            "environment": self._environment_at_end(),
            "wall_seconds": time.time() - self.started,
            "records": [{**asdict(r), "factor": r.factor} for r in self.records],
        }
        path.write_text(json.dumps(payload, indent=1) + "\n")
        return path


def environment() -> dict[str, Any]:
    """What made the numbers: versions, threads, machine, commit."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torchdkm_source_sha256": source_digest(),
        "torchdkm_path": str(Path(torchdkm.__file__).parent),
        "torch": torch.__version__,
        "torchdkm": torchdkm.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "git": commit,
    }


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)


def fit(
    model: nn.Module,
    batches: Callable[[torch.Generator], Iterable[Any]],
    loss_fn: Callable[[nn.Module, Any], Tensor],
    *,
    epochs: int,
    steps_per_epoch: int,
    lr: float,
    seed: int,
    desc: str,
    after_step: Callable[[], None] | None = None,
    max_steps: int | None = None,
    deadline: float | None = None,
    progress: bool = True,
    train_mode: Callable[[nn.Module], None] | None = None,
) -> int:
    """AdamW with a cosine decay to 0 over the whole budget; returns the steps actually taken.

    The same loop trains fp32 models, DKM, coremltools' DKM (``after_step`` is
    its ``step()``) and quantization-aware training, so their budgets match.
    ``deadline`` (a ``time.monotonic`` value) stops early, for a method too
    slow to finish the budget; the caller reports how far it got.  The decay
    to 0 matters for DKM: the last steps let weights settle on their clusters.
    """
    budget = epochs * steps_per_epoch if max_steps is None else min(max_steps, epochs * steps_per_epoch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # AdamW defaults to 0.01; no decay here
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(budget, 1))
    generator = torch.Generator().manual_seed(seed)
    step = 0
    bar = tqdm(total=budget, desc=desc, unit="step", disable=not progress, dynamic_ncols=True, leave=False)
    with bar:
        while step < budget:
            for batch in batches(generator):
                (train_mode or nn.Module.train)(model)
                loss = loss_fn(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                if after_step is not None:
                    after_step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
                if step >= budget or (deadline is not None and time.monotonic() > deadline):
                    model.eval()
                    return step
    model.eval()
    return step


def minibatches(n: int, batch_size: int) -> Callable[[torch.Generator], Iterator[Tensor]]:
    """Shuffled index batches over ``n`` examples, one epoch per call."""

    def epoch(generator: torch.Generator) -> Iterator[Tensor]:
        yield from torch.randperm(n, generator=generator).split(batch_size)

    return epoch


def fmt_mean(row: dict[str, Any], scale: float = 100.0, digits: int = 2) -> str:
    if row["n"] == 1:
        return f"{scale * row['mean']:.{digits}f}"
    return f"{scale * row['mean']:.{digits}f} ± {scale * row['std']:.{digits}f}"


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


def plot_tradeoff(rows: list[dict[str, Any]], path: Path, *, title: str, ylabel: str, scale: float = 100.0) -> Path:
    """Quality against model size, one curve per method, error bars = spread over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        methods.setdefault(row["method"], []).append(row)
    markers = iter("os^Dvx*P<>h")
    for method, points in methods.items():
        points.sort(key=lambda r: r["bytes"])
        ax.errorbar(
            [p["bytes"] / 1e3 for p in points],
            [scale * p["mean"] for p in points],
            yerr=[scale * p["std"] for p in points],
            marker=next(markers, "o"),
            capsize=3,
            label=method,
            linestyle="-" if len(points) > 1 else "none",
        )
    ax.set_xscale("log")
    ax.set_xlabel("model size (KB, log scale): indices + LUTs/scales + uncompressed tensors")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_histograms(before: Tensor, after: Tensor, centroids: Tensor, path: Path, *, title: str) -> Path:
    """One layer's weights before compression and after DKM + finalize, with the centroids marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    bins = 120
    axes[0].hist(before.float().reshape(-1).numpy(), bins=bins, color="tab:gray")
    axes[0].set_title("before: fp32 weights", fontsize=10)
    axes[1].hist(after.float().reshape(-1).numpy(), bins=bins, color="tab:blue", label="weights after DKM")
    values = sorted(set(centroids.float().reshape(-1).tolist()))
    for ax in axes:
        ax.vlines(values, 0, 1, transform=ax.get_xaxis_transform(), colors="tab:red", lw=0.8, alpha=0.7)
        ax.set_xlabel("weight value")
    axes[1].set_title(f"after: snapped to {len(values)} centroid values (red)", fontsize=10)
    axes[0].set_ylabel("count")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_capped(target: Callable[..., None], args: tuple, cap: float) -> tuple[bool, int | None]:
    """Run ``target(*args)`` in a spawned child process killed after ``cap`` seconds: ``(killed, exit code)``.

    coremltools' runs go here: their loops stop only between steps, and one step can outlast any budget.
    """
    process = multiprocessing.get_context("spawn").Process(target=target, args=args)
    process.start()
    process.join(cap)
    killed = process.is_alive()
    if killed:
        process.kill()
        process.join()
    return killed, process.exitcode


def run_spread(
    target: Callable[..., None], jobs: Sequence[tuple], workers: int, on_exit: Callable[[int, int | None], None] | None = None
) -> list[int | None]:
    """``target(*args)`` for every ``args`` of ``jobs``, each in a spawned (non-daemon) process, at most
    ``workers`` at once, started in order as others end: their exit codes (``on_exit(i, code)`` as each ends).

    Why processes of one thread each and not one process on every core: on 2 cores much of an experiment's
    work (small layers, per-layer Python) gains little from a second thread and much from a second process.
    """
    context = multiprocessing.get_context("spawn")
    pending, running = list(enumerate(jobs)), {}
    codes: list[int | None] = [None] * len(jobs)
    while pending or running:
        while pending and len(running) < workers:
            index, args = pending.pop(0)
            process = context.Process(target=target, args=args)
            process.start()
            running[process.sentinel] = (index, process)
        for sentinel in multiprocessing.connection.wait(list(running)):
            index, process = running.pop(sentinel)
            process.join()
            codes[index] = process.exitcode
            if on_exit is not None:
                on_exit(index, process.exitcode)
    return codes


def options_dict(opts: Any) -> dict[str, Any]:
    """An experiment's options dataclass as a results file's config (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()}


def log_line(text: str) -> None:
    tqdm.write(text)


def pivot_table(rows: list[dict[str, Any]], methods: Sequence[str], settings: Sequence[str], label: str) -> str:
    """One line per setting, one column per method: ``mean ± std (factor)``; "-" where a method has no run."""
    cells = {(r["method"], r["setting"]): r for r in rows}
    head = ("setting", "bits/weight", *methods)
    lines = []
    for setting in settings:
        present = [cells[(m, setting)] for m in methods if (m, setting) in cells]
        if not present:
            continue
        row = [setting, f"{present[0]['bits_per_weight']:.3g}"]
        for method in methods:
            cell = cells.get((method, setting))
            row.append("-" if cell is None else f"{fmt_mean(cell)} ({cell['factor']:.1f}x)")
        lines.append(row)
    return f"{label}\n\n" + markdown_table(head, lines)


def experiment_parser(doc: str, tiny_help: str) -> argparse.ArgumentParser:
    """The options every experiment has: --tiny, --seeds, --out, --no-progress."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help=f"{tiny_help} (what the tests run)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run_from_cli(options: Any, args: argparse.Namespace, run: Callable[[Any], Any], **changes: Any) -> int:
    """Build the options (``options.tiny`` for --tiny), run, print the wall time."""
    changes = {"out": args.out, "progress": not args.no_progress, **changes}
    if args.seeds:
        changes["seeds"] = tuple(args.seeds)
    opts = options.tiny(**changes) if args.tiny else options(**changes)
    start = time.perf_counter()
    run(opts)
    print(f"run time: {time.perf_counter() - start:.0f} s")
    return 0


def plan_summary(plan: Any) -> str:
    """How many layers of a ``torchdkm.SizePlan`` took each setting, in the shorthand: the plan in one line."""
    counts: dict[str, int] = {}
    for layer in plan.layers:
        cfg = layer.config
        block = "" if cfg.scale_block is None else f"#{cfg.scale_block or 'row'}{'a' if cfg.scale_offset else ''}"
        group = "" if cfg.group_size is None else f"@{cfg.group_size}"
        key = f"{cfg.bits}/{cfg.dim}{group}{block}"
        counts[key] = counts.get(key, 0) + 1
    return "plan: " + ", ".join(f"{n} x {k}" for k, n in sorted(counts.items()))

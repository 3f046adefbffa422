"""Per-step DKM overhead on a small CNN: torchdkm vs coremltools 9.0 ``DKMPalettizer``, side by side in one process.

    python -m bench.small_cnn                     # the full run (about 2.5 minutes on 2 cores)
    python -m bench.small_cnn --quick             # a tiny run (seconds): batch 32, 2 rounds of 1 + 1 steps
    python -m bench.small_cnn --only torchdkm     # leave coremltools out
    python -m bench.small_cnn --profile 2/1       # where torchdkm's per-step overhead goes, at one setting

The model (:class:`SmallCNN`): seven convolutions and one linear classifier, eight weight tensors of
288 to 15,680 weights (89k in all), ReLU after each convolution, on a batch of 128 random 1x28x28
images (Fashion-MNIST-sized, seeded) with random labels out of 10, cross-entropy loss, SGD with
momentum.  The rows, every one a copy of the same initial model with its own optimizer:

* ``plain``: the fp32 training step, nothing clustered;
* ``torchdkm`` at ``cv:2/1`` and ``cv:4/4`` (``"cv:B/D, fc:B/D"``, ``min_numel=0``): all eight
  weights clustered, checked with ``torchdkm.report`` (the run stops if one stays dense);
* ``coremltools`` ``DKMPalettizer`` at ``n_bits=2, cluster_dim=1`` and ``n_bits=4, cluster_dim=4``,
  ``weight_threshold=0`` (it palettizes weights with *more* elements than the threshold), one
  per-tensor float32 LUT like torchdkm's, ``palettizer.step()`` after each optimizer step.  With
  ``cluster_dim > 1`` coremltools skips a weight whose output channels are not divisible by
  ``cluster_dim`` (``sanitize_palettization_cluster_dim``): the classifier's 10 outputs at 4/4.  The
  run asserts that it palettized exactly the weights this rule allows, records the warning it logged,
  and adds a row ``torchdkm`` on the same seven weights (classifier dense) so the two can also be
  compared layer for layer.

Both libraries get the same DKM iteration cap (``--iters``, coremltools' default 3) and their own
default temperature (torchdkm's relative ``tau``, coremltools' absolute ``palett_tau`` 1e-4, or
``--cml-tau``).

How the overhead is measured: after two untimed steps per row (k-means initialisation: torchdkm in
``prepare``, coremltools at its first forward), the rows take turns, ``--rounds`` rounds, each row
per round running ``--warm`` untimed steps and then ``--timed`` timed ones (their median is the
row's time in that round; the order of the rows rotates from round to round).  A row's overhead is
the median over rounds of (its time - the plain row's time in the same round), so both halves of
each difference saw the same machine.  Ratios torchdkm / coremltools are quoted per setting; the
target is a ratio of at most 0.5.  Results go to ``bench/results/small_cnn.{json,md}`` (and the
profile's to ``small_cnn_profile_B_D.{json,md}``).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import pstats
import shlex
import statistics
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import torchdkm
from torchdkm._source import source_digest

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
#: (name, in channels, out channels, kernel, stride); padding ``kernel // 2``.  28x28 -> 14x14 -> 7x7.
CONVS = (
    ("conv1", 1, 32, 3, 1),  # 288 weights, 28x28
    ("conv2", 32, 32, 3, 2),  # 9,216, -> 14x14
    ("conv3", 32, 48, 3, 2),  # 13,824, -> 7x7
    ("conv4", 48, 48, 1, 1),  # 2,304
    ("conv5", 48, 36, 3, 1),  # 15,552
    ("conv6", 36, 48, 3, 1),  # 15,552
    ("conv7", 48, 32, 1, 1),  # 1,536
)
IMAGE = (1, 28, 28)
CLASSES = 10
CLASSIFIER = "classifier"  # Linear(32 * 7 * 7, 10): 15,680 weights
SETTINGS = ("2/1", "4/4")
TARGET_RATIO = 0.5
LEARNING_RATE = 1e-2
MOMENTUM = 0.9
#: coremltools 9.0 defaults (palettization_config.DEFAULT_PALETTIZATION_ADVANCED_OPTIONS).
CML_DEFAULT_TAU = 1e-4
CML_DEFAULT_ITERS = 3
#: The full run and ``--quick``: batch, rounds, untimed and timed steps per turn.
FULL = {"batch": 128, "rounds": 15, "warm": 4, "timed": 4}
QUICK = {"batch": 32, "rounds": 2, "warm": 1, "timed": 1}
#: Untimed steps of every row before the rounds (k-means initialisation, first-touch allocations).
FIRST_STEPS = 2
CML_LOGGER = "coremltools.optimize.torch"


# -- the model and the data ---------------------------------------------------------------


class SmallCNN(nn.Module):
    """Seven convolutions (ReLU after each) and a linear classifier: eight weights of 288 to 15,680 values."""

    def __init__(self) -> None:
        super().__init__()
        size = IMAGE[1]
        for name, cin, cout, kernel, stride in CONVS:
            setattr(self, name, nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2))
            size = (size + 2 * (kernel // 2) - kernel) // stride + 1
        self.classifier = nn.Linear(CONVS[-1][2] * size * size, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        for name, *_ in CONVS:
            x = torch.relu(getattr(self, name)(x))
        return self.classifier(x.flatten(1))


def weight_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The eight modules with a weight, by name, in model order."""
    return {name: getattr(model, name) for name in [c[0] for c in CONVS] + [CLASSIFIER]}


def layer_table() -> list[dict[str, Any]]:
    """Name, weight shape and size of every weight of :class:`SmallCNN`."""
    model = SmallCNN()
    return [
        {"name": name, "shape": list(module.weight.shape), "numel": module.weight.numel()}
        for name, module in weight_modules(model).items()
    ]


def build_model(seed: int) -> nn.Module:
    """A fresh :class:`SmallCNN`, the same initial weights for every ``seed``."""
    torch.manual_seed(seed)
    return SmallCNN()


def make_batch(batch: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random images ~N(0, 1) and labels, deterministic in ``seed``."""
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *IMAGE, generator=generator)
    y = torch.randint(0, CLASSES, (batch,), generator=generator)
    return x, y


def make_step(model: nn.Module, x: Tensor, y: Tensor, after: Callable[[], None] | None = None) -> Callable[[], None]:
    """One training step: zero_grad, forward, cross-entropy, backward, SGD (+ ``after``, coremltools' step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        if after is not None:
            after()

    return step


# -- the rows -------------------------------------------------------------------------------


@dataclass
class Row:
    """One model in the race: a library at a setting, the weights it clusters, its training step."""

    library: str  # "plain", "torchdkm" or "coremltools"
    setting: str  # "-" or "B/D"
    label: str
    clustered: list[str]
    step: Callable[[], None] = field(repr=False)
    skipped: dict[str, str] = field(default_factory=dict)  # weight left dense -> why
    note: str = ""
    alone: bool = False  # torchdkm with every layer stepping alone (``prepare(batch_numel=0)``)
    first_steps_s: list[float] = field(default_factory=list)
    times_s: list[float] = field(default_factory=list)  # this row's median per round
    cpu_times_s: list[float] = field(default_factory=list)  # the same in the process's CPU time


def bits_dim(setting: str) -> tuple[int, int]:
    bits, dim = (int(v) for v in setting.split("/"))
    return bits, dim


def torchdkm_config(setting: str, iters: int, dense: tuple[str, ...] = ()) -> torchdkm.DKMConfig:
    """``cv:B/D, fc:B/D`` with ``min_numel=0`` (nothing too small to cluster), the names in ``dense`` left out."""
    rules = ", ".join([f"cv:{setting}", f"fc:{setting}", *(f"{name}:none" for name in dense)])
    return torchdkm.DKMConfig.parse(rules, min_numel=0, max_iters=iters)


def torchdkm_clustered(model: nn.Module) -> list[str]:
    """The modules whose weight torchdkm clusters, from ``torchdkm.report`` (``conv1.weight`` -> ``conv1``)."""
    layers = torchdkm.report(model, gap=False, show=False).layers
    return [row.name.rsplit(".", 1)[0] for row in layers]


def torchdkm_row(
    setting: str,
    args: argparse.Namespace,
    x: Tensor,
    y: Tensor,
    dense: tuple[str, ...] = (),
    label: str = "",
    alone: bool = False,
) -> Row:
    alone_kw = {"batch_numel": 0} if alone else {}  # (else prepare's default: small layers step together)
    model = torchdkm.prepare(build_model(args.seed), torchdkm_config(setting, args.iters, dense), **alone_kw)
    clustered = torchdkm_clustered(model)
    expected = [name for name in weight_modules(model) if name not in dense]
    if clustered != expected:
        raise RuntimeError(f"torchdkm {setting}: clustered {clustered}, expected {expected}")
    skipped = {name: "left dense to match coremltools" for name in dense}
    return Row("torchdkm", setting, label or f"torchdkm {setting}", clustered, make_step(model, x, y), skipped, alone=alone)


def coremltools_skips(setting: str) -> dict[str, str]:
    """The weights coremltools 9.0 leaves dense at ``setting``: output channels not divisible by ``cluster_dim``."""
    _, dim = bits_dim(setting)
    model = SmallCNN()
    return {
        name: f"{module.weight.shape[0]} output channels, not divisible by cluster_dim={dim}"
        for name, module in weight_modules(model).items()
        if dim > 1 and module.weight.shape[0] % dim
    }


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def captured_coremltools_warnings() -> Iterator[list[str]]:
    """coremltools' own warnings (its logger does not propagate), collected instead of printed."""
    logger = logging.getLogger(CML_LOGGER)
    handler, saved = _Captured(), logger.handlers[:]
    logger.handlers = [handler]
    try:
        yield handler.messages
    finally:
        logger.handlers = saved


def import_coremltools() -> Any:
    with warnings.catch_warnings(), open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        warnings.simplefilter("ignore")  # (its import warns about untested torch / scikit-learn versions)
        from coremltools.optimize.torch import palettization
    return palettization


def coremltools_active(module: nn.Module) -> bool:
    """Whether coremltools palettizes this module's weight from the first step on (fake palettization enabled)."""
    fake = getattr(module, "weight_fake_quant", None)
    return fake is not None and int(fake.fake_palett_enabled[0]) == 1


def coremltools_row(setting: str, args: argparse.Namespace, x: Tensor, y: Tensor) -> Row:
    cml = import_coremltools()
    bits, dim = bits_dim(setting)
    module_config = cml.ModuleDKMPalettizerConfig(
        n_bits=bits,
        cluster_dim=dim,
        weight_threshold=0,
        granularity="per_tensor",
        enable_per_channel_scale=False,
        kmeans_max_iter=args.iters,
        palett_tau=float(args.cml_tau),
        lut_dtype="f32",
    )
    model = build_model(args.seed)
    palettizer = cml.DKMPalettizer(model, cml.DKMPalettizerConfig(global_config=module_config))
    with captured_coremltools_warnings() as messages:
        model = palettizer.prepare(inplace=True)
    clustered = [name for name, module in weight_modules(model).items() if coremltools_active(module)]
    skipped = coremltools_skips(setting)
    expected = [name for name in weight_modules(model) if name not in skipped]
    if clustered != expected:
        raise RuntimeError(f"coremltools {setting}: palettized {clustered}, expected {expected} (warnings: {messages})")
    note = "; ".join(messages)
    label = f"coremltools {bits}b dim{dim}"
    return Row("coremltools", setting, label, clustered, make_step(model, x, y, palettizer.step), skipped, note)


def build_rows(args: argparse.Namespace, x: Tensor, y: Tensor) -> list[Row]:
    plain = build_model(args.seed)
    rows = [Row("plain", "-", "plain fp32", [], make_step(plain, x, y))]
    for setting in args.settings:
        if args.only != "coremltools":
            rows.append(torchdkm_row(setting, args, x, y))
            rows.append(torchdkm_row(setting, args, x, y, label=f"torchdkm {setting}, each layer alone", alone=True))
        if args.only != "torchdkm":
            cml = coremltools_row(setting, args, x, y)
            if cml.skipped and args.only != "coremltools":
                dense = tuple(cml.skipped)
                rows.append(torchdkm_row(setting, args, x, y, dense, f"torchdkm {setting}, same layers as coremltools"))
            rows.append(cml)
    return rows


# -- timing -----------------------------------------------------------------------------------


def timed_turn(step: Callable[[], None], warm: int, timed: int) -> tuple[float, float]:
    """``warm`` untimed steps, then the medians of ``timed`` timed ones: wall-clock and CPU seconds.

    With one torch thread the process's CPU time is the step's work without the time this shared
    machine gives to other tenants, which wall-clock time includes.
    """
    for _ in range(warm):
        step()
    wall, cpu = [], []
    for _ in range(timed):
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def race(rows: list[Row], rounds: int, warm: int, timed: int, progress: bool = True) -> None:
    """First steps of every row, then ``rounds`` rounds of one turn per row (order rotating); into ``row.times_s``."""
    for row in rows:
        for _ in range(FIRST_STEPS):
            start = time.perf_counter()
            row.step()
            row.first_steps_s.append(time.perf_counter() - start)
    for r in range(rounds):
        for i in range(len(rows)):
            row = rows[(i + r) % len(rows)]
            wall, cpu = timed_turn(row.step, warm, timed)
            row.times_s.append(wall)
            row.cpu_times_s.append(cpu)
        if progress:
            done = ", ".join(f"{row.label} {1e3 * row.times_s[-1]:.1f}" for row in rows)
            print(f"round {r + 1}/{rounds} (ms): {done}", flush=True)


def summarize(rows: list[Row]) -> list[dict[str, Any]]:
    """Per row: median step, the plain step, and the median over rounds of the difference (with its range)."""
    plain, plain_cpu = rows[0].times_s, rows[0].cpu_times_s
    out = []
    for row in rows:
        diffs = [mine - base for mine, base in zip(row.times_s, plain)]
        overhead = statistics.median(diffs) if row.library != "plain" else None
        cpu_diffs = [mine - base for mine, base in zip(row.cpu_times_s, plain_cpu)]
        cpu_overhead = statistics.median(cpu_diffs) if row.library != "plain" and cpu_diffs else None
        n = len(row.clustered)
        out.append(
            {
                "library": row.library,
                "setting": row.setting,
                "label": row.label,
                "layers_clustered": n,
                "clustered": row.clustered,
                "skipped": row.skipped,
                "note": row.note,
                "alone": row.alone,
                "first_steps_s": row.first_steps_s,
                "round_step_s": row.times_s,
                "step_s": statistics.median(row.times_s),
                "plain_s": statistics.median(plain),
                "overhead_s": overhead,
                "overhead_range_s": [min(diffs), max(diffs)] if overhead is not None else None,
                "overhead_per_layer_s": overhead / n if overhead is not None and n else None,
                "round_cpu_s": row.cpu_times_s,
                "cpu_overhead_s": cpu_overhead,
                "cpu_overhead_range_s": [min(cpu_diffs), max(cpu_diffs)] if cpu_overhead is not None else None,
            }
        )
    return out


def compare(results: list[dict[str, Any]], settings: list[str]) -> list[dict[str, Any]]:
    """Per setting: torchdkm's overhead / coremltools'; the target on the row where both cluster the same weights.

    That is torchdkm's all-8-weights row when coremltools clusters all 8; where coremltools leaves a
    weight dense (the classifier at 4/4), the torchdkm row on coremltools' layers, and the all-8 row
    (more work for torchdkm) is shown beside it without a target.
    """
    out = []
    for setting in settings:
        rows = [r for r in results if r["setting"] == setting]
        cml = next((r for r in rows if r["library"] == "coremltools"), None)
        mine = [r for r in rows if r["library"] == "torchdkm"]
        if cml is None or not mine:
            continue
        same = any(r["skipped"] for r in mine)  # a row on coremltools' layers exists
        for tdkm in mine:
            primary = not tdkm["alone"] and bool(tdkm["skipped"]) == same
            ratio = tdkm["overhead_s"] / cml["overhead_s"] if cml["overhead_s"] > 0 else None
            cpu = tdkm["cpu_overhead_s"], cml["cpu_overhead_s"]
            cpu_ratio = cpu[0] / cpu[1] if cpu[0] is not None and cpu[1] is not None and cpu[1] > 0 else None
            basis = "coremltools' layers" if tdkm["skipped"] else "all 8 weights"
            out.append(
                {
                    "setting": setting,
                    "basis": basis + (", each layer alone" if tdkm["alone"] else ""),
                    "torchdkm_layers": tdkm["layers_clustered"],
                    "coremltools_layers": cml["layers_clustered"],
                    "torchdkm_overhead_s": tdkm["overhead_s"],
                    "coremltools_overhead_s": cml["overhead_s"],
                    "ratio": ratio,
                    "target": f"<= {TARGET_RATIO}" if primary else None,
                    "passes": (ratio is not None and ratio <= TARGET_RATIO) if primary else None,
                    "torchdkm_cpu_overhead_s": cpu[0],
                    "coremltools_cpu_overhead_s": cpu[1],
                    "cpu_ratio": cpu_ratio,
                    "cpu_passes": (cpu_ratio is not None and cpu_ratio <= TARGET_RATIO) if primary else None,
                }
            )
    return out


# -- environment ---------------------------------------------------------------------------------


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def environment() -> dict[str, Any]:
    """Machine, versions, commit (and whether the torchdkm or bench sources differ from it) and source digest."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            cpu,
        )
    dirty = _git("status", "--porcelain", "--", "torchdkm", "bench", ":(exclude)bench/results")
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "coremltools": _version("coremltools"),
        "torchdkm": _version("torchdkm"),
        "git_head": _git("rev-parse", "HEAD"),
        "git_dirty": None if dirty is None else bool(dirty),
        "torchdkm_source_sha256": source_digest(ROOT / "torchdkm"),
    }


# -- output ---------------------------------------------------------------------------------------


def ms(seconds: float | None, spec: str = ".1f") -> str:
    return "-" if seconds is None else f"{seconds * 1e3:{spec}}"


def result_cells(r: dict[str, Any]) -> list[str]:
    low, high = r["overhead_range_s"] or (None, None)
    spread = "-" if low is None else f"{ms(low)} .. {ms(high)}"
    method = r["library"] + (" (coremltools' layers)" if r["library"] == "torchdkm" and r["skipped"] else "")
    return [
        method,
        r["setting"],
        f"{r['layers_clustered']}/8" if r["library"] != "plain" else "-",
        ms(r["step_s"]),
        ms(r["plain_s"]),
        ms(r["overhead_s"]),
        spread,
        ms(r["overhead_per_layer_s"], ".2f"),
    ]


RESULT_HEAD = ["method", "setting", "layers", "step ms", "plain ms", "overhead ms", "overhead range ms", "ms / layer"]
RATIO_HEAD = [
    "setting", "basis", "torchdkm overhead ms", "coremltools overhead ms", "ratio", "target <= 0.5",
    "CPU: torchdkm ms", "CPU: coremltools ms", "CPU ratio", "CPU target <= 0.5",
]


def ratio_cells(c: dict[str, Any]) -> list[str]:
    def shown(ratio: float | None) -> str:
        return "n/a (coremltools overhead <= 0)" if ratio is None else f"{ratio:.2f}"

    def verdict(passes: bool | None) -> str:
        return "-" if passes is None else ("pass" if passes else "FAIL")

    basis = f"{c['basis']} ({c['torchdkm_layers']} vs {c['coremltools_layers']})"
    wall = [ms(c["torchdkm_overhead_s"]), ms(c["coremltools_overhead_s"]), shown(c["ratio"]), verdict(c["passes"])]
    cpu = [ms(c.get("torchdkm_cpu_overhead_s")), ms(c.get("coremltools_cpu_overhead_s"))]
    cpu += [shown(c.get("cpu_ratio")), verdict(c.get("cpu_passes"))]
    return [c["setting"], basis, *wall, *cpu]


def text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(c) for c in col) for col in zip(head, *rows)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]
    )


def skip_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        for name, why in r["skipped"].items():
            lines.append(f"{r['label']}: {name} left dense ({why})")
        if r["note"]:
            lines.append(f"{r['label']}: coremltools logged: {r['note']}")
    return lines


def render_markdown(report: dict[str, Any]) -> str:
    env, cfg = report["environment"], report["config"]
    head = (env["git_head"] or "?")[:12] + (" + uncommitted changes" if env["git_dirty"] else "")
    layers = ", ".join(
        f"{layer['name']} {'x'.join(map(str, layer['shape']))} ({layer['numel']:,})" for layer in report["model"]
    )
    lines = [
        "# Per-step DKM overhead on a small CNN: torchdkm vs coremltools `DKMPalettizer`",
        "",
        f"- Command: `{report['command']}` (run {report['date']}, {report['wall_s']:.0f} s, load average "
        f"{report['load'][0]:.2f} -> {report['load'][1]:.2f}; git HEAD {head}, torchdkm sources sha256 "
        f"{env['torchdkm_source_sha256']})",
        f"- Machine: {env['nproc']} CPUs, {env['cpu']}; Python {env['python']}, torch {env['torch']} "
        f"({env['torch_threads']} thread), coremltools {env['coremltools']}, torchdkm {env['torchdkm']}",
        f"- Model: {layers}; ReLU after each conv; input {cfg['batch']} x 1x28x28 (random, seed {cfg['seed']}), "
        f"cross-entropy over 10 classes, SGD (lr {LEARNING_RATE}, momentum {MOMENTUM})",
        f"- DKM: iteration cap {cfg['iters']} for both; torchdkm `tau` {cfg['torchdkm_tau']} (relative to each "
        f"layer's margin), coremltools `palett_tau` {cfg['cml_tau']} (absolute), one LUT per tensor",
        f"- Timing: {cfg['rounds']} rounds; per round every row runs {cfg['warm']} untimed + {cfg['timed']} timed "
        "steps (their median), rows in rotating order; overhead = median over rounds of (row - plain in the same "
        "round), its range over rounds beside it; the same in the process's CPU time (one torch thread: the "
        "work, without the time this shared machine gives to other tenants)",
        "",
        markdown_table(RESULT_HEAD, [result_cells(r) for r in report["results"]]),
        "",
        markdown_table(RATIO_HEAD, [ratio_cells(c) for c in report["comparisons"]]),
        "",
    ]
    lines += [f"- {line}" for line in skip_lines(report["results"])]
    return "\n".join(lines).rstrip() + "\n"


def print_tables(report: dict[str, Any]) -> None:
    print()
    print(text_table(RESULT_HEAD, [result_cells(r) for r in report["results"]]))
    if report["comparisons"]:
        print()
        print(text_table(RATIO_HEAD, [ratio_cells(c) for c in report["comparisons"]]))
    for line in skip_lines(report["results"]):
        print(line)


# -- the profile --------------------------------------------------------------------------------------


def phase_times(model: nn.Module, x: Tensor, y: Tensor, steps: int) -> dict[str, float]:
    """Median forward / backward / optimizer step / whole step over ``steps`` steps (after 2 untimed)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    samples: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for i in range(steps + 2):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(model(x), y)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        optimizer.step()
        t3 = time.perf_counter()
        if i >= 2:
            for key, value in zip(samples, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
                samples[key].append(value)
    return {key: statistics.median(values) for key, values in samples.items()}


def per_layer_times(model: nn.Module, reps: int) -> list[dict[str, Any]]:
    """Each clustered weight alone: reading ``module.weight`` (the DKM forward) and backpropagating a fixed gradient."""
    out = []
    for name, module in weight_modules(model).items():
        generator = torch.Generator().manual_seed(0)
        grad = torch.randn(module.weight.shape, generator=generator)
        forward, backward = [], []
        for _ in range(reps + 2):
            t0 = time.perf_counter()
            weight = module.weight
            t1 = time.perf_counter()
            weight.backward(grad)
            t2 = time.perf_counter()
            forward.append(t1 - t0)
            backward.append(t2 - t1)
        model.zero_grad(set_to_none=True)
        out.append(
            {
                "name": name,
                "numel": module.weight.numel(),
                "forward_s": statistics.median(forward[2:]),
                "backward_s": statistics.median(backward[2:]),
            }
        )
    return out


def aten_ops(step: Callable[[], None], steps: int) -> Counter:
    """Calls per step of every ``aten::`` op (nested ones counted too) under ``torch.profiler``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    counts: Counter = Counter()
    for event in prof.key_averages():
        if event.key.startswith("aten::"):
            counts[event.key] = event.count / steps
    return counts


class _OpCounter(TorchDispatchMode):
    """Counts every op dispatched below autograd, by phase and by the innermost torchdkm function on the stack."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame = sys._getframe(1)
        while frame is not None and f"{os.sep}torchdkm{os.sep}" not in frame.f_code.co_filename:
            frame = frame.f_back
        where = "(outside torchdkm: the model, loss, optimizer)"
        if frame is not None:
            where = _where((frame.f_code.co_filename, frame.f_code.co_firstlineno, frame.f_code.co_name))
        self.counts[(self.phase, where)] += 1
        return func(*args, **(kwargs or {}))


def dispatched_ops(model: nn.Module, x: Tensor, y: Tensor) -> Counter:
    """``(phase, function) -> ops`` of one training step (after one untimed step), phases forward/backward/optimizer."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
    counter = _OpCounter()
    for counting in (False, True):
        with counter if counting else contextlib.nullcontext():
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(model(x), y)
            counter.phase = "backward"
            loss.backward()
            counter.phase = "optimizer"
            optimizer.step()
            counter.phase = "forward"
    return counter.counts


def op_floor(reps: int = 20000) -> float:
    """Seconds per tiny eager op (``a.add(b)`` on 16 floats): the fixed cost every dispatched op pays here."""
    a, b = torch.ones(16), torch.ones(16)
    for _ in range(1000):
        a.add(b)
    start = time.perf_counter()
    for _ in range(reps):
        a.add(b)
    return (time.perf_counter() - start) / reps


def python_profile(step: Callable[[], None], steps: int) -> pstats.Stats:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    return pstats.Stats(profiler)


def _where(key: tuple[str, int, str]) -> str:
    path, line, name = key
    if path == "~":
        return name
    package = Path(path)
    for anchor in ("torchdkm", "torch"):
        if anchor in package.parts:
            index = len(package.parts) - 1 - package.parts[::-1].index(anchor)
            return f"{'/'.join(package.parts[index:])}:{line} {name}"
    return f"{package.name}:{line} {name}"


def python_summary(stats: pstats.Stats, steps: int, layers: int, top: int) -> dict[str, Any]:
    """Calls per step (all, and in torchdkm's files), and the top torchdkm functions by cumulative and own time."""
    table = stats.stats  # type: ignore[attr-defined]
    ours = {key: value for key, value in table.items() if f"{os.sep}torchdkm{os.sep}" in key[0]}
    total_calls = sum(value[1] for value in table.values())
    torchdkm_calls = sum(value[1] for value in ours.values())

    def entry(key: tuple, value: tuple) -> dict[str, Any]:
        primitive, calls, own, cumulative, _ = value
        return {
            "function": _where(key),
            "calls_per_step": calls / steps,
            "own_ms_per_step": 1e3 * own / steps,
            "cumulative_ms_per_step": 1e3 * cumulative / steps,
        }

    by_cumulative = sorted(ours.items(), key=lambda kv: -kv[1][3])[:top]
    by_own = sorted(table.items(), key=lambda kv: -kv[1][2])[:top]
    return {
        "calls_per_step": total_calls / steps,
        "torchdkm_calls_per_step": torchdkm_calls / steps,
        "torchdkm_calls_per_layer_step": torchdkm_calls / steps / layers,
        "top_torchdkm_cumulative": [entry(k, v) for k, v in by_cumulative],
        "top_own_time": [entry(k, v) for k, v in by_own],
    }


def profile_setting(args: argparse.Namespace) -> dict[str, Any]:
    """Where torchdkm's overhead goes at ``args.profile``: phases, per layer, aten ops and Python calls."""
    setting = args.profile
    x, y = make_batch(args.batch, args.seed)
    plain = build_model(args.seed)
    model = torchdkm.prepare(build_model(args.seed), torchdkm_config(setting, args.iters))
    clustered = torchdkm_clustered(model)
    if len(clustered) != len(CONVS) + 1:
        raise RuntimeError(f"torchdkm {setting}: clustered {clustered}, expected all 8 weights")
    steps = args.profile_steps
    print(f"profiling torchdkm {setting} against the plain step: batch {args.batch}, {steps} steps each", flush=True)
    phases = {"plain": phase_times(plain, x, y, steps), "torchdkm": phase_times(model, x, y, steps)}
    alone = torchdkm.prepare(build_model(args.seed), torchdkm_config(setting, args.iters), batch_numel=0)
    layers = per_layer_times(alone, steps)
    together = per_layer_times(model, steps)[0]  # reading one weight runs the step of all eight
    plain_step, dkm_step = make_step(plain, x, y), make_step(model, x, y)
    ops = {"plain": aten_ops(plain_step, min(steps, 3)), "torchdkm": aten_ops(dkm_step, min(steps, 3))}
    added_ops = Counter({k: ops["torchdkm"][k] - ops["plain"].get(k, 0) for k in ops["torchdkm"]})
    plain_ops, dkm_ops = dispatched_ops(plain, x, y), dispatched_ops(model, x, y)
    by_phase = {
        name: {
            phase: sum(v for (ph, _), v in counts.items() if ph == phase)
            for phase in ("forward", "backward", "optimizer")
        }
        for name, counts in (("plain", plain_ops), ("torchdkm", dkm_ops))
    }
    by_function: Counter = Counter()
    for (_, where), count in dkm_ops.items():
        if not where.startswith("(outside"):
            by_function[where] += count
    floor = op_floor()
    py = {
        "plain": python_summary(python_profile(plain_step, steps), steps, 1, args.top),
        "torchdkm": python_summary(python_profile(dkm_step, steps), steps, len(clustered), args.top),
    }
    return {
        "setting": setting,
        "batch": args.batch,
        "steps": steps,
        "iters": args.iters,
        "phases": phases,
        "layers": layers,
        "together": {"forward_s": together["forward_s"], "backward_s": together["backward_s"]},
        "aten_ops_per_step": {name: sum(counter.values()) for name, counter in ops.items()},
        "aten_ops_added_per_layer": sum(added_ops.values()) / len(clustered),
        "top_added_aten_ops": [{"op": k, "per_step": v} for k, v in added_ops.most_common(args.top)],
        "dispatched_ops": by_phase,
        "dispatched_ops_added_per_layer": (sum(by_phase["torchdkm"].values()) - sum(by_phase["plain"].values()))
        / len(clustered),
        "top_dispatching_functions": [{"function": k, "per_step": v} for k, v in by_function.most_common(args.top)],
        "op_floor_s": floor,
        "python": py,
    }


def render_profile(p: dict[str, Any]) -> str:
    ph, py = p["phases"], p["python"]
    lines = [
        f"## torchdkm {p['setting']}: where the per-step overhead goes (batch {p['batch']}, {p['steps']} steps, "
        f"iteration cap {p['iters']})",
        "",
        "| phase | plain ms | torchdkm ms | added ms |",
        "|---|---|---|---|",
    ]
    for phase in ("forward", "backward", "optimizer", "step"):
        added = ph["torchdkm"][phase] - ph["plain"][phase]
        lines.append(
            f"| {phase} | {ms(ph['plain'][phase], '.2f')} | {ms(ph['torchdkm'][phase], '.2f')} | {ms(added, '.2f')} |"
        )
    lines += [
        "",
        "Each clustered weight stepping alone (`prepare(batch_numel=0)`; `module.weight`: the DKM forward; "
        "`weight.backward(g)`: its backward), and all eight in the one step they share by default:",
        "",
        "| layer | weights | DKM forward ms | DKM backward ms |",
        "|---|---|---|---|",
    ]
    for layer in p["layers"]:
        lines.append(
            f"| {layer['name']} | {layer['numel']:,} | {ms(layer['forward_s'], '.3f')} | {ms(layer['backward_s'], '.3f')} |"
        )
    fwd = sum(layer["forward_s"] for layer in p["layers"])
    bwd = sum(layer["backward_s"] for layer in p["layers"])
    together = p["together"]
    lines += [
        f"| all 8, each alone | | {ms(fwd, '.2f')} | {ms(bwd, '.2f')} |",
        f"| all 8, one shared step | | {ms(together['forward_s'], '.2f')} | {ms(together['backward_s'], '.2f')} |",
        "",
        "- ops dispatched per step below autograd (a `TorchDispatchMode`; forward / backward / optimizer): plain "
        + " / ".join(str(p["dispatched_ops"]["plain"][k]) for k in ("forward", "backward", "optimizer"))
        + ", torchdkm "
        + " / ".join(str(p["dispatched_ops"]["torchdkm"][k]) for k in ("forward", "backward", "optimizer"))
        + f": {p['dispatched_ops_added_per_layer']:.0f} more per clustered layer; one tiny op (`a.add(b)`, 16 floats) "
        f"takes {p['op_floor_s'] * 1e6:.1f} µs here, so the added ops alone cost at least "
        f"{ms(p['op_floor_s'] * p['dispatched_ops_added_per_layer'] * len(p['layers']), '.1f')} ms per step",
        f"- aten ops per step (torch.profiler, nested ops counted): plain {p['aten_ops_per_step']['plain']:.0f}, "
        f"torchdkm {p['aten_ops_per_step']['torchdkm']:.0f}: {p['aten_ops_added_per_layer']:.0f} more per clustered layer",
        f"- Python function calls per step (cProfile): plain {py['plain']['calls_per_step']:.0f}, torchdkm "
        f"{py['torchdkm']['calls_per_step']:.0f}; in torchdkm's own files {py['torchdkm']['torchdkm_calls_per_step']:.0f} "
        f"({py['torchdkm']['torchdkm_calls_per_layer_step']:.0f} per layer per step)",
        "",
        "Most frequent aten ops torchdkm adds (per step, all 8 layers):",
        "",
        "| op | calls per step |",
        "|---|---|",
        *(f"| `{o['op']}` | {o['per_step']:.0f} |" for o in p["top_added_aten_ops"]),
        "",
        "torchdkm functions issuing the most ops (innermost torchdkm frame of each dispatched op; per step, all 8 layers):",
        "",
        "| function | ops per step |",
        "|---|---|",
        *(f"| `{e['function']}` | {e['per_step']} |" for e in p["top_dispatching_functions"]),
        "",
        "torchdkm functions by cumulative time (under cProfile, which inflates Python-heavy code):",
        "",
        "| function | calls / step | cumulative ms / step | own ms / step |",
        "|---|---|---|---|",
        *(
            f"| `{e['function']}` | {e['calls_per_step']:.0f} | {e['cumulative_ms_per_step']:.2f} | {e['own_ms_per_step']:.2f} |"
            for e in py["torchdkm"]["top_torchdkm_cumulative"]
        ),
        "",
        "All functions of the torchdkm step by own time (torch's C functions included):",
        "",
        "| function | calls / step | own ms / step |",
        "|---|---|---|",
        *(
            f"| `{e['function']}` | {e['calls_per_step']:.0f} | {e['own_ms_per_step']:.2f} |"
            for e in py["torchdkm"]["top_own_time"]
        ),
    ]
    return "\n".join(lines) + "\n"


# -- command line ---------------------------------------------------------------------------------------


def parse_setting(text: str) -> str:
    text = text.removeprefix("cv:")
    try:
        bits, dim = bits_dim(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"setting {text!r}: expected BITS/DIM, as in 2/1 or cv:4/4") from None
    if not (1 <= bits <= 8 and dim >= 1):
        raise argparse.ArgumentTypeError(f"setting {text!r}: bits must be 1..8 and dim >= 1")
    return f"{bits}/{dim}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.small_cnn", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"tiny run: {QUICK}")
    p.add_argument("--batch", type=int, help=f"images per step (default {FULL['batch']})")
    p.add_argument("--rounds", type=int, help=f"rounds of turns (default {FULL['rounds']})")
    p.add_argument("--warm", type=int, help=f"untimed steps per turn (default {FULL['warm']})")
    p.add_argument("--timed", type=int, help=f"timed steps per turn (default {FULL['timed']})")
    p.add_argument("--settings", nargs="+", type=parse_setting, default=list(SETTINGS), help="BITS/DIM (cv:2/1 ...)")
    p.add_argument("--only", choices=("torchdkm", "coremltools"), help="leave the other library out")
    p.add_argument("--iters", type=int, default=CML_DEFAULT_ITERS, help="DKM iteration cap, both libraries")
    p.add_argument("--cml-tau", type=float, default=CML_DEFAULT_TAU, help="coremltools palett_tau (absolute)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR)
    p.add_argument("--profile", type=parse_setting, metavar="SETTING", help="profile torchdkm at SETTING instead")
    p.add_argument("--profile-steps", type=int, default=10, help="steps per profiled phase (--profile)")
    p.add_argument("--top", type=int, default=12, help="functions / ops listed by --profile")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.batch, args.rounds, args.timed) < 1 or args.warm < 0:
        p.error("--batch, --rounds and --timed must be >= 1, --warm >= 0")
    args.settings = list(dict.fromkeys(args.settings))
    given = sys.argv[1:] if argv is None else argv
    args.command = " ".join(shlex.quote(a) for a in ["python", "-m", "bench.small_cnn", *given])
    return args


def run_profile(args: argparse.Namespace) -> int:
    start, load = time.time(), [os.getloadavg()[0]]
    found = profile_setting(args)
    load.append(os.getloadavg()[0])
    text = render_profile(found)
    print("\n" + text)
    report = {
        "command": args.command,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_s": time.time() - start,
        "load": load,
        "environment": environment(),
        "profile": found,
    }
    env = report["environment"]
    head = (env["git_head"] or "?")[:12] + (" + uncommitted changes" if env["git_dirty"] else "")
    intro = (
        f"# Small CNN: torchdkm's per-step overhead at {found['setting']}, profiled\n\n- Command: `{args.command}` "
        f"(run {report['date']}, load average {load[0]:.2f} -> {load[1]:.2f}; git HEAD {head}, torchdkm sources "
        f"sha256 {env['torchdkm_source_sha256']}; torch threads {env['torch_threads']})\n\n"
    )
    stem = args.out_dir / f"small_cnn_profile_{found['setting'].replace('/', '_')}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    stem.with_suffix(".md").write_text(intro + text)
    print(f"wrote {stem}.json and {stem}.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.profile:
        return run_profile(args)
    start, load = time.time(), [os.getloadavg()[0]]
    x, y = make_batch(args.batch, args.seed)
    rows = build_rows(args, x, y)
    print(f"{len(rows)} rows: " + ", ".join(f"{row.label} ({len(row.clustered)} layers)" for row in rows), flush=True)
    race(rows, args.rounds, args.warm, args.timed)
    load.append(os.getloadavg()[0])
    results = summarize(rows)
    report = {
        "command": args.command,
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "wall_s": time.time() - start,
        "load": load,
        "environment": environment(),
        "config": {
            "batch": args.batch,
            "rounds": args.rounds,
            "warm": args.warm,
            "timed": args.timed,
            "first_steps": FIRST_STEPS,
            "iters": args.iters,
            "torchdkm_tau": torchdkm.LayerConfig().tau,
            "cml_tau": args.cml_tau,
            "seed": args.seed,
            "settings": args.settings,
            "only": args.only,
            "quick": args.quick,
        },
        "model": layer_table(),
        "results": results,
        "comparisons": compare(results, args.settings),
    }
    print_tables(report)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "small_cnn.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out_dir / "small_cnn.md").write_text(render_markdown(report))
    print(f"\nwrote {args.out_dir / 'small_cnn.json'} and {args.out_dir / 'small_cnn.md'} ({report['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

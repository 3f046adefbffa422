"""Child side of ``bench.dkm_step``: measure one DKM case in a fresh process.

Run as ``python -m bench._dkm_worker CASE_JSON RESULT_PATH``.  The parent starts
one such process per (library, variant, size, bits, dim), so the process-wide
high-water marks (``ru_maxrss``) belong to that case alone.  Partial results are
written to ``RESULT_PATH`` after every phase, so a run the parent kills at its
timeout still reports what it measured.

What one case measures (every time is ``time.perf_counter`` wall time):

* baseline: RSS and allocator bytes after the imports, model, batch and target
  exist, just before ``prepare``;
* first step: ``prepare`` (torchdkm initialises centroids by k-means here;
  coremltools only swaps modules and initialises at the first forward) +
  building the optimizer + one training step;
* step: median of ``case.steps`` further training steps.  A step is
  ``zero_grad`` + forward on a batch of ``case.batch`` rows + MSE loss against
  the original layer's output + backward + ``SGD.step`` (+ ``palettizer.step()``
  for coremltools).  torch's own one-time costs (the first optimizer imports
  ``torch._dynamo``) are paid before the baseline, see :func:`warm_up_torch`;
* peak RSS: ``getrusage(RUSAGE_SELF).ru_maxrss`` after the last step minus the
  baseline RSS (exact high-water mark of resident memory, freed-but-cached pages
  included);
* allocator peak: the largest live glibc heap size (``mallinfo2``: ``uordblks``
  + ``hblkhd``) seen by a thread sampling every ~1 ms, minus the baseline;
  sampled, so allocations that live less than a millisecond can be missed;
  ``alloc_step_peak_bytes`` is the same over the steady steps only;
* MSE: mean squared difference (float64) between the finalized layer's dense
  weight and the weight before training;
* paired steps (the bf16 rows, ``case.paired`` timed steps of each kind):
  after the peaks are recorded, this case's step and the plain layer's step
  (same weights, batch and loss, a second model in this process) take turns,
  the sampler stopped: each turn runs ``PAIRED_WARM`` untimed steps, then
  ``PAIRED_TIMED`` timed ones (so neither finds its data evicted by the
  other's, as in a run of steady steps); then one elementwise pass
  ``w * 1.0`` is timed here too.  What clustering adds is the median over
  rounds of (this step - the plain step), each the median of its turn's timed
  steps: both halves of a round see the same
  machine, whose speed drifts between processes minutes apart on a shared host
  (the same 4M bf16 step: 14.2 ms in one run, 19.5 ms in the next).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

#: Standard deviation of the benchmark weights (N(0, WEIGHT_STD)).
WEIGHT_STD = 0.02
LEARNING_RATE = 1e-2
LIBRARIES = ("torchdkm", "coremltools")
#: The reference rows: the same training step on the plain layer, no clustering (bits = dim = 0).
REFERENCE = "none"
#: torchdkm variants: "default" (fp32 weights, cluster_dtype="auto": uniquified in float16 for dim 1),
#: "exact" (cluster_dtype="exact"), "bf16" (bfloat16 weights, uniquified losslessly in bfloat16) and
#: "bf16-torch" (the same with TORCHDKM_NATIVE=0: the uniquified passes as torch ops, not native loops).
VARIANTS = ("default", "exact", "bf16", "bf16-torch")
#: The variants whose layer is in bfloat16.
BF16_VARIANTS = ("bf16", "bf16-torch")


@dataclass(frozen=True)
class Case:
    """One measurement: a library (and variant) clustering one ``nn.Linear``."""

    library: str
    variant: str
    size: str
    out_features: int
    in_features: int
    bits: int
    dim: int
    steps: int
    iters: int
    tau: float  # torchdkm: relative tau; coremltools: absolute palett_tau
    threads: int | None = None
    batch: int = 8
    seed: int = 0
    paired: int = 0  # timed steps of each kind in the paired phase (see the module docstring); 0: none

    @property
    def key(self) -> tuple[str, str, str, int, int]:
        return (self.library, self.variant, self.size, self.bits, self.dim)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.variant in BF16_VARIANTS else torch.float32

    @property
    def numel(self) -> int:
        return self.out_features * self.in_features

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Case:
        return cls(**json.loads(text))


# -- memory probes -------------------------------------------------------------


def current_rss() -> int:
    """Resident set size of this process in bytes."""
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except ImportError:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """High-water mark of this process's RSS in bytes (``ru_maxrss`` is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def mallinfo_reader() -> Any:
    """A function returning glibc's live heap bytes (``uordblks + hblkhd``), or ``None`` without glibc 2.33+."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []

    def live() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return live


class AllocatorSampler:
    """Tracks the peak of glibc's live heap bytes with a background thread sampling every ``interval`` s."""

    def __init__(self, interval: float = 1e-3):
        self.interval = interval
        self._read = mallinfo_reader()
        self.baseline = self.peak = self.window_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="alloc-sampler", daemon=True)

    @property
    def available(self) -> bool:
        return self._read is not None

    def sample(self) -> None:
        """Take one reading now (also called at phase boundaries)."""
        if self._read is None:
            return
        value = self._read()
        self.peak = max(self.peak, value)
        self.window_peak = max(self.window_peak, value)

    def start(self) -> None:
        if self._read is None:
            return
        self.baseline = self.peak = self.window_peak = self._read()
        self._thread.start()

    def new_window(self) -> None:
        """Start a new window for :attr:`window_peak` (the overall :attr:`peak` keeps running)."""
        if self._read is not None:
            self.window_peak = self._read()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self.sample()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


# -- the two libraries behind one interface ------------------------------------


class Palettizer(Protocol):
    """What the benchmark needs from a library."""

    def prepare(self, model: nn.Module) -> nn.Module: ...

    def after_step(self) -> None: ...

    def finalized_weight(self, model: nn.Module) -> Tensor: ...


class TorchdkmPalettizer:
    """torchdkm: ``prepare`` (k-means init), train, ``finalize`` (packed indices + LUT)."""

    def __init__(self, case: Case):
        import torchdkm

        self._torchdkm = torchdkm
        if case.variant == "bf16-torch":
            os.environ["TORCHDKM_NATIVE"] = "0"  # read at every call: set before the first step
        layer = torchdkm.LayerConfig(
            bits=case.bits,
            dim=case.dim,
            tau=case.tau,
            max_iters=case.iters,
            min_numel=0,
            cluster_dtype="exact" if case.variant == "exact" else "auto",
        )
        self.config = torchdkm.DKMConfig(default=layer)

    def prepare(self, model: nn.Module) -> nn.Module:
        return self._torchdkm.prepare(model, self.config)

    def after_step(self) -> None:
        pass

    def finalized_weight(self, model: nn.Module) -> Tensor:
        return self._torchdkm.finalize(model)[0].weight.detach()

    def kmeans_mse(self, original: Tensor) -> float:
        """MSE of post-training k-means (``torchdkm.kmeans_compress``, no training) on ``original``."""
        layer = nn.Linear(original.shape[1], original.shape[0], dtype=original.dtype)
        with torch.no_grad():
            layer.weight.copy_(original)
        model = self._torchdkm.kmeans_compress(nn.Sequential(layer), self.config)
        return mse(model[0].weight.detach(), original)


class CoremltoolsPalettizer:
    """coremltools 9 ``DKMPalettizer``: per-tensor LUT, no per-channel scale, float32 LUT."""

    def __init__(self, case: Case):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from coremltools.optimize.torch.palettization import (
                DKMPalettizer,
                DKMPalettizerConfig,
                ModuleDKMPalettizerConfig,
            )
        module = ModuleDKMPalettizerConfig(
            n_bits=case.bits,
            cluster_dim=case.dim,
            weight_threshold=0,
            granularity="per_tensor",
            enable_per_channel_scale=False,
            kmeans_max_iter=case.iters,
            palett_tau=float(case.tau),
            lut_dtype="f32",
        )
        self._cls = DKMPalettizer
        self.config = DKMPalettizerConfig(global_config=module)
        self.palettizer: Any = None

    def prepare(self, model: nn.Module) -> nn.Module:
        self.palettizer = self._cls(model, self.config)
        return self.palettizer.prepare(inplace=True)

    def after_step(self) -> None:
        self.palettizer.step()

    def finalized_weight(self, model: nn.Module) -> Tensor:
        return self.palettizer.finalize(inplace=True)[0].weight.detach()


class NoPalettizer:
    """The reference: train the plain layer (the harness's own cost: Linear forward/backward, SGD)."""

    def __init__(self, case: Case):
        pass

    def prepare(self, model: nn.Module) -> nn.Module:
        return model

    def after_step(self) -> None:
        pass

    def finalized_weight(self, model: nn.Module) -> Tensor:
        return model[0].weight.detach()


def make_palettizer(case: Case) -> Palettizer:
    if case.library == REFERENCE:
        return NoPalettizer(case)
    if case.library == "torchdkm":
        return TorchdkmPalettizer(case)
    if case.library == "coremltools":
        return CoremltoolsPalettizer(case)
    raise ValueError(f"unknown library {case.library!r}; expected one of {(*LIBRARIES, REFERENCE)}")


# -- the problem and the training step -----------------------------------------


def make_weight(case: Case) -> Tensor:
    """The benchmark weight ``(out, in)``, ~N(0, WEIGHT_STD), deterministic in ``case.seed``."""
    generator = torch.Generator().manual_seed(case.seed)
    weight = torch.randn(case.out_features, case.in_features, generator=generator) * WEIGHT_STD
    return weight.to(case.dtype)


def build_problem(case: Case) -> tuple[nn.Sequential, Tensor, Tensor, Tensor]:
    """``(model, batch, target, original weight)``: one Linear in a Sequential, its output as the target."""
    torch.manual_seed(case.seed)
    layer = nn.Linear(case.in_features, case.out_features, dtype=case.dtype)
    with torch.no_grad():
        layer.weight.copy_(make_weight(case))
    model = nn.Sequential(layer)
    x = torch.randn(case.batch, case.in_features, dtype=case.dtype)
    with torch.no_grad():
        target = model(x)
    return model, x, target, layer.weight.detach().clone()


def warm_up_torch() -> None:
    """Pay torch's one-time costs before the baseline, for either library alike.

    The first ``torch.optim`` optimizer built in a process imports ``torch._dynamo``
    (~800 modules, ~1 s, ~22 MiB live heap); the first backward starts autograd.
    """
    param = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([param], lr=LEARNING_RATE)
    (param * 2.0).sum().backward()
    optimizer.step()


def make_step(model: nn.Module, x: Tensor, target: Tensor, palettizer: Palettizer) -> Callable[[], None]:
    """One training step: forward, MSE loss to the original output, backward, SGD step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        optimizer.step()
        palettizer.after_step()

    return step


#: Paired steps come in turns of PAIRED_WARM untimed steps and PAIRED_TIMED timed ones (their median): a step
#: reaches its steady speed only after a few in a row over the same tensors.
PAIRED_WARM = 5
PAIRED_TIMED = 5
#: Timed repetitions of the elementwise pass.
PASS_REPS = 50


def time_pass(out_features: int, in_features: int, dtype: torch.dtype, reps: int = PASS_REPS) -> float:
    """Median time of ``w * 1.0`` (read the weight once, write a new tensor once)."""
    w = torch.randn(out_features, in_features).to(dtype)
    for _ in range(5):
        w * 1.0
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        w * 1.0
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def mse(weight: Tensor, original: Tensor) -> float:
    return float(((weight.double() - original.double()) ** 2).mean())


# -- one case, end to end ------------------------------------------------------


class Recorder:
    """The result dict of one case, flushed atomically to ``path`` after every update."""

    def __init__(self, case: Case, path: Path | None):
        self.path = path
        self.data: dict[str, Any] = {"case": asdict(case), "status": "running", "pid": os.getpid()}

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        if self.path is not None:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.data))
            os.replace(tmp, self.path)


def _start_baseline(rec: Recorder) -> AllocatorSampler:
    """Collect garbage, note the baseline RSS and start the allocator sampler."""
    gc.collect()
    sampler = AllocatorSampler()
    baseline_rss = current_rss()
    sampler.start()
    rec.update(baseline_rss_bytes=baseline_rss, threads=torch.get_num_threads(), first_step_started_at=time.time())
    return sampler


def _first_step(
    palettizer: Palettizer, model: nn.Module, x: Tensor, target: Tensor, sampler: AllocatorSampler, rec: Recorder
) -> tuple[nn.Module, Callable[[], None]]:
    """``prepare`` + optimizer + one step, timed together (``prepare`` also alone)."""
    start = time.perf_counter()
    model = palettizer.prepare(model)
    prepare_s = time.perf_counter() - start
    sampler.sample()
    step = make_step(model, x, target, palettizer)
    step()
    rec.update(prepare_s=prepare_s, first_step_s=time.perf_counter() - start)
    sampler.sample()
    return model, step


def _steady_steps(step: Callable[[], None], count: int, sampler: AllocatorSampler, rec: Recorder) -> None:
    """``count`` timed steps; the allocator window restarts so their own peak is recorded too."""
    sampler.new_window()
    times: list[float] = []
    rec.update(steps_started_at=time.time())
    for _ in range(count):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
        sampler.sample()
        rec.update(step_times_s=times, step_s=statistics.median(times))
    sampler.stop()


def _paired_steps(case: Case, step: Callable[[], None], rec: Recorder) -> None:
    """Turns of this step and the plain layer's step (``case.paired`` timed steps of each); then one pass."""
    plain_case = Case(REFERENCE, case.variant, case.size, case.out_features, case.in_features, 0, 0, 0, 0, 0.0)
    model, x, target, _ = build_problem(plain_case)
    plain_step = make_step(model, x, target, NoPalettizer(plain_case))
    mine: list[float] = []
    plain: list[float] = []
    for _ in range(max(1, case.paired // PAIRED_TIMED)):
        for run, medians in ((step, mine), (plain_step, plain)):
            for _ in range(PAIRED_WARM):
                run()
            times = []
            for _ in range(PAIRED_TIMED):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            medians.append(statistics.median(times))
    rec.update(
        paired_step_s=statistics.median(mine),
        paired_plain_s=statistics.median(plain),
        paired_overhead_s=statistics.median(a - b for a, b in zip(mine, plain)),
        paired_pass_s=time_pass(case.out_features, case.in_features, case.dtype),
    )


def _record_peaks(sampler: AllocatorSampler, rec: Recorder) -> None:
    baseline = rec.data["baseline_rss_bytes"]
    alloc = sampler.available
    rec.update(
        rss_peak_bytes=peak_rss() - baseline,
        alloc_peak_bytes=sampler.peak - sampler.baseline if alloc else None,
        alloc_step_peak_bytes=sampler.window_peak - sampler.baseline if alloc else None,
    )


def measure(case: Case, result_path: Path | None = None) -> dict[str, Any]:
    """Run one case in this process and return its result dict (see the module docstring)."""
    rec = Recorder(case, result_path)
    if case.threads:
        torch.set_num_threads(case.threads)
    palettizer = make_palettizer(case)
    warm_up_torch()
    model, x, target, original = build_problem(case)
    sampler = _start_baseline(rec)
    model, step = _first_step(palettizer, model, x, target, sampler, rec)
    _steady_steps(step, case.steps, sampler, rec)
    _record_peaks(sampler, rec)
    if case.paired:
        _paired_steps(case, step, rec)
    rec.update(mse=mse(palettizer.finalized_weight(model), original))
    if isinstance(palettizer, TorchdkmPalettizer):
        rec.update(kmeans_mse=palettizer.kmeans_mse(original))
    rec.update(status="ok")
    return rec.data


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench._dkm_worker CASE_JSON RESULT_PATH", file=sys.stderr)
        return 2
    measure(Case.from_json(args[0]), Path(args[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""End-to-end torchdkm demo: DKM vs post-training k-means on scikit-learn's digits.

Run from the repository root with ``make demo`` or ``python -m examples.digits_demo``
(``--quick`` for a seconds-long smoke run, ``--help`` for the knobs).  It

1. loads ``load_digits`` (1,797 8x8 images, 10 classes) and splits it once:
   stratified by class, 75 % train / 25 % test (1,347 / 450 images),
   ``random_state=0``;
2. trains a small CNN in fp32 (Adam, cosine learning rate, cross-entropy);
3. compresses a copy of it with DKM at each setting of :data:`SETTINGS`
   (``prepare``, fine-tune with the same loss, ``finalize``), printing the
   per-layer report with its train/export gap just before ``finalize``;
4. compresses a copy with post-training k-means (``kmeans_compress``) at the
   same settings;
5. prints one table (fp32 first): bits per weight, accuracy, size, factor;
6. saves the best DKM model to ``out/``, reloads it into a fresh model and
   checks that its outputs are bit-identical.

It exits non-zero when a check fails: reload mismatch, a DKM gap >= 1 %, or
fp32 accuracy below 95 %.  Everything is seeded and runs on one thread, so
two runs on one machine print the same numbers.  Across machines the float
rounding of torch's CPU kernels depends on the instruction set they pick
(AVX2 or AVX-512: on one machine the DKM rows moved by up to 0.67 points), so
the command line pins torch's, MKL's and oneDNN's kernels to AVX2
(:data:`PINNED_ISA`, re-running itself once with them set unless they are
already set), which every x86-64 CPU of the last decade runs.

The train/export gap (soft training weight vs the snapped weight ``finalize``
exports) stays under 1 % with the library's default ``tau``.  The learning
rate decays to 0 (cosine) so the last steps settle the weights onto their
clusters.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

import torchdkm

TEST_FRACTION = 0.25
BATCH_SIZE = 64
#: The issue's bound on the train/export gap at the end of DKM training.
GAP_LIMIT = 0.01
MIN_FP32_ACCURACY = 0.95
#: The saved model is the smallest DKM model that loses at most this much accuracy vs fp32.
ACCURACY_TOLERANCE = 0.01
#: 4, 2, 1 and 0.5 bits per weight; the last two cluster 4- and 8-dim vectors.
SETTINGS = ("cv:4/1, fc:4/1", "cv:2/1, fc:2/1", "cv:4/4, fc:4/4", "cv:4/8, fc:4/8")
QUICK_SETTINGS = ("cv:2/1, fc:2/1", "cv:4/4, fc:4/4")
OUT = Path("out/digits_dkm.safetensors")
#: Read when torch, MKL and oneDNN first run a kernel, so set before the process starts (see :func:`cli`).
PINNED_ISA = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@dataclass(frozen=True)
class Options:
    """Every knob of a run; the defaults are the documented demo."""

    epochs: int = 30  # fp32 training
    dkm_epochs: int = 12  # DKM fine-tuning, per setting
    settings: tuple[str, ...] = SETTINGS
    tau: float | None = None  # DKM temperature relative to each layer's margin; None: library default
    lr: float = 3e-3  # Adam's peak learning rate, for fp32 training and DKM fine-tuning alike
    seed: int = 0  # data split, initial weights and batch order
    out: Path = OUT
    progress: bool = True  # tqdm bars
    strict: bool = True  # fail on a gap >= GAP_LIMIT or a poor fp32 model

    @classmethod
    def quick(cls, **changes: Any) -> Options:
        """A smoke run of a few seconds: too short to reach the accuracy and gap the full run checks."""
        return cls(**{"epochs": 2, "dkm_epochs": 1, "settings": QUICK_SETTINGS, "strict": False, **changes})


@dataclass
class Data:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass
class Run:
    """One row of the results table."""

    method: str
    setting: str
    accuracy: float
    report: torchdkm.Report
    model: nn.Module
    gap: float | None = None  # largest layer gap just before finalize (DKM only)

    @property
    def bits_per_weight(self) -> float:
        """Index bits per clustered weight, averaged over the clustered weights (32 for fp32)."""
        return self.report.bits_per_weight


@dataclass
class Result:
    runs: list[Run]
    saved: Path | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


class DigitsCNN(nn.Module):
    """Two 3x3 convs, a 2x2 pool, two linears: every weight has >= 256 values, so all four get clustered."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)  # 288 weights
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)  # 9,216
        self.fc1 = nn.Linear(32 * 4 * 4, 64)  # 32,768
        self.fc2 = nn.Linear(64, 10)  # 640

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def load_data(seed: int) -> Data:
    """Digits scaled to [0, 1], split once (stratified) so every model is scored on the same 450 images."""
    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    labels = torch.tensor(digits.target, dtype=torch.long)
    train, test = train_test_split(
        range(len(labels)), test_size=TEST_FRACTION, stratify=digits.target, random_state=seed
    )
    return Data(images[train], labels[train], images[test], labels[test])


@torch.no_grad()
def predict(model: nn.Module, x: Tensor) -> Tensor:
    """Logits in eval mode: a prepared model then runs its hard (exported) weights."""
    model.eval()
    return model(x)


def accuracy(model: nn.Module, data: Data) -> float:
    return float((predict(model, data.x_test).argmax(1) == data.y_test).float().mean())


def train(model: nn.Module, data: Data, epochs: int, desc: str, opts: Options) -> None:
    """Adam + cross-entropy, the learning rate decayed to 0 by a cosine.

    The decay matters for DKM: it lets weights and centroids settle, so the
    final soft weights are the ones ``finalize`` snaps (see the module docstring).
    """
    order = torch.Generator().manual_seed(opts.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr)
    steps = epochs * math.ceil(len(data.y_train) / BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(steps, 1))
    bar = tqdm(range(epochs), desc=desc, unit="epoch", disable=not opts.progress)
    for _ in bar:
        model.train()
        total = 0.0
        for batch in torch.randperm(len(data.y_train), generator=order).split(BATCH_SIZE):
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += float(loss.detach()) * len(batch)
        bar.set_postfix(loss=f"{total / len(data.y_train):.4f}")


def train_fp32(data: Data, opts: Options) -> nn.Module:
    torch.manual_seed(opts.seed)
    model = DigitsCNN()
    train(model, data, opts.epochs, "fp32", opts)
    return model


def dkm_config(setting: str, opts: Options) -> torchdkm.DKMConfig:
    return torchdkm.DKMConfig.parse(setting) if opts.tau is None else torchdkm.DKMConfig.parse(setting, tau=opts.tau)


def dkm_run(fp32: nn.Module, setting: str, data: Data, opts: Options) -> Run:
    """Prepare a copy, fine-tune it, show its gap, finalize: the train-time clustering path."""
    model = torchdkm.prepare(copy.deepcopy(fp32), dkm_config(setting, opts))
    train(model, data, opts.dkm_epochs, f"DKM {setting}", opts)
    gap = show_gap(model, setting)
    model = torchdkm.finalize(model)
    return Run("DKM", setting, accuracy(model, data), torchdkm.report(model, show=False), model, gap)


def show_gap(model: nn.Module, setting: str) -> float:
    """Print a prepared model's per-layer report; return its largest train/export gap."""
    before = torchdkm.report(model, show=False)
    gap = max(r.gap for r in before.layers if r.gap is not None)
    verdict = "OK" if gap < GAP_LIMIT else "TOO LARGE"
    print(f"\nDKM {setting}: per-layer report at the end of training, before finalize")
    print(before)
    print(f"max train/export gap: {100 * gap:.3f} % (limit {100 * GAP_LIMIT:g} %): {verdict}\n")
    return gap


def kmeans_run(fp32: nn.Module, setting: str, data: Data, opts: Options) -> Run:
    """Post-training k-means on a copy (``kmeans_compress`` changes the model it is given)."""
    model = torchdkm.kmeans_compress(copy.deepcopy(fp32), dkm_config(setting, opts))
    return Run("k-means", setting, accuracy(model, data), torchdkm.report(model, show=False), model)


def format_table(runs: Sequence[Run]) -> str:
    head = ("method", "setting", "bits/w", "test acc", "size B", "size KB", "factor")
    rows = [
        (
            run.method,
            run.setting,
            f"{run.bits_per_weight:g}",
            f"{100 * run.accuracy:.2f} %",
            f"{run.report.compressed_bytes:,}",
            f"{run.report.compressed_bytes / 1024:.1f}",
            f"{run.report.factor:.1f}x",
        )
        for run in runs
    ]
    widths = [max(len(cell) for cell in column) for column in zip(head, *rows)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, rows)])


def pick_best(runs: Sequence[Run]) -> Run:
    """The smallest DKM model within ``ACCURACY_TOLERANCE`` of fp32 (``runs[0]``), else the most accurate."""
    dkm = [r for r in runs if r.method == "DKM"]
    good = [r for r in dkm if r.accuracy >= runs[0].accuracy - ACCURACY_TOLERANCE]
    if good:
        return min(good, key=lambda r: (r.report.compressed_bytes, -r.accuracy))
    return max(dkm, key=lambda r: (r.accuracy, -r.report.compressed_bytes))


def save_and_reload(run: Run, data: Data, path: Path) -> list[str]:
    """Save ``run.model``, load it into a freshly built model; return what differs (nothing, we hope)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torchdkm.save(run.model, path)
    reloaded = torchdkm.load(path, DigitsCNN())
    same = torch.equal(predict(run.model, data.x_test), predict(reloaded, data.x_test))
    reloaded_accuracy = accuracy(reloaded, data)
    print(
        f"saved DKM {run.setting} to {path}: file {path.stat().st_size:,} B "
        f"(reported compressed size {run.report.compressed_bytes:,} B + safetensors header and metadata)"
    )
    print(
        f"reloaded into a fresh DigitsCNN: test accuracy {100 * reloaded_accuracy:.2f} % "
        f"(before saving {100 * run.accuracy:.2f} %), identical: {reloaded_accuracy == run.accuracy}; "
        f"logits bit-identical: {same}"
    )
    failures = []
    if reloaded_accuracy != run.accuracy:
        failures.append(f"reloaded accuracy {reloaded_accuracy} != {run.accuracy} before saving")
    if not same:
        failures.append("the reloaded model's logits differ from the saved model's")
    return failures


def check(runs: Sequence[Run]) -> list[str]:
    """The demo's claims: every DKM gap under ``GAP_LIMIT`` and a well-trained fp32 model."""
    failures = [
        f"DKM {r.setting}: train/export gap {100 * r.gap:.3f} % >= {100 * GAP_LIMIT:g} %"
        for r in runs
        if r.gap is not None and r.gap >= GAP_LIMIT
    ]
    if runs[0].accuracy < MIN_FP32_ACCURACY:
        failures.append(f"fp32 test accuracy {100 * runs[0].accuracy:.2f} % < {100 * MIN_FP32_ACCURACY:g} %")
    return failures


def run(opts: Options) -> Result:
    """The whole demo for ``opts``, on one thread (restored afterwards)."""
    threads = torch.get_num_threads()
    # Every op here is tiny: extra threads mostly spin-wait, and a run became 10-100x
    # slower when another process held one of the two cores.
    torch.set_num_threads(1)
    try:
        return _run(opts)
    finally:
        torch.set_num_threads(threads)


def _run(opts: Options) -> Result:
    data = load_data(opts.seed)
    fp32 = train_fp32(data, opts)
    runs = [Run("fp32", "-", accuracy(fp32, data), torchdkm.report(fp32, show=False), fp32)]
    runs += [dkm_run(fp32, s, data, opts) for s in opts.settings]
    runs += [kmeans_run(fp32, s, data, opts) for s in opts.settings]
    print(format_table(runs))
    print(
        f"(fp32: {opts.epochs} epochs; DKM: {opts.dkm_epochs} fine-tuning epochs at tau={opts.tau or torchdkm.LayerConfig().tau}; "
        f"k-means: no training; test set: {len(data.y_test)} images)\n"
    )
    failures = save_and_reload(pick_best(runs), data, opts.out)
    if opts.strict:
        failures += check(runs)
    return Result(runs, opts.out, failures)


def main(epochs: int | None = None, dkm_epochs: int | None = None, *, quick: bool = False, **changes: Any) -> Result:
    """Run the demo: the documented defaults, or ``quick`` (seconds); keywords override :class:`Options`."""
    if epochs is not None:
        changes["epochs"] = epochs
    if dkm_epochs is not None:
        changes["dkm_epochs"] = dkm_epochs
    return run(Options.quick(**changes) if quick else Options(**changes))


def pin_instruction_set(argv: Sequence[str]) -> None:
    """Re-run this command in a fresh process with :data:`PINNED_ISA` set, unless the caller set any of them.

    torch is already imported here and the libraries read these variables once,
    so setting them now would not take; ``--no-pin`` keeps each machine's choice.
    """
    if "--no-pin" in argv or any(key in os.environ for key in PINNED_ISA):
        return
    os.environ.update(PINNED_ISA)
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "examples.digits_demo", *argv])


def cli(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pin_instruction_set(argv)
    defaults = Options()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few-seconds smoke run, without the strict checks")
    parser.add_argument("--epochs", type=int, help=f"fp32 training epochs (default {defaults.epochs})")
    parser.add_argument("--dkm-epochs", type=int, help=f"DKM fine-tuning epochs (default {defaults.dkm_epochs})")
    parser.add_argument("--tau", type=float, default=defaults.tau, help="DKM temperature (default %(default)s)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="default %(default)s")
    parser.add_argument("--out", type=Path, default=defaults.out, help="best DKM model's file (default %(default)s)")
    parser.add_argument("--no-pin", action="store_true", help="let torch pick its instruction set (see PINNED_ISA)")
    args = parser.parse_args(argv)
    pins = ", ".join(f"{key}={os.environ[key]}" for key in PINNED_ISA if key in os.environ) or "none (--no-pin)"
    print(f"instruction set: {pins}; torch {torch.__version__}, 1 thread")
    start = time.perf_counter()
    result = main(args.epochs, args.dkm_epochs, quick=args.quick, tau=args.tau, seed=args.seed, out=args.out)
    print(f"run time: {time.perf_counter() - start:.1f} s")
    for failure in result.failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(cli())

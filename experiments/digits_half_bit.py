"""The digits CNN at 0.5 bit per weight: does the softer temperature that won on Fashion-MNIST win here too?

On Fashion-MNIST, DKM at ``4/8`` with the classifier dense (coremltools' layers) went from 2.3 / 1.1
points behind coremltools' ``DKMPalettizer`` at the default ``tau=0.005`` to 1.25 / 0.42 ahead at
``tau=0.02`` (README, "Fashion-MNIST at 1 and 0.5 bit per weight").  This runs the same comparison on
the digits CNN of :mod:`experiments.vision` (its fp32 training, budget and seeds), DKM only: ``4/8``
and ``2/8`` on coremltools' layers (``fc2`` dense), at both temperatures, with the straight-through
term (automatic at these settings).  coremltools' numbers are those of ``results/vision.md``.

    python -m experiments.digits_half_bit      # ~2 min on 2 cores; results/digits_half_bit.{json,md}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import torchdkm
from examples.digits_demo import DigitsCNN, load_data
from experiments import vision
from experiments.common import RESULTS, Record, Results, fmt_mean, markdown_table

SETTINGS = ("cv:4/8, fc:4/8, fc2:none", "cv:2/8, fc:2/8, fc2:none")
TAUS = (0.005, 0.02)


def run(opts: vision.Options, settings: tuple[str, ...] = SETTINGS, taus: tuple[float, ...] = TAUS) -> Results:
    data = load_data(0)
    results = Results(opts.name, {"seeds": list(opts.seeds), "epochs": opts.epochs, "dkm_epochs": opts.dkm_epochs,
                                  "lr": opts.lr, "settings": list(settings), "taus": list(taus)})  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only spin-waits
    try:
        for seed in opts.seeds:
            torch.manual_seed(seed)
            fp32 = DigitsCNN()
            vision.train(fp32, data, opts.epochs, seed, opts, f"fp32 s{seed}")
            size = torchdkm.report(fp32, show=False).fp32_bytes
            results.add(Record("fp32", "-", seed, {"accuracy": vision.accuracy(fp32, data)}, size, size, 32.0))
            for setting in settings:
                for tau in taus:
                    _, record = vision.dkm(fp32, setting, data, seed, opts, tau=tau)
                    record.method = f"DKM tau {tau:g}"
                    results.add(record)
    finally:
        torch.set_num_threads(threads)
    return results


def table(results: Results) -> str:
    rows = [r for r in results.summary("accuracy") if r["method"] != "fp32"]
    return markdown_table(
        ("setting", "bits/weight", "method", "test accuracy", "factor"),
        ((r["setting"], f"{r['bits_per_weight']:.3g}", r["method"], fmt_mean(r), f"{r['factor']:.1f}x") for r in rows),
    )


def write(results: Results, out: Path) -> Path:
    path = results.write(out)
    fp32 = next(r for r in results.summary("accuracy") if r["method"] == "fp32")
    head = (
        f"# Digits CNN at 0.5 and 0.25 bit per weight, DKM at two temperatures (`python -m experiments.digits_half_bit`)"
        f"\n\nfp32 {fmt_mean(fp32)} %, {fp32['n']} seed(s); test accuracy mean ± std (compression factor, fc2 dense)\n\n"
    )
    (out / f"{results.name}.md").write_text(head + table(results) + "\n")
    return path


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="one seed, one epoch of everything (a smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    opts = vision.Options.tiny(name="digits_half_bit_tiny") if args.tiny else vision.Options(name="digits_half_bit")
    write(run(opts), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(cli())

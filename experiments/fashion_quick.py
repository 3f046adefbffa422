"""A quick 1-bit-per-weight comparison on Fashion-MNIST: DKM vs k-means vs coremltools DKM vs uniform.

``python -m experiments.fashion_quick --model mobilenet`` starts from the fp32
weights that :mod:`experiments.fashion_fp32` saved (``out/fashion_<model>_s<seed>.pt``)
and compresses copies of them to 1 bit per weight with each method of
:mod:`experiments.vision` (the same functions, so the methods, sizes and
training loop are the digits experiment's):

- at ``cv:4/4, fc:4/4`` (16 centroids of 4-vectors: 1 bit per weight):
  DKM, post-training k-means and coremltools' ``DKMPalettizer``, plus DKM
  with the layers coremltools leaves dense left dense too (equal terms);
- at ``cv:1/1, fc:1/1`` (2 scalar centroids: also 1 bit per weight): DKM,
  k-means, uniform PTQ and uniform QAT (a uniform grid needs whole bits, so
  this is where it can stand beside the clustering methods).

It is the *quick* variant: every trained method fine-tunes for ``steps``
steps of 64 images drawn from a fixed random subset of the training set
(one pass, the learning rate decaying to 0), far from the paper's budgets, so
the numbers rank the methods under a small budget, nothing more.  Outputs:
``results/<name>.json`` and ``results/<name>.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

import torchdkm
from experiments import vision
from experiments.common import RESULTS, Record, Results, log_line, pivot_table
from experiments.fashion import DATA_DIR, Fashion, load_fashion
from experiments.fashion_fp32 import CHECKPOINTS, load_fp32
from experiments.fashion_models import MODELS

VECTOR_SETTING = "cv:4/4, fc:4/4"
SCALAR_SETTING = "cv:1/1, fc:1/1"
METHODS = ("DKM", vision.MATCHED, "k-means", "coremltools DKM", "uniform PTQ", "uniform QAT")


@dataclass
class Subset:
    """The attributes :mod:`experiments.vision`'s methods read: a training subset and the whole test set."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def subset(data: Fashion, images: int, seed: int = 0) -> Subset:
    """``images`` training images picked by a seeded permutation (independent of the method): one pass of fine-tuning."""
    pick = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[:images]
    return Subset(data.x_train[pick], data.y_train[pick], data.x_test, data.y_test)


def compare(
    fp32: torch.nn.Module,
    data: Subset,
    *,
    model: str,
    steps: int,
    seed: int,
    out: Path,
    name: str,
    lr: float,
    coreml_seconds: float,
    progress: bool,
    bn_batches: int = 0,
) -> Results:
    """Every method at 1 bit per weight from ``fp32``; writes ``<out>/<name>.json`` and ``.md``."""
    opts = vision.Options(
        seeds=(seed,), dkm_epochs=1, lr=lr, coreml_seconds=coreml_seconds, progress=progress, bn_batches=bn_batches
    )
    config = {"model": model, "steps": steps, "seed": seed, "lr": lr, "images": len(data.y_train), "bn_batches": bn_batches}
    results = Results(name, config)
    report = torchdkm.report(fp32, show=False)
    fp32_accuracy = vision.accuracy(fp32, data)
    results.add(Record("fp32", "-", seed, {"accuracy": fp32_accuracy}, report.fp32_bytes, report.fp32_bytes, 32.0))
    log_line(f"{model} fp32: {100 * fp32_accuracy:.2f} %")
    dkm_model, record = vision.dkm(fp32, VECTOR_SETTING, data, seed, opts)
    results.add(record)
    results.add(vision.kmeans(fp32, VECTOR_SETTING, data, seed, opts))
    record, dense = vision.coreml(fp32, VECTOR_SETTING, data, seed, opts, torchdkm.report(dkm_model, show=False))
    results.add(record)
    if dense:
        matched = VECTOR_SETTING + "".join(f", {layer}:none" for layer in dense)
        _, record = vision.dkm(fp32, matched, data, seed, opts)
        results.add(replace(record, method=vision.MATCHED, setting=VECTOR_SETTING, note=matched))
    _, record = vision.dkm(fp32, SCALAR_SETTING, data, seed, opts)
    results.add(record)
    results.add(vision.kmeans(fp32, SCALAR_SETTING, data, seed, opts))
    for qat in (False, True):
        results.add(vision.uniform(fp32, SCALAR_SETTING, data, seed, opts, qat))
    for setting in (VECTOR_SETTING, SCALAR_SETTING):
        log_line(vision.summary_line(results, setting, seed))
    results.write(out)
    (out / f"{name}.md").write_text(table(results, config) + "\n")
    return results


def table(results: Results, config: dict) -> str:
    rows = results.summary("accuracy")
    fp32 = next(r for r in rows if r["method"] == "fp32")
    label = (
        f"### {config['model']} on Fashion-MNIST at 1 bit per weight, quick: {config['steps']} fine-tuning steps "
        f"of 64 ({config['images']:,} training images, one pass), seed {config['seed']}; test accuracy (%) "
        f"(compression factor); fp32 {100 * fp32['mean']:.2f} %"
    )
    notes = sorted({f"{r.method}, {r.setting}: {r.note}" for r in results.records if r.note})
    timing = [f"{r.method}, {r.setting}: {r.seconds:.0f} s, {r.steps} steps" for r in results.records if r.steps]
    tables = [pivot_table(rows, METHODS, (VECTOR_SETTING, SCALAR_SETTING), label)]
    bn_rows = results.summary("accuracy_bn")
    if bn_rows:
        bn_label = (
            f"### The same models after re-estimating their BatchNorm statistics on {config['bn_batches']} training "
            f"batches of 64 with the compressed weights (`torch.optim.swa_utils.update_bn`)"
        )
        tables += ["", pivot_table(bn_rows, METHODS, (VECTOR_SETTING, SCALAR_SETTING), bn_label)]
    return "\n".join([*tables, "", *notes, "", *timing])


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mobilenet")
    parser.add_argument("--seed", type=int, default=0, help="the fp32 checkpoint's seed and the batch order")
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps of 64 images (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--coreml-seconds", type=float, default=600.0)
    parser.add_argument(
        "--bn-batches",
        type=int,
        default=100,
        help="also score every model after re-estimating its BatchNorm statistics on this many batches (0: off)",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    fp32 = load_fp32(args.model, args.seed, args.checkpoints)
    if fp32 is None:
        return 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    data = subset(load_fashion(args.data_dir), 64 * args.steps, args.seed)
    results = compare(
        fp32, data, model=args.model, steps=args.steps, seed=args.seed, out=args.out, lr=args.lr,
        name=f"fashion_quick_{args.model}", coreml_seconds=args.coreml_seconds, progress=not args.no_progress,
        bn_batches=args.bn_batches,
    )  # fmt: skip
    print(table(results, results.config))
    print(f"run time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli())

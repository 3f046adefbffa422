"""What makes DKM win at 1 bit per weight and below: one option at a time, on Fashion-MNIST.

``python -m experiments.fashion_ablation --model mobilenet`` fine-tunes copies
of the fp32 weights :mod:`experiments.fashion_fp32` saved, with the quick
budget of :mod:`experiments.fashion_quick` (``steps`` steps of 64 images, one
pass, the same subset, optimizer and schedule for every row), once per
variant of :data:`VARIANTS`: the LUT's normalisation (none, one scale per
output channel ``#row``, with an offset ``#rowa``, one LUT per channel
``@1``), the temperature, at 1 bit per weight (scalars and 4-vectors) and at
0.5 bit (``cv:2/4``), beside uniform QAT and coremltools' ``DKMPalettizer``
(with its per-channel scale where the row has one).  Sizes are all-in
(indices, LUTs, scales, offsets and every dense tensor).  The default run is
the :data:`DEFAULT` rows the conclusions rest on (so that ``make reproduce-vision``
fits two hours on two cores); ``--settled`` adds the ablations whose question is
settled, ``--all`` the one-seed probes too, ``--only`` picks variants by label.
Outputs ``results/fashion_ablation_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

import torchdkm
from experiments import vision
from experiments.common import RESULTS, Record, Results, fmt_mean, log_line, markdown_table
from experiments.fashion import DATA_DIR, load_fashion
from experiments.fashion_fp32 import CHECKPOINTS, load_fp32
from experiments.fashion_models import MODELS
from experiments.fashion_quick import subset


@dataclass(frozen=True)
class Variant:
    """One row: a method at a setting (the torchdkm shorthand) with config fields beside it."""

    label: str
    method: str  # "DKM", "coremltools DKM" or "uniform QAT"
    setting: str
    fields: dict[str, Any] = field(default_factory=dict)
    tau_schedule: tuple[float, float] | None = None  # DKM: tau from ... to ... over the budget (TauSchedule)
    fisher_batches: int = 0  # DKM: centroids weighted by the Fisher of this many training batches (0: unweighted)
    size: vision.SizeTarget | None = None  # DKM: each layer's bits and scales planned to this size (on that Fisher)
    distill: float = 0.0  # any trained method: the KL term's weight against the fp32 model (vision.loss_fn)
    gptq_batches: int = 0  # DKM: starts from weights torchdkm.gptq compensated on this many training batches


def _rules(spec: str) -> str:
    return f"cv:{spec}, fc:{spec}"


ST = {"straight_through": 1.0}
#: DKM's own gradient alone (``straight_through`` is automatic by default: 1 at 1 bit per weight and below)
EXACT = {"straight_through": 0.0}
#: 1 bit: tau from soft to hard over the budget (TauSchedule); 4-vectors have larger margins to cross
SCALAR_SCHEDULE, VECTOR_SCHEDULE = (0.02, 0.001), (0.05, 0.002)

VARIANTS = (
    # -- the default run: the rows the README's conclusions and the targets rest on --------------------
    # scalars at 1 bit: DKM's own gradient, a per-channel scale and offset, the straight-through term
    Variant("1/1", "DKM", _rules("1/1"), EXACT),
    Variant("1/1 scale+offset", "DKM", _rules("1/1#rowa"), EXACT),
    Variant("1/1 scale+offset, ST", "DKM", _rules("1/1#rowa"), ST),
    Variant("1/1 uniform QAT", "uniform QAT", _rules("1/1")),
    # 4-vectors at 1 bit
    Variant("4/4", "DKM", _rules("4/4"), EXACT),
    Variant("4/4, ST", "DKM", _rules("4/4"), ST),
    Variant("4/4 coremltools", "coremltools DKM", _rules("4/4")),
    Variant("4/4 coremltools scale", "coremltools DKM", _rules("4/4#row")),
    # 4-vectors at 0.5 bit
    Variant("4/8, ST", "DKM", _rules("4/8"), ST),
    Variant("4/8 coremltools", "coremltools DKM", _rules("4/8")),
    Variant("4/8 coremltools scale", "coremltools DKM", _rules("4/8#row")),
    # coremltools cannot cut the classifier's 10 output channels into 8-vectors: the same layer dense here,
    # with a softer temperature (tau 0.02, which closed coremltools' 0.5-bit lead here)
    Variant("4/8, ST, classifier dense, tau 0.02", "DKM", "cv:4/8", {**ST, "tau": 0.02}),
    # centroids weighted by the Fisher of 16 training batches (torchdkm.fisher, prepare's importance)
    Variant("4/4, ST, Fisher", "DKM", _rules("4/4"), ST, fisher_batches=16),
    # (one Neumann term of the centroids' gradient, grad_terms=1: the library's default for vectors here)
    Variant("4/8, ST, classifier dense, tau 0.02, Fisher, 1 term", "DKM", "cv:4/8", {**ST, "tau": 0.02, "grad_terms": 1},
            fisher_batches=16),  # fmt: skip
    # a per-channel scale and offset under 4-vectors
    Variant("4/4 scale+offset, ST", "DKM", _rules("4/4#rowa"), ST),
    # on coremltools' terms at 1 bit: it leaves the classifier dense (10 output channels do not split into 4-vectors)
    Variant("4/4, ST, Fisher, classifier dense, 1 term", "DKM", "cv:4/4", {**ST, "grad_terms": 1}, fisher_batches=16),
    # each layer's bits (0.75 / 1 / 1.25 per weight) and per-channel scale+offset planned to uniform QAT's size
    Variant("4/4, ST, Fisher, planned to QAT's size", "DKM", _rules("4/4"), ST, fisher_batches=16,
            size=vision.SizeTarget(_rules("1/1"), bits=(3, 4, 5), blocks=(None, 0))),  # fmt: skip
    # scalars at 1 bit on coremltools' terms: the same 2-entry LUT per tensor (or per-channel scale), no offset
    Variant("1/1, ST", "DKM", _rules("1/1"), ST),
    Variant("1/1 coremltools", "coremltools DKM", _rules("1/1")),
    Variant("1/1 coremltools scale", "coremltools DKM", _rules("1/1#row")),
    # -- --settled adds the ablations whose question is settled (3 seeds each in the results files) ------------
    Variant("1/1 scale, ST", "DKM", _rules("1/1#row"), ST),
    Variant("4/4, schedule", "DKM", _rules("4/4"), EXACT, tau_schedule=VECTOR_SCHEDULE),
    Variant("4/4, ST, schedule", "DKM", _rules("4/4"), ST, VECTOR_SCHEDULE),
    Variant("4/8", "DKM", _rules("4/8"), EXACT),
    Variant("4/8, ST, classifier dense", "DKM", "cv:4/8", ST),
    Variant("4/8, classifier dense", "DKM", "cv:4/8", EXACT),
    Variant("4/8, classifier dense, tau 0.02", "DKM", "cv:4/8", {**EXACT, "tau": 0.02}),
    Variant("4/4, ST, tau 0.02", "DKM", _rules("4/4"), {**ST, "tau": 0.02}),
    Variant("1/1 scale+offset, ST, tau 0.02", "DKM", _rules("1/1#rowa"), {**ST, "tau": 0.02}),
    Variant("1/1 scale+offset, ST, Fisher", "DKM", _rules("1/1#rowa"), ST, fisher_batches=16),
    Variant("4/4 scale+offset, ST, Fisher", "DKM", _rules("4/4#rowa"), ST, fisher_batches=16),
    Variant("1/1, ST, Fisher", "DKM", _rules("1/1"), ST, fisher_batches=16),
    # the exact centroid gradient against one term (the default rows above take one term on vectors)
    Variant("4/8, ST, classifier dense, tau 0.02, Fisher", "DKM", "cv:4/8", {**ST, "tau": 0.02}, fisher_batches=16),
    Variant("4/4, ST, Fisher, classifier dense", "DKM", "cv:4/4", ST, fisher_batches=16),
    Variant("1/1 scale+offset, ST, 1 term", "DKM", _rules("1/1#rowa"), {**ST, "grad_terms": 1}),
    Variant("1/1, ST, 1 term", "DKM", _rules("1/1"), {**ST, "grad_terms": 1}),
    Variant("4/4, ST, Fisher, 1 term", "DKM", _rules("4/4"), {**ST, "grad_terms": 1}, fisher_batches=16),
    Variant("4/4, ST, Fisher, planned to QAT's size, 1 term", "DKM", _rules("4/4"), {**ST, "grad_terms": 1}, fisher_batches=16,
            size=vision.SizeTarget(_rules("1/1"), bits=(3, 4, 5), blocks=(None, 0))),  # fmt: skip
    # probed on one seed (see the README's notes), not in the default run:
    Variant("4/4, ST, Fisher, planned to QAT's size, distilled", "DKM", _rules("4/4"), ST, fisher_batches=16,
            size=vision.SizeTarget(_rules("1/1"), bits=(3, 4, 5), blocks=(None, 0)), distill=0.5),  # fmt: skip
    Variant("4/4, ST, Fisher, planned to QAT's size, distilled 0.9", "DKM", _rules("4/4"), ST, fisher_batches=16,
            size=vision.SizeTarget(_rules("1/1"), bits=(3, 4, 5), blocks=(None, 0)), distill=0.9),  # fmt: skip
    Variant("4/4, ST, Fisher, classifier dense, distilled", "DKM", "cv:4/4", ST, fisher_batches=16, distill=0.5),
    Variant("4/4 coremltools, distilled", "coremltools DKM", _rules("4/4"), distill=0.5),
    Variant("1/1 uniform QAT, distilled", "uniform QAT", _rules("1/1"), distill=0.5),
    Variant("4/4, ST, Fisher 64, classifier dense", "DKM", "cv:4/4", ST, fisher_batches=64),
    # ResNet only: exactly the layers coremltools compresses at 4/4 (it also leaves this shortcut dense)
    Variant("4/4, ST, Fisher, coremltools' layers", "DKM", "cv:4/4, stages.0.0.shortcut.0:none", ST, fisher_batches=16),
    Variant("4/4, ST, Fisher, classifier dense, tau 0.002", "DKM", "cv:4/4", {**ST, "tau": 0.002}, fisher_batches=16),
    Variant("4/4, ST, Fisher, classifier dense, tau 0.01", "DKM", "cv:4/4", {**ST, "tau": 0.01}, fisher_batches=16),
    Variant("4/4, ST 0.5, Fisher, classifier dense", "DKM", "cv:4/4", {"straight_through": 0.5}, fisher_batches=16),
    Variant("4/4, ST 2, Fisher, classifier dense", "DKM", "cv:4/4", {"straight_through": 2.0}, fisher_batches=16),
    Variant("4/4, ST, Fisher, planned to QAT's size, bits 2-6", "DKM", _rules("4/4"), ST, fisher_batches=16,
            size=vision.SizeTarget(_rules("1/1"), bits=(2, 3, 4, 5, 6), blocks=(None, 0))),  # fmt: skip
    # the centroids' share of the gradient truncated to n terms (n iterations unrolled, as coremltools differentiates)
    Variant("4/4, ST, Fisher, classifier dense, 3 terms", "DKM", "cv:4/4", {**ST, "grad_terms": 3}, fisher_batches=16),
    Variant("4/4, Fisher, classifier dense, 3 terms", "DKM", "cv:4/4", {**EXACT, "grad_terms": 3}, fisher_batches=16),
    Variant("4/4, Fisher, classifier dense", "DKM", "cv:4/4", EXACT, fisher_batches=16),
    Variant("4/8, ST, classifier dense, tau 0.02, Fisher, 3 terms", "DKM", "cv:4/8", {**ST, "tau": 0.02, "grad_terms": 3},
            fisher_batches=16),  # fmt: skip
    Variant("4/4 scale+offset, ST, 1 term", "DKM", _rules("4/4#rowa"), {**ST, "grad_terms": 1}),
    Variant("4/4, ST, classifier dense, 1 term", "DKM", "cv:4/4", {**ST, "grad_terms": 1}),
    Variant("4/4, Fisher, classifier dense, 1 term", "DKM", "cv:4/4", {**EXACT, "grad_terms": 1}, fisher_batches=16),
    Variant("4/4, ST 0.5, Fisher, classifier dense, 1 term", "DKM", "cv:4/4", {"straight_through": 0.5, "grad_terms": 1},
            fisher_batches=16),  # fmt: skip
    Variant("4/4, ST, Fisher, classifier dense, 1 term, tau 0.01", "DKM", "cv:4/4", {**ST, "grad_terms": 1, "tau": 0.01},
            fisher_batches=16),  # fmt: skip
    Variant("4/4, ST, Fisher, classifier dense, 1 term, tau 0.002", "DKM", "cv:4/4", {**ST, "grad_terms": 1, "tau": 0.002},
            fisher_batches=16),  # fmt: skip
    Variant("4/4, ST, Fisher, classifier dense, 1 term, 2 iterations", "DKM", "cv:4/4",
            {**ST, "grad_terms": 1, "max_iters": 2}, fisher_batches=16),  # fmt: skip
    Variant("4/4, ST, Fisher 64, classifier dense, 1 term", "DKM", "cv:4/4", {**ST, "grad_terms": 1}, fisher_batches=64),
    Variant("4/4 scale+offset, ST, Fisher, classifier dense, 1 term", "DKM", "cv:4/4#rowa", {**ST, "grad_terms": 1},
            fisher_batches=16),  # fmt: skip
    # DKM from weights GPTQ compensated (torchdkm.gptq, one stage per layer, 16 training batches)
    Variant("4/4, ST, Fisher, classifier dense, 1 term, GPTQ", "DKM", "cv:4/4", {**ST, "grad_terms": 1}, fisher_batches=16,
            gptq_batches=16),  # fmt: skip
    Variant("4/8, ST, classifier dense, tau 0.02, Fisher, 1 term, GPTQ", "DKM", "cv:4/8",
            {**ST, "tau": 0.02, "grad_terms": 1}, fisher_batches=16, gptq_batches=16),  # fmt: skip
    # one LUT per 16 output channels (the widest ResNet layers get 4, the narrowest one), both methods
    Variant("4/4@16, ST, Fisher, classifier dense, 1 term", "DKM", "cv:4/4@16", {**ST, "grad_terms": 1},
            fisher_batches=16),  # fmt: skip
    Variant("4/4@16 coremltools", "coremltools DKM", _rules("4/4@16")),
    Variant("1/1 per-channel LUT", "DKM", _rules("1/1@1"), EXACT),
    Variant("1/1 scale", "DKM", _rules("1/1#row"), EXACT),
    Variant("1/1 scale+offset, tau 0.02", "DKM", _rules("1/1#rowa"), {**EXACT, "tau": 0.02}),
    Variant("1/1 scale+offset, schedule", "DKM", _rules("1/1#rowa"), EXACT, tau_schedule=SCALAR_SCHEDULE),
    Variant("1/1 scale+offset, ST, schedule", "DKM", _rules("1/1#rowa"), ST, SCALAR_SCHEDULE),
    Variant("4/4 scale", "DKM", _rules("4/4#row"), EXACT),
    Variant("4/4 scale, schedule", "DKM", _rules("4/4#row"), EXACT, tau_schedule=VECTOR_SCHEDULE),
    Variant("4/4 scale, ST", "DKM", _rules("4/4#row"), ST),
    Variant("2/4", "DKM", _rules("2/4"), EXACT),
    Variant("2/4 scale", "DKM", _rules("2/4#row"), EXACT),
    Variant("4/8 scale, ST", "DKM", _rules("4/8#row"), ST),
)
#: What ``python -m experiments.fashion_ablation`` runs by default (``--settled``: and the settled ablations;
#: ``--all``: every variant, the one-seed probes too).
DEFAULT = 20
#: The default rows and the ablations whose question is settled (every row of the README's table).
SETTLED = 38


def measure(fp32: torch.nn.Module, variant: Variant, data: Any, seed: int, opts: vision.Options) -> Record:
    """``variant``'s record (its label as the method, what it ran as the note)."""
    opts = replace(opts, distill=variant.distill)
    if variant.method == "DKM":
        _, record = vision.dkm(fp32, variant.setting, data, seed, opts, variant.tau_schedule, variant.fisher_batches,
                               variant.size, variant.gptq_batches, **variant.fields)  # fmt: skip
    elif variant.method == "uniform QAT":
        record = vision.uniform(fp32, variant.setting, data, seed, opts, qat=True)
    elif variant.method == "coremltools DKM":
        size = torchdkm.report(torchdkm.kmeans_compress(copy.deepcopy(fp32), variant.setting), show=False)
        record, _ = vision.coreml(fp32, variant.setting, data, seed, opts, size)
    else:
        raise ValueError(f"{variant.label}: unknown method {variant.method!r}")
    fields = ", ".join(f"{k}={v}" for k, v in variant.fields.items())
    if variant.tau_schedule is not None:
        fields = ", ".join(filter(None, [fields, "tau {:g} to {:g}".format(*variant.tau_schedule)]))
    if variant.fisher_batches:
        fields = ", ".join(filter(None, [fields, f"Fisher-weighted centroids ({variant.fisher_batches} batches)"]))
    if variant.gptq_batches:
        fields = ", ".join(filter(None, [fields, f"GPTQ start ({variant.gptq_batches} batches, sequential)"]))
    if variant.distill:
        fields = ", ".join(filter(None, [fields, f"distilled from fp32, KL weight {variant.distill:g}"]))
    if variant.size is not None:
        size = variant.size
        fields = ", ".join([fields, f"bits {'/'.join(map(str, size.bits))} and scales per channel or none planned "
                                    f"to the size of uniform `{size.like}`"])  # fmt: skip
    note = "; ".join(n for n in (f"{variant.method} `{variant.setting}`" + (f" ({fields})" if fields else ""), record.note) if n)
    return replace(record, method=variant.label, note=note)


def table(results: Results) -> str:
    """One line per variant: mean ± sample std over the seeds, the all-in factor, the largest train/export gap."""
    config = results.config
    accuracy = {r["method"]: r for r in results.summary("accuracy")}
    gaps = {r["method"]: r for r in results.summary("gap")}
    fp32 = accuracy.pop("fp32")
    head = ("variant", "bits/weight", "accuracy %", "vs fp32", "seeds", "factor", "gap", "what ran")
    rows = []
    for label, row in accuracy.items():
        gap = gaps.get(label)
        rows.append(
            [
                label,
                f"{row['bits_per_weight']:.3g}",
                fmt_mean(row),
                f"{100 * (row['mean'] - fp32['mean']):+.2f}",
                row["n"],
                f"{row['factor']:.2f}x",
                "-" if gap is None else f"{100 * gap['max']:.1f} %",
                row["note"],
            ]
        )
    label = (
        f"### {config['model']} on Fashion-MNIST: DKM's options at 1 and 0.5 bit per weight; {config['steps']} "
        f"fine-tuning steps of 64 (lr {config['lr']:g}, cosine to 0) from one fp32 model (seed {config['fp32_seed']}, "
        f"{100 * fp32['mean']:.2f} %); fine-tuning seeds {', '.join(map(str, config['seeds']))} (training subset and "
        f"batch order); test accuracy, mean ± sample std over the seeds"
    )
    return f"{label}\n\n{markdown_table(head, rows)}"


def earlier(path: Path, config: dict[str, Any]) -> list[Record]:
    """The records of an earlier run of the same experiment (``--append``), checked to be comparable."""
    if not path.is_file():
        return []
    saved = Results.load(path)
    check_comparable(saved.config, config, f"--append: {path}", "this run")
    return saved.records


def check_comparable(found: dict[str, Any], config: dict[str, Any], where: str, other: str) -> None:
    """Records of two runs may share a table only when they fine-tuned the same fp32 model the same way."""
    for key in ("model", "steps", "fp32_seed", "lr", "images"):
        if found.get(key) != config[key]:
            raise SystemExit(f"{where} has {key}={found.get(key)!r}, {other} {config[key]!r}")


def merge(paths: list[Path], name: str, out: Path) -> Results:
    """One results file from runs made apart (seeds or variants run side by side): their records, the fp32
    record once, checked to be comparable (model, budget, fp32 seed, learning rate) like ``--append``."""
    parts = [Results.load(path) for path in paths]
    config = dict(parts[0].config)
    for path, part in zip(paths[1:], parts[1:]):
        check_comparable(part.config, config, f"--merge: {path}", str(paths[0]))
    records = [r for part in parts for r in part.records if r.method != "fp32"]
    config["seeds"] = sorted({r.seed for r in records})
    config["variants"] = list(dict.fromkeys(r.method for r in records))
    config["merged_from"] = [str(p) for p in paths]
    results = Results(name, config, environment=parts[0].environment)
    results.add(next(r for r in parts[0].records if r.method == "fp32"))
    for record in records:
        results.add(record)
    results.write(out)
    (out / f"{name}.md").write_text(table(results) + "\n")
    return results


def summaries(path: Path) -> dict[str, dict[str, Any]]:
    """A results file's accuracy summary per variant (mean, std, n, factor...)."""
    return {row["method"]: row for row in Results.load(path).summary("accuracy")}


def readme_table(paths: dict[str, Path]) -> str:
    """README's table: each variant's accuracy (mean ± std) and factor, one column per model's results file."""
    found = {model: summaries(path) for model, path in paths.items()}
    labels = [label for label in next(iter(found.values())) if label != "fp32"]
    most = {model: max(row["n"] for row in rows.values()) for model, rows in found.items()}

    def accuracy(model: str, cell: dict[str, Any] | None) -> str:
        if cell is None:
            return "-"
        fewer = f" ({cell['n']} seed{'s' if cell['n'] > 1 else ''})" if cell["n"] < most[model] else ""
        return fmt_mean(cell) + fewer

    head = ["variant", "bits/weight", *(f"{model} %" for model in found), *(f"{model} factor" for model in found)]
    rows = [["fp32", "32", *(fmt_mean(f["fp32"]) for f in found.values()), *("1.00x" for _ in found)]]  # one model
    for label in labels:
        cells = [found[model].get(label) for model in found]
        bits = next(c["bits_per_weight"] for c in cells if c is not None)
        rows.append(
            [
                label,
                f"{bits:.3g}",
                *(accuracy(model, c) for model, c in zip(found, cells)),
                *("-" if c is None else f"{c['factor']:.2f}x" for c in cells),
            ]
        )
    return markdown_table(head, rows)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mobilenet")
    parser.add_argument("--fp32-seed", type=int, default=0, help="the fp32 checkpoint every variant starts from")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="fine-tuning seeds (subset, batch order)")
    parser.add_argument("--steps", type=int, default=400, help="fine-tuning steps of 64 images (default %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--only", nargs="+", metavar="LABEL", help="run these variants only (labels of VARIANTS)")
    parser.add_argument("--settled", action="store_true", help="the default variants and the settled ablations")
    parser.add_argument("--all", action="store_true", help="every variant, the one-seed probes included")
    parser.add_argument(
        "--append", action="store_true", help="keep the results file's records of other seeds (run more seeds later)"
    )
    parser.add_argument("--coreml-seconds", type=float, default=600.0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", help="results file stem (default fashion_ablation_<model>)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--readme", action="store_true", help="print README's table from the results files, run nothing")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="combine results files of runs made apart into --name, run nothing")  # fmt: skip
    args = parser.parse_args(argv)
    if args.merge:
        if not args.name:
            parser.error("--merge needs --name")
        print(table(merge(args.merge, args.name, args.out)))
        return 0
    if args.readme:
        print(readme_table({m: args.out / f"fashion_ablation_{m}.json" for m in ("mobilenet", "resnet")}))
        return 0
    chosen = VARIANTS if args.all else VARIANTS[: SETTLED if args.settled else DEFAULT]
    variants = [v for v in VARIANTS if v.label in args.only] if args.only else list(chosen)
    unknown = set(args.only or ()) - {v.label for v in VARIANTS}
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {[v.label for v in VARIANTS]}")
    fp32 = load_fp32(args.model, args.fp32_seed, args.checkpoints)
    if fp32 is None:
        return 2
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    fashion = load_fashion(args.data_dir)
    opts = vision.Options(seeds=tuple(args.seeds), dkm_epochs=1, lr=args.lr, coreml_seconds=args.coreml_seconds,
                          progress=not args.no_progress)  # fmt: skip
    config = {"model": args.model, "steps": args.steps, "fp32_seed": args.fp32_seed, "seeds": args.seeds,
              "lr": args.lr, "images": 64 * args.steps, "variants": [v.label for v in variants]}  # fmt: skip
    results = Results(args.name or f"fashion_ablation_{args.model}", config)
    kept = earlier(args.out / f"{results.name}.json", config) if args.append else []
    config["seeds"] = sorted({r.seed for r in kept if r.method != "fp32"} | set(args.seeds))
    rerun = {(v.label, seed) for v in variants for seed in args.seeds}
    for record in kept:  # (a variant run again at a seed replaces its earlier record)
        if (record.method, record.seed) not in rerun:
            results.add(record)
    if not any(r.method == "fp32" for r in results.records):
        report = torchdkm.report(fp32, show=False)
        results.add(Record("fp32", "-", args.fp32_seed, {"accuracy": vision.accuracy(fp32, fashion)},
                           report.fp32_bytes, report.fp32_bytes, 32.0))  # fmt: skip
    for seed in args.seeds:
        data = subset(fashion, 64 * args.steps, seed)
        for variant in variants:
            record = measure(fp32, variant, data, seed, opts)
            results.add(record)
            accuracy = record.metrics.get("accuracy")
            log_line(f"{args.model} seed {seed} {variant.label}: "
                     f"{'-' if accuracy is None else f'{100 * accuracy:.2f} %'} ({record.factor:.2f}x) {record.note}")
            results.write(args.out)
            (args.out / f"{results.name}.md").write_text(table(results) + "\n")
    print(table(results))
    print(f"run time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli())

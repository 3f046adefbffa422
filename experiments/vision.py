"""Vision: a small CNN on scikit-learn's digits, compressed 8x to 70x, by every method, 3 seeds.

``make reproduce-vision`` (``python -m experiments.vision``) runs, for each
seed, on the demo's fixed split (stratified 75/25, ``random_state=0``: 1,347
training and 450 test images):

1. fp32 training of :class:`examples.digits_demo.DigitsCNN` (the seed sets the
   initial weights and the batch order);
2. the sweep: every setting of :data:`SWEEP` (4 bits per weight down to 0.25)
   compressed from that fp32 model by
   - **DKM** (torchdkm: prepare, fine-tune with the task loss, finalize),
   - **k-means** (post-training, ``torchdkm.kmeans_compress``; no training),
   - **coremltools DKM** (``DKMPalettizer``, same bits/dim, same fine-tuning
     budget and loop, its default tau),
   - **uniform PTQ** (per-channel affine round-to-nearest, same bits per weight) and
   - **uniform QAT** (the same, trained with a straight-through estimator, same budget);
   uniform quantization needs a whole number of bits per weight, so it has no
   row below 1 bit;
3. the ablations (DKM only, at :data:`ABLATION_SETTING`): tau, the iteration
   cap, and the vector dimension at a fixed 1 bit per weight.

Outputs: ``results/vision.json`` (every run), ``results/vision.md`` (tables),
``results/vision_tradeoff.png`` (accuracy against size, one curve per method)
and ``results/vision_histogram.png`` (one layer before/after DKM).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import torchdkm
from examples.digits_demo import Data, DigitsCNN, load_data
from experiments.baselines import (
    CoremlDKM,
    size_with_dense,
    uniform_qat_,
    uniform_quantize_,
    uniform_size,
    unpalettized,
)
from experiments.common import (
    RESULTS,
    Record,
    Results,
    experiment_parser,
    fit,
    fmt_mean,
    human_bytes,
    log_line,
    markdown_table,
    minibatches,
    options_dict,
    pivot_table,
    plan_summary,
    plot_histograms,
    plot_tradeoff,
    run_from_cli,
)
from torchdkm.nn.parametrization import dkm_parametrizations

#: 4, 3, 2, 1 bits per weight (scalars; ``@1``: one 2-entry LUT per output channel, the
#: same freedom as a per-channel uniform grid), then 1, 0.5 and 0.25 bits per weight (vectors).
SWEEP = (
    "cv:4/1, fc:4/1",
    "cv:3/1, fc:3/1",
    "cv:2/1, fc:2/1",
    "cv:1/1, fc:1/1",
    "cv:1/1@1, fc:1/1@1",
    "cv:4/4, fc:4/4",
    "cv:4/8, fc:4/8",
    "cv:2/8, fc:2/8",
)
#: 1 bit per weight, scalars: hard enough that the knobs show (k-means alone loses ~35 points).
ABLATION_SETTING = "cv:1/1, fc:1/1"
TAUS = (0.0005, 0.002, 0.005, 0.02, 0.1)
ITERATION_CAPS = (1, 2, 5, 10)
#: Every one of these costs 1 bit per weight; larger vectors buy a larger LUT.
DIMS_AT_1_BIT = ("cv:1/1, fc:1/1", "cv:2/2, fc:2/2", "cv:4/4, fc:4/4", "cv:6/6, fc:6/6")
HISTOGRAM_SETTING = "cv:3/1, fc:3/1"
HISTOGRAM_LAYER = "fc1"
#: DKM with the layers coremltools could not cluster left dense too, for an equal-terms row.
MATCHED = "DKM, coremltools' layers"
METHODS = ("DKM", MATCHED, "k-means", "coremltools DKM", "uniform PTQ", "uniform QAT")
BATCH_SIZE = 64


@dataclass(frozen=True)
class Options:
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 30  # fp32 training
    dkm_epochs: int = 12  # fine-tuning budget of every trained compression method
    lr: float = 3e-3
    sweep: tuple[str, ...] = SWEEP
    methods: tuple[str, ...] = METHODS
    taus: tuple[float, ...] = TAUS
    iteration_caps: tuple[int, ...] = ITERATION_CAPS
    dims: tuple[str, ...] = DIMS_AT_1_BIT
    coreml_seconds: float = 300.0  # wall-time cap per coremltools run; it reports how far it got
    #: > 0: also report ``accuracy_bn``, the compressed model's accuracy after its BatchNorm statistics are
    #: re-estimated on this many training batches (``torch.optim.swa_utils.update_bn``; they were gathered
    #: on the weights as trained, soft ones for DKM, not on the weights shipped)
    bn_batches: int = 0
    #: > 0: the trained compression methods learn from the fp32 model too: their loss is
    #: ``(1 - distill) * cross-entropy + distill * KL(fp32's softmax || the model's)`` (see :func:`loss_fn`)
    distill: float = 0.0
    out: Path = RESULTS
    name: str = "vision"
    progress: bool = True

    @classmethod
    def tiny(cls, **changes) -> Options:
        """Seconds: one seed, two settings, one step of everything; for the test suite."""
        base = dict(
            seeds=(0,),
            epochs=1,
            dkm_epochs=1,
            sweep=("cv:2/1, fc:2/1", "cv:4/8, fc:4/8"),
            taus=(0.005, 0.1),
            iteration_caps=(1, 5),
            dims=("cv:1/1, fc:1/1", "cv:2/2, fc:2/2"),
            name="vision-tiny",
            progress=False,
        )
        return cls(**{**base, **changes})


def accuracy(model: nn.Module, data: Data) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def scores(model: nn.Module, data: Data, opts: Options | None = None) -> dict[str, float]:
    """``accuracy``, and with ``opts.bn_batches`` ``accuracy_bn`` (on a copy whose BatchNorm statistics are
    re-estimated on the first ``bn_batches`` training batches of the compressed weights)."""
    out = {"accuracy": accuracy(model, data)}
    if opts is not None and opts.bn_batches > 0:
        if not any(getattr(m, "running_mean", None) is not None for m in model.modules()):
            return out
        copy_ = copy.deepcopy(model)
        starts = range(0, min(len(data.y_train), opts.bn_batches * BATCH_SIZE), BATCH_SIZE)
        with torch.no_grad():
            torch.optim.swa_utils.update_bn([data.x_train[i : i + BATCH_SIZE] for i in starts], copy_)
        out["accuracy_bn"] = accuracy(copy_, data)
    return out


def loss_fn(data: Data, teacher: nn.Module | None = None, distill: float = 0.0):
    """Cross-entropy on the labels; with a ``teacher`` and ``distill`` > 0, mixed with the KL divergence from
    the teacher's predicted distribution (temperature 1): the compressed model is fitted to what the fp32
    model it came from predicts, not only to the labels (knowledge distillation, Hinton et al. 2015)."""
    if teacher is None or distill <= 0:
        return lambda model, batch: F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
    teacher = teacher.eval()

    def loss(model: nn.Module, batch) -> torch.Tensor:
        x = data.x_train[batch]
        with torch.no_grad():
            target = F.log_softmax(teacher(x), -1)
        logits = model(x)
        kl = F.kl_div(F.log_softmax(logits, -1), target, reduction="batchmean", log_target=True)
        return (1 - distill) * F.cross_entropy(logits, data.y_train[batch]) + distill * kl

    return loss


def steps_per_epoch(data: Data) -> int:
    return -(-len(data.y_train) // BATCH_SIZE)


def train(
    model: nn.Module, data: Data, epochs: int, seed: int, opts: Options, desc: str, teacher: nn.Module | None = None, **kw
) -> int:
    """``fit`` on the training images; ``teacher`` (the fp32 model) is distilled from when ``opts.distill``."""
    return fit(
        model,
        minibatches(len(data.y_train), BATCH_SIZE),
        loss_fn(data, teacher, opts.distill),
        epochs=epochs,
        steps_per_epoch=steps_per_epoch(data),
        lr=opts.lr,
        seed=seed,
        desc=desc,
        progress=opts.progress,
        **kw,
    )


@dataclass(frozen=True)
class SizeTarget:
    """DKM with each layer's bits and scales chosen by ``torchdkm.plan_to_size`` (Fisher-weighted errors) so
    that the model is at most as large, all in, as uniform quantization at ``like``: what a user asking for
    "the best model of this size" gets, against uniform QAT at that size."""

    like: str  # a uniform-quantization setting ("cv:1/1, fc:1/1"): its all-in bytes are the budget
    bits: tuple[int, ...]  # index bits each layer may take (at the base setting's dim)
    blocks: tuple[int | None, ...]  # scale blocks each layer may take (0: one per output channel; offsets on)


def uniform_bytes(fp32: nn.Module, setting: str) -> int:
    """All-in bytes of ``fp32`` quantized uniformly at ``setting`` (QAT's size: training does not change it)."""
    model = copy.deepcopy(fp32)
    return uniform_size(model, uniform_quantize_(model, setting))[0]


def dkm(
    fp32: nn.Module,
    setting: str,
    data: Data,
    seed: int,
    opts: Options,
    tau_schedule: tuple[float, float] | None = None,
    fisher_batches: int = 0,
    size: SizeTarget | None = None,
    gptq_batches: int = 0,
    **fields,
) -> tuple[nn.Module, Record]:
    """DKM at ``setting`` (config ``fields`` beside it); ``tau_schedule``: ``(start, end)`` over the whole budget;
    ``fisher_batches``: centroids weighted by the Fisher of that many training batches (``torchdkm.fisher``);
    ``size``: the layers of ``setting`` planned to that size on the same Fisher (needs ``fisher_batches``);
    ``gptq_batches``: DKM starts from weights ``torchdkm.gptq`` compensated on that many training batches,
    sequentially (one stage per layer).

    The recorded tables ran DKM's exact gradient, the library's only one before ``grad_terms`` (whose
    automatic value is now one term for vectors at 1 bit per weight and below): rows keep it
    (``grad_terms=0``) unless their fields name another."""
    start = time.perf_counter()
    config = torchdkm.DKMConfig.parse(setting, **{"grad_terms": 0, **fields})
    importance, note = None, ""
    if fisher_batches:
        batches = minibatches(len(data.y_train), BATCH_SIZE)(torch.Generator().manual_seed(seed))
        chosen = [batch for batch, _ in zip(batches, range(fisher_batches))]
        losses = (lambda m: (loss_fn(data)(m, batch) for batch in chosen))  # noqa: E731
        if size is None:
            importance = torchdkm.fisher(fp32, losses, config)
        else:
            budget, parameters = uniform_bytes(fp32, size.like), sum(p.numel() for p in fp32.parameters())
            plan = torchdkm.plan_to_size(fp32, 8 * budget / parameters, config, bits=size.bits, blocks=size.blocks,
                                         offset=True, calibration=losses, fisher=True, header=False)  # fmt: skip
            config, importance, note = plan.config, plan.importance, plan_summary(plan)
    elif size is not None:
        raise ValueError("dkm: a size target plans on the Fisher: give fisher_batches")
    model = torchdkm.prepare(copy.deepcopy(fp32), config, importance=importance)
    if gptq_batches:
        batches = minibatches(len(data.y_train), BATCH_SIZE)(torch.Generator().manual_seed(seed))
        chosen = [batch for batch, _ in zip(batches, range(gptq_batches))]
        layers = len(dkm_parametrizations(model))
        errors = torchdkm.gptq(model, lambda m: [m(data.x_train[batch]) for batch in chosen], stages=layers).errors
        note = "; ".join(filter(None, [note, "GPTQ start: output error " + ", ".join(
            f"{a:.3f}->{b:.3f}" for a, b in errors.values())]))  # fmt: skip
    after = None
    if tau_schedule is not None:
        after = torchdkm.TauSchedule(model, opts.dkm_epochs * steps_per_epoch(data), *tau_schedule).step
    steps = train(model, data, opts.dkm_epochs, seed, opts, f"DKM {setting} s{seed}", fp32, after_step=after)
    gap = max(r.gap for r in torchdkm.report(model, show=False).layers)
    model = torchdkm.finalize(model)
    seconds = time.perf_counter() - start
    report = torchdkm.report(model, show=False)
    metrics = {**scores(model, data, opts), "gap": gap, "ms_per_step": 1e3 * seconds / max(steps, 1)}
    record = Record(
        "DKM",
        setting,
        seed,
        metrics,
        report.compressed_bytes,
        report.fp32_bytes,
        report.bits_per_weight,
        steps,
        seconds,
        note,
    )
    return model, record


def kmeans(fp32: nn.Module, setting: str, data: Data, seed: int, opts: Options | None = None) -> Record:
    start = time.perf_counter()
    model = torchdkm.kmeans_compress(copy.deepcopy(fp32), setting)
    report = torchdkm.report(model, show=False)
    return Record(
        "k-means",
        setting,
        seed,
        scores(model, data, opts),
        report.compressed_bytes,
        report.fp32_bytes,
        report.bits_per_weight,
        0,
        time.perf_counter() - start,
    )


def coreml(
    fp32: nn.Module, setting: str, data: Data, seed: int, opts: Options, size: torchdkm.Report
) -> tuple[Record, list[str]]:
    """coremltools' DKM with DKM's budget, and the layers it left dense.

    Sized like torchdkm's model of the same setting (same LUTs and indices),
    except that a layer coremltools skipped counts at fp32.
    """
    start = time.perf_counter()
    model = copy.deepcopy(fp32)
    try:
        palettizer = CoremlDKM(model, setting)
        model = palettizer.prepare()
        steps = train(
            model,
            data,
            opts.dkm_epochs,
            seed,
            opts,
            f"coremltools {setting} s{seed}",
            fp32,
            after_step=palettizer.step,
            deadline=time.monotonic() + opts.coreml_seconds,
        )
        model = palettizer.finalize()
    except Exception as error:  # noqa: BLE001 - a refusal is a result to report
        note = f"failed: {type(error).__name__}: {error}"[:200]
        record = Record(
            "coremltools DKM",
            setting,
            seed,
            {},
            size.compressed_bytes,
            size.fp32_bytes,
            size.bits_per_weight,
            0,
            time.perf_counter() - start,
            note,
        )
        return record, []
    seconds = time.perf_counter() - start
    budget = opts.dkm_epochs * steps_per_epoch(data)
    note = "" if steps >= budget else f"stopped at {steps}/{budget} steps ({opts.coreml_seconds:g} s cap)"
    size_bytes = size.compressed_bytes
    dense = unpalettized(model, setting)
    if dense:
        size_bytes = size_with_dense(size, dense)
        note = f"{note}; left dense by coremltools: {', '.join(n for n, _ in dense)}".lstrip("; ")
    metrics = {**scores(model, data, opts), "ms_per_step": 1e3 * seconds / max(steps, 1)}
    record = Record(
        "coremltools DKM",
        setting,
        seed,
        metrics,
        size_bytes,
        size.fp32_bytes,
        size.bits_per_weight,
        steps,
        seconds,
        note,
    )
    return record, [name for name, _ in dense]


def uniform(fp32: nn.Module, setting: str, data: Data, seed: int, opts: Options, qat: bool) -> Record:
    start = time.perf_counter()
    model = copy.deepcopy(fp32)
    steps = 0
    if qat:
        uniform_qat_(model, setting)
        steps = train(model, data, opts.dkm_epochs, seed, opts, f"uniform QAT {setting} s{seed}", fp32)
    layers = uniform_quantize_(model, setting)
    size, fp32_bytes = uniform_size(model, layers)
    bits = sum(q.bits * q.numel for q in layers) / sum(q.numel for q in layers)
    return Record(
        "uniform QAT" if qat else "uniform PTQ",
        setting,
        seed,
        scores(model, data, opts),
        size,
        fp32_bytes,
        bits,
        steps,
        time.perf_counter() - start,
    )


def histogram_setting(opts: Options) -> str:
    return HISTOGRAM_SETTING if HISTOGRAM_SETTING in opts.sweep else opts.sweep[0]


def histogram(fp32: nn.Module, model: nn.Module, setting: str, path: Path, seed: int) -> Path:
    before = getattr(fp32, HISTOGRAM_LAYER).weight.detach()
    layer = getattr(model, HISTOGRAM_LAYER)
    return plot_histograms(
        before,
        layer.weight.detach(),
        layer.weight_lut,
        path,
        title=f"DigitsCNN.{HISTOGRAM_LAYER} {list(before.shape)}, DKM {setting}, seed {seed}",
    )


def run(opts: Options) -> Results:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only spin-waits
    try:
        return _run(opts)
    finally:
        torch.set_num_threads(threads)


def _run(opts: Options) -> Results:
    data = load_data(0)
    results = Results(opts.name, options_dict(opts))
    plots: list[Path] = []
    for seed in opts.seeds:
        torch.manual_seed(seed)
        fp32 = DigitsCNN()
        start = time.perf_counter()
        steps = train(fp32, data, opts.epochs, seed, opts, f"fp32 s{seed}")
        report = torchdkm.report(fp32, show=False)
        fp32_accuracy = accuracy(fp32, data)
        log_line(f"seed {seed}: fp32 {100 * fp32_accuracy:.2f} %")
        results.add(
            Record(
                "fp32",
                "-",
                seed,
                {"accuracy": fp32_accuracy},
                report.fp32_bytes,
                report.fp32_bytes,
                32.0,
                steps,
                time.perf_counter() - start,
            )
        )
        for setting in opts.sweep:
            model, record = dkm(fp32, setting, data, seed, opts)
            results.add(record)
            if setting == histogram_setting(opts) and seed == opts.seeds[0]:
                plots.append(histogram(fp32, model, setting, opts.out / f"{opts.name}_histogram.png", seed))
            if "k-means" in opts.methods:
                results.add(kmeans(fp32, setting, data, seed))
            if "coremltools DKM" in opts.methods:
                record, dense = coreml(fp32, setting, data, seed, opts, torchdkm.report(model, show=False))
                results.add(record)
                if dense:  # the same comparison on equal terms: DKM leaving the same layers dense
                    matched = setting + "".join(f", {name}:none" for name in dense)
                    _, record = dkm(fp32, matched, data, seed, opts)
                    results.add(replace(record, method=MATCHED, setting=setting, note=f"{matched}"))
            # Uniform grids exist for whole bits per weight; the 1-bit grid already has its row at
            # cv:1/1, so the vector and per-channel-LUT settings of 1 bit do not repeat it.
            scalar = all(
                r is None or (r.dim == 1 and r.group_size is None)
                for r in torchdkm.DKMConfig.parse(setting).by_type.values()
            )
            for qat in (False, True):
                if scalar and ("uniform QAT" if qat else "uniform PTQ") in opts.methods:
                    results.add(uniform(fp32, setting, data, seed, opts, qat))
            log_line(summary_line(results, setting, seed))
        for tau in opts.taus:
            _, record = dkm(fp32, ABLATION_SETTING, data, seed, opts, tau=tau)
            results.add(replace(record, method="ablation: tau", setting=f"tau={tau:g}"))
        for cap in opts.iteration_caps:
            _, record = dkm(fp32, ABLATION_SETTING, data, seed, opts, max_iters=cap)
            results.add(replace(record, method="ablation: iterations", setting=f"max_iters={cap}"))
        for setting in opts.dims:
            _, record = dkm(fp32, setting, data, seed, opts)
            results.add(replace(record, method="ablation: dim at 1 bit/weight", setting=setting))
    results.write(opts.out)
    sweep = [r for r in results.summary("accuracy") if not r["method"].startswith("ablation")]
    plots.append(
        plot_tradeoff(
            sweep,
            opts.out / f"{opts.name}_tradeoff.png",
            title=f"DigitsCNN on sklearn digits: test accuracy vs size ({len(opts.seeds)} seeds)",
            ylabel="test accuracy (%)",
        )
    )
    (opts.out / f"{opts.name}.md").write_text(tables(results, opts) + "\n")
    print(tables(results, opts))
    print("wrote", results.write(opts.out), *plots, opts.out / f"{opts.name}.md")
    return results


def summary_line(results: Results, setting: str, seed: int) -> str:
    parts = [
        f"{r.method} {100 * r.metrics['accuracy']:.2f}"
        for r in results.records
        if r.setting == setting and r.seed == seed and "accuracy" in r.metrics
    ]
    return f"seed {seed} {setting}: " + ", ".join(parts)


def tables(results: Results, opts: Options) -> str:
    rows = results.summary("accuracy")
    gaps = {(r["method"], r["setting"]): r for r in results.summary("gap")}
    seeds = len(opts.seeds)
    fp32 = next(r for r in rows if r["method"] == "fp32")
    label = (
        f"### Test accuracy (%) by method, mean ± std over {seeds} seed(s) (compression factor); "
        f"fp32: {fmt_mean(fp32)} ({human_bytes(fp32['bytes'])})"
    )
    out = [pivot_table(rows, METHODS, opts.sweep, label), ""]
    out += [f"### Sweep: every run, mean ± std over {seeds} seed(s)", ""]
    order = {m: i for i, m in enumerate(("fp32", *METHODS))}
    sweep = sorted(
        (r for r in rows if r["method"] in order),
        key=lambda r: (
            -r["bits_per_weight"] if r["setting"] == "-" else opts.sweep.index(r["setting"]),
            order[r["method"]],
        ),
    )
    out.append(
        markdown_table(
            (
                "setting",
                "bits/weight",
                "method",
                "size",
                "factor",
                "test accuracy",
                "min-max",
                "steps",
                "s/run",
                "note",
            ),
            (
                (
                    r["setting"],
                    f"{r['bits_per_weight']:g}",
                    r["method"],
                    human_bytes(r["bytes"]),
                    f"{r['factor']:.1f}x",
                    fmt_mean(r),
                    f"{100 * r['min']:.2f}-{100 * r['max']:.2f}",
                    r["steps"],
                    f"{r['seconds']:.1f}",
                    r["note"],
                )
                for r in sweep
            ),
        )
    )
    failed = sorted({(r.setting, r.note) for r in results.records if r.note.startswith("failed")})
    for setting, note in failed:
        out.append(f"\ncoremltools DKM, {setting}: {note}")
    for method, what in (
        ("ablation: tau", "tau (relative to each layer's margin; default 0.005)"),
        ("ablation: iterations", "DKM iteration cap (default 5)"),
        ("ablation: dim at 1 bit/weight", "vector dimension at a fixed 1 bit per weight"),
    ):
        part = [r for r in rows if r["method"] == method]
        if not part:
            continue
        setting = ABLATION_SETTING if "dim" not in method else "bits = dim"
        out += ["", f"### Ablation: {what}; DKM at {setting}, {seeds} seed(s)", ""]
        out.append(
            markdown_table(
                ("value", "test accuracy", "min-max", "train/export gap", "size", "factor", "ms/step"),
                (
                    (
                        r["setting"],
                        fmt_mean(r),
                        f"{100 * r['min']:.2f}-{100 * r['max']:.2f}",
                        f"{100 * gaps[(method, r['setting'])]['mean']:.3f} %",
                        human_bytes(r["bytes"]),
                        f"{r['factor']:.1f}x",
                        f"{1e3 * r['seconds'] / max(r['steps'], 1):.1f}",
                    )
                    for r in part
                ),
            )
        )
    return "\n".join(out)


def cli(argv: list[str] | None = None) -> int:
    args = experiment_parser(__doc__, "a seconds-long smoke run").parse_args(argv)
    return run_from_cli(Options, args, run)


if __name__ == "__main__":
    sys.exit(cli())

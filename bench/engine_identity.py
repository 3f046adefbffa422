"""Are the engine's results bit-identical across two commits?  Run this file in each checkout, then compare.

    python -m bench.engine_identity --out /tmp/new.pt            # in this checkout
    (cd OLD && python -m bench.engine_identity --out /tmp/old.pt)  # the same file copied into an older one
    python -m bench.engine_identity --compare /tmp/old.pt /tmp/new.pt

Every case clusters one seeded weight through the public ``WeightClusterer`` (init, one soft
step, the weight's gradient of a fixed upstream, the snapped weight) and a small model through
``prepare`` / three SGD steps / ``finalize``, with its small layers stepping together (the default)
and alone (``model-alone``).  The cases cover every path of the engine: dense
(``top_m=None``), sparse top-m, uniquified 16-bit (bf16 weights, fp32 rounded to fp16), exact
float64, LUT groups and padded partial vectors, native loops on and off.  One thread, so the
comparison is of the arithmetic, not of the thread split.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

CASES = {  # name: (shape, dtype, config fields)
    "dense-d1-f32": ((64, 48), torch.float32, dict(bits=3, cluster_dtype="exact", top_m=None)),
    "dense-d2-f64": ((40, 30), torch.float64, dict(bits=3, dim=2, top_m=None)),
    "dense-d3-pad-groups": ((17, 10), torch.float32, dict(bits=2, dim=3, group_size=5, top_m=None)),
    "dense-8bit-neumann": ((64, 64), torch.float32, dict(bits=8, cluster_dtype="exact", top_m=None)),
    "sparse-d1-exact": ((96, 64), torch.float32, dict(bits=4, cluster_dtype="exact")),
    "sparse-d2": ((128, 64), torch.float32, dict(bits=4, dim=2)),
    "sparse-d2-groups-pad": ((33, 15), torch.float32, dict(bits=3, dim=2, group_size=8)),
    "sparse-d4-f64": ((64, 32), torch.float64, dict(bits=5, dim=4)),
    "sparse-d2-8bit": ((64, 64), torch.float32, dict(bits=8, dim=2)),
    "unique-bf16": ((256, 128), torch.bfloat16, dict(bits=4)),
    "unique-fp16-of-f32": ((256, 128), torch.float32, dict(bits=3)),
    "unique-groups": ((64, 40), torch.float32, dict(bits=2, group_size=16)),
    "unique-many-groups": ((130, 8), torch.bfloat16, dict(bits=2, group_size=2)),
    "unique-fp16": ((64, 64), torch.float16, dict(bits=4)),
}


def _weight(shape, dtype, seed: int) -> torch.Tensor:
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.05
    return w.to(dtype)


def run_cases() -> dict[str, list[torch.Tensor]]:
    from torchdkm.cluster import WeightClusterer
    from torchdkm.config import LayerConfig

    out = {}
    for seed, (name, (shape, dtype, fields)) in enumerate(CASES.items()):
        config = LayerConfig(min_numel=0, **fields)
        weight = _weight(shape, dtype, seed)
        clusterer = WeightClusterer(name, config, weight.shape)
        c0 = clusterer.init(weight)
        w = weight.clone().requires_grad_(True)
        result = clusterer.soft(w, c0)
        upstream = torch.linspace(-1, 1, weight.numel(), dtype=torch.float64).view(shape).to(dtype)
        (grad,) = torch.autograd.grad((result.weight * upstream).sum(), w)
        out[name] = [c0, result.weight.detach(), result.centroids, grad, clusterer.snap(weight, result.centroids)]
    return out


def run_model(alone: bool = False) -> list[torch.Tensor]:
    """``alone``: every layer steps alone (``prepare(batch_numel=0)``; checkouts without batching always do)."""
    import inspect

    import torchdkm

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )
    batching = "batch_numel" in inspect.signature(torchdkm.prepare).parameters
    torchdkm.prepare(
        model, torchdkm.DKMConfig.parse("cv:2/2, fc:3/1", min_numel=0), **({"batch_numel": 0} if alone and batching else {})
    )
    opt = torch.optim.SGD(model.parameters(), 0.05)
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = torchdkm.finalize(model)
    return [t.detach().clone() for t in final.state_dict().values()] + [final(x).detach()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"))
    parser.add_argument("--md", help="with --compare: also write the table to this Markdown file")
    args = parser.parse_args()
    if args.compare:
        old, new = (torch.load(p) for p in args.compare)
        lines = ["| case | tensors | result |", "|---|---:|---|"]
        for name in old:
            pairs = list(zip(old[name], new[name]))
            same = len(old[name]) == len(new[name]) and all(torch.equal(a, b) for a, b in pairs)
            worst = max(float((a.double() - b.double()).abs().max()) for a, b in pairs)
            differ = [i for i, (a, b) in enumerate(pairs) if not torch.equal(a, b)]
            verdict = "identical" if same else f"DIFFERS (max abs {worst:.3g}; tensors {differ})"
            print(f"{name:32s} {verdict}")
            lines.append(f"| {name} | {len(pairs)} | {verdict} |")
        if args.md:
            head = f"# Engine results, bit for bit: `python -m bench.engine_identity --compare {' '.join(args.compare)}`\n\n"
            with open(args.md, "w") as f:
                f.write(head + "\n".join(lines) + "\n")
        return
    torch.set_num_threads(1)
    results = {}
    before = os.environ.get("TORCHDKM_NATIVE")
    try:  # (the environment switch, not a backend argument: older checkouts must run this file too)
        for native in ("1", "0"):
            os.environ["TORCHDKM_NATIVE"] = native
            for name, tensors in run_cases().items():
                results[f"{name}/native={native}"] = tensors
            results[f"model/native={native}"] = run_model()
            results[f"model-alone/native={native}"] = run_model(alone=True)
    finally:
        if before is None:
            os.environ.pop("TORCHDKM_NATIVE", None)
        else:
            os.environ["TORCHDKM_NATIVE"] = before
    torch.save(results, args.out)
    print(f"wrote {len(results)} cases to {args.out}")


if __name__ == "__main__":
    main()

"""Compress a small model with DKM under data-parallel training (DDP, or FSDP2 with --fsdp).

    torchrun --nproc_per_node 2 examples/ddp_compress.py            # DDP, gloo, CPU
    torchrun --nproc_per_node 2 examples/ddp_compress.py --fsdp     # FSDP2 (fully_shard)
    python examples/ddp_compress.py                                 # one process

The recipe: ``torchdkm.prepare`` the model *before* wrapping it; train as usual
(each rank takes its share of every global batch); gather the full state
(``torchdkm.distributed.full_state_dict``, a collective), then on rank 0 load
it into a freshly prepared model, ``finalize`` and ``save``.  Every rank holds
the same centroids at every step: they are computed deterministically from the
weights, which data parallelism keeps identical (checked here every 10 steps).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
import torch.distributed as dist
from torch import nn

import torchdkm
from torchdkm.distributed import check_centroids_in_sync, full_state_dict

CONFIG = "fc:2"  # 2-bit indices over scalars: Linear weights 16x smaller
BATCH = 64  # the global batch; each of N ranks takes BATCH / N of it
PRETRAIN_STEPS = 300


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of a step (the same on every rank): labels from a fixed random teacher."""
    x = torch.randn(BATCH, 32, generator=torch.Generator().manual_seed(step))
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(12345))
    return x, (x @ teacher).argmax(1)


def pretrained() -> nn.Module:
    """A dense model, trained alike in every process: a stand-in for loading a pretrained checkpoint."""
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(PRETRAIN_STEPS):
        x, y = batch(10**5 + step)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def accuracy(model: nn.Module) -> float:
    x, y = batch(10**6)  # held out
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="DKM fine-tuning steps")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--fsdp", action="store_true", help="FSDP2 fully_shard instead of DDP")
    parser.add_argument("--out", default="ddp_compress.dkm.safetensors")
    args = parser.parse_args()

    torch.set_num_threads(1)
    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    if BATCH % world:
        raise SystemExit(f"the global batch ({BATCH}) must split evenly over {world} processes")

    dense = pretrained()
    dense_accuracy = accuracy(dense)
    kmeans_accuracy = accuracy(torchdkm.kmeans_compress(copy.deepcopy(dense), CONFIG))  # no DKM training

    model = torchdkm.prepare(dense, CONFIG)  # prepare first, then wrap
    if not distributed:
        wrapped = model
    elif args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        wrapped = fully_shard(model)
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)

    opt = torch.optim.SGD(wrapped.parameters(), lr=args.lr, momentum=0.9)
    share = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    for step in range(args.steps):
        x, y = batch(step)
        loss = nn.functional.cross_entropy(wrapped(x[share]), y[share])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if distributed and step % 10 == 0:
            check_centroids_in_sync(wrapped)  # raises if any rank differs
        if rank == 0 and step % 50 == 0:
            print(f"step {step:4d}  loss on rank 0's share {loss.item():.3f}")

    state = full_state_dict(wrapped)  # a collective under FSDP: every rank calls it
    if rank == 0:
        final = torchdkm.prepare(make_model(), CONFIG)  # a fresh prepared model to load the full state into
        final.load_state_dict(state)
        snapped_accuracy = accuracy(final.eval())  # eval mode: the snapped weights, what finalize exports
        final = torchdkm.finalize(final)
        path = torchdkm.save(final, args.out)
        torchdkm.report(final)
        mode = "single process" if not distributed else ("FSDP2" if args.fsdp else "DDP") + f" x{world}"
        print(f"{mode}: held-out accuracy dense {dense_accuracy:.3f}, k-means {kmeans_accuracy:.3f}, ", end="")
        print(f"DKM {accuracy(final):.3f} (in eval mode before finalize: {snapped_accuracy:.3f})")
        print(f"wrote {path}")
    if distributed:
        dist.barrier()  # tear down together: a rank leaving gloo while another still works can abort
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

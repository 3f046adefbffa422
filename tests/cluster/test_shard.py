"""Sharding the attention across ranks (eDKM's idea) gives the unsharded result.

Two gloo processes each compute their half of the rows of the dense DKM op;
outputs, centroids and weight gradients must equal a single process's.
"""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchdkm.cluster import WeightClusterer
from torchdkm.config import LayerConfig

CASES = [  # (shape, bits, dim, group_size)
    ((24, 10), 3, 2, None),
    ((17, 9), 2, 1, 5),
    ((12, 8), 2, 3, None),  # padded: partial vectors; bits <= dim: one gradient term (the Neumann pass across ranks)
]


def _soft_and_grad(config: LayerConfig, weight: torch.Tensor):
    clusterer = WeightClusterer("layer", config, weight.shape)
    c0 = clusterer.init(weight)
    w = weight.clone().requires_grad_(True)
    result = clusterer.soft(w, c0)
    upstream = torch.linspace(-1, 1, weight.numel(), dtype=weight.dtype).view_as(weight)
    (grad,) = torch.autograd.grad((result.weight * upstream).sum(), w)
    return result.weight.detach(), result.centroids, grad


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = []
    for i, (shape, bits, dim, group) in enumerate(CASES):
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        common = dict(bits=bits, dim=dim, group_size=group, min_numel=0, cluster_dtype="exact", top_m=None)
        common.update(max_iters=50, tol=1e-12, chunk_mb=1e-4)  # tiny chunks: several per rank
        sharded = _soft_and_grad(LayerConfig(shard_attention=True, **common), weight)
        results.append(sharded)
    torch.save(results, f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def test_sharded_attention_equals_unsharded(tmp_path):
    out = str(tmp_path / "shard")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for i, (shape, bits, dim, group) in enumerate(CASES):
        weight = torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        common = dict(bits=bits, dim=dim, group_size=group, min_numel=0, cluster_dtype="exact", top_m=None)
        common.update(max_iters=50, tol=1e-12, chunk_mb=1e-4)
        reference = _soft_and_grad(LayerConfig(**common), weight)
        for rank in ranks:
            for got, want in zip(rank[i], reference):
                assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), (i, (got - want).abs().max())
        for a, b in zip(ranks[0][i], ranks[1][i]):
            assert torch.equal(a, b), i  # every rank holds the same result, bit for bit

"""The passes' per-thread scratch maps: reused, never read before written, per thread and slot."""

from __future__ import annotations

import threading

import torch
from engine_api import dkm

from torchdkm.kernels.scratch import like, release_scratch, scratch

CPU = torch.device("cpu")


def test_a_slot_reuses_its_buffer_and_grows_when_asked_for_more():
    release_scratch()
    first = scratch((4, 10), torch.float32, CPU, "a")
    smaller = scratch((3, 5), torch.float32, CPU, "a")
    assert smaller.data_ptr() == first.data_ptr() and smaller.is_contiguous()
    other = scratch((4, 10), torch.float32, CPU, "b")
    assert other.data_ptr() != first.data_ptr()
    wider = scratch((4, 10), torch.float64, CPU, "a")  # another dtype: another buffer
    assert wider.data_ptr() != first.data_ptr()
    bigger = scratch((100, 10), torch.float32, CPU, "a")
    assert bigger.shape == (100, 10) and bigger.untyped_storage().nbytes() == 4000
    release_scratch()
    assert scratch((2, 2), torch.float32, CPU, "a").untyped_storage().nbytes() == 16


def test_like_takes_the_shape_dtype_and_last_size_of_its_tensor():
    t = torch.zeros(2, 3, 7, dtype=torch.float64)
    assert like(t, "x").shape == (2, 3, 7) and like(t, "x").dtype == torch.float64
    assert like(t, "y", (2, 5, 3, -1)).shape == (2, 5, 3, 7)


def test_each_thread_has_its_own_buffers():
    mine = scratch((8,), torch.float32, CPU, "t")
    theirs = []
    thread = threading.Thread(target=lambda: theirs.append(scratch((8,), torch.float32, CPU, "t").data_ptr()))
    thread.start()
    thread.join()
    assert theirs[0] != mine.data_ptr()


def test_the_dense_backward_does_not_read_what_its_scratch_held():
    """Gradients through chunked dense passes are the same with the scratch freshly made or full of NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 29, 2, generator=g)
    c0 = x[:, :4].clone()
    tau = torch.full((2,), 0.3)
    upstream = torch.randn(x.shape, generator=g)

    def grad() -> torch.Tensor:
        xr = x.clone().requires_grad_(True)
        w, c = dkm(xr, None, c0, tau, rows=8, max_iters=30, tol=torch.tensor(0.0))
        return torch.autograd.grad((w * upstream).sum() + c.sum(), xr)[0]

    release_scratch()
    clean = grad()
    for slot in ("gram", "q", "aq"):
        scratch((4096,), torch.float32, CPU, slot).fill_(float("nan"))
    dirty = grad()
    assert torch.isfinite(clean).all() and torch.equal(clean, dirty)

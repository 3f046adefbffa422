"""Block scales on a tiny GPT-2: Conv1D layers and the tied embedding, exact through finalize and reload."""

import pytest
import torch

import torchdkm

transformers = pytest.importorskip("transformers")


def test_block_scales_with_conv1d_and_tied_weights(tmp_path):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=500, n_positions=64, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    torchdkm.prepare(model, "fc:3/1#16a, emb:3/1#16a")
    ids = torch.randint(0, 500, (2, 16), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    model.train()
    for _ in range(2):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    expected = model(ids).logits
    layers = ("lm_head", "transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj")
    weights = {name: model.get_submodule(name).weight.detach().clone() for name in layers}
    final = torchdkm.finalize(model)
    # the weights bit for bit; the forward up to float32 summation order (packed layers multiply from the indices)
    for name, weight in weights.items():
        assert torch.equal(final.get_submodule(name).weight, weight), name
    torch.testing.assert_close(final(ids).logits, expected, rtol=1e-5, atol=1e-5)
    torchdkm.save_pretrained(final, tmp_path)
    loaded = torchdkm.load_pretrained(tmp_path)
    assert torch.equal(loaded(ids).logits, final(ids).logits)
    assert loaded.transformer.wte.weight_scales is loaded.lm_head.weight_scales  # one tensor, one palette
    attn = loaded.transformer.h[0].attn.c_attn  # Conv1D (32 in, 96 out): blocks along the input axis
    assert attn.weight_scales.shape == (96, 2) and attn.weight_offsets.dtype == torch.float16

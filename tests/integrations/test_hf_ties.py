"""Tiny random LLaMA (tied embedding) and GPT-2 (tied embedding, Conv1D layers) through the whole pipeline.

prepare -> training steps -> finalize -> save -> load / load_pretrained / transformers' from_pretrained:
the tie survives every step (one DKM layer, then one pair of palette buffers, stored once), outputs are
bit-identical after reloading, and report counts the tied tensor once.
"""

import warnings

import pytest
import torch
from hf_models import tiny_llama_config

import torchdkm
from torchdkm import DKMConfig
from torchdkm.cli import file_report
from torchdkm.io import read
from torchdkm.nn.palettized import palettized_modules
from torchdkm.nn.parametrization import dkm_parametrizations

transformers = pytest.importorskip("transformers")


def tiny_llama() -> torch.nn.Module:
    config = tiny_llama_config(vocab_size=96, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2() -> torch.nn.Module:
    config = transformers.GPT2Config(
        vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2
    )
    return transformers.GPT2LMHeadModel(config)


def unique_values(model: torch.nn.Module) -> int:
    """Values of the model's state, each tensor counted once however many modules hold it."""
    return sum({t.data_ptr(): t.numel() for t in model.state_dict().values()}.values())


def train(model: torch.nn.Module, steps: int = 2) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(steps):
        ids = torch.randint(0, 96, (2, 8))
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pipeline(request, tmp_path_factory):
    """(kind, fresh model factory, prepared report, finalized model, pretrained directory)."""
    make = {"llama": tiny_llama, "gpt2": tiny_gpt2}[request.param]
    torch.manual_seed(0)
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the embedding follows lm_head's rule: nothing stays dense, no warning
        torchdkm.prepare(model, DKMConfig.parse("fc:4/2", min_numel=0))
    train(model)
    prepared = torchdkm.report(model.eval(), gap=False, show=False)
    model = torchdkm.finalize(model)
    directory = torchdkm.save_pretrained(model, tmp_path_factory.mktemp(request.param) / "dkm")
    return request.param, make, prepared, model, directory


def embeddings(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    return model.get_input_embeddings(), model.get_output_embeddings()


def test_the_tie_survives_finalize_and_every_loader(pipeline):
    kind, make, _, model, directory = pipeline
    torch.manual_seed(1)
    plain = torchdkm.load(directory, make())
    ours = torchdkm.load_pretrained(directory)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory)
    ids = torch.randint(0, 96, (2, 7))
    for loaded in (model, plain, ours, theirs):
        emb, head = embeddings(loaded)
        assert type(emb).__name__ == "PalettizedEmbedding" and type(head).__name__ == "PalettizedLinear"
        assert emb.weight_indices is head.weight_indices and emb.weight_lut is head.weight_lut
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits, model(ids).logits)
    conv1d = [name for name, m in palettized_modules(model) if type(m).__name__ == "PalettizedConv1D"]
    assert len(conv1d) == (8 if kind == "gpt2" else 0)  # c_attn, c_proj, c_fc, mlp.c_proj per block


def test_the_file_stores_the_tensor_once(pipeline):
    _, _, _, model, directory = pipeline
    emb_key = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    meta, _ = read(directory)
    assert meta["aliases"] == {
        "lm_head.weight_indices": f"{emb_key}.weight_indices",
        "lm_head.weight_lut": f"{emb_key}.weight_lut",
    }


def test_report_counts_the_tied_tensor_once(pipeline):
    _, make, prepared, model, directory = pipeline
    finalized = torchdkm.report(model, show=False)
    from_file = file_report(directory)
    assert finalized.fp32_bytes == 4 * unique_values(make()) < 4 * sum(t.numel() for t in make().state_dict().values())
    assert [n for n, _ in finalized.tied] == ["lm_head.weight"] and "lm_head.weight" not in [
        r.name for r in finalized.layers
    ]
    assert prepared.to_dict() == finalized.to_dict()
    assert (from_file.fp32_bytes, from_file.compressed_bytes) == (finalized.fp32_bytes, finalized.compressed_bytes)
    assert from_file.tied == finalized.tied
    assert "tied, counted once: lm_head.weight = " in str(finalized)


def test_one_dkm_step_per_forward_and_gradients_from_both_uses():
    torch.manual_seed(0)
    model = torchdkm.prepare(tiny_llama(), DKMConfig.parse("lm_head:3/1"))
    (dkm,) = [p for name, _, _, p in dkm_parametrizations(model) if name == "lm_head"]
    assert [h for h, _ in dkm.holders] == ["lm_head", "model.embed_tokens"]
    model.train()
    weight = model.lm_head.parametrizations.weight.original
    assert weight is model.model.embed_tokens.parametrizations.weight.original
    reference = dkm.soft(weight)  # the soft weight for the stored centroids, computed outside the model
    soft = model.lm_head.weight
    stepped = dkm.centroids.clone()
    assert model.model.embed_tokens.weight is soft  # the second holder reads the same soft weight: no second step
    assert torch.equal(dkm.centroids, stepped) and torch.equal(soft, reference)

    # Gradients of both uses reach the one Parameter: the same as using one soft weight twice by hand.
    with torch.no_grad():
        weight.add_(1e-3 * torch.randn_like(weight))  # as an optimizer step would: the next forward steps again
    leaf = weight.detach().clone().requires_grad_()
    by_hand = dkm.soft(leaf)  # from the stored centroids, which it leaves as they are
    ids = torch.randint(0, 96, (2, 6))
    hidden = model.model(inputs_embeds=torch.nn.functional.embedding(ids, by_hand)).last_hidden_state
    torch.nn.functional.linear(hidden, by_hand).logsumexp(-1).mean().backward()
    assert torch.equal(dkm.centroids, stepped)
    model.zero_grad()
    model(ids).logits.logsumexp(-1).mean().backward()
    torch.testing.assert_close(weight.grad, leaf.grad, rtol=1e-5, atol=1e-8)
    used = torch.zeros(96, dtype=torch.bool)
    used[ids.unique()] = True
    assert bool(weight.grad[~used].abs().sum() > 0) and bool(weight.grad[used].abs().sum() > 0)


def test_gradient_accumulation_steps_again_after_backward():
    torch.manual_seed(0)
    model = torchdkm.prepare(tiny_llama(), DKMConfig.parse("fc:3/1", min_numel=0)).train()
    ids = torch.randint(0, 96, (2, 6))
    for _ in range(3):  # backward frees the graph: a cached soft weight would fail the second backward
        model(ids, labels=ids).loss.backward()
    with torch.no_grad():
        model(ids)  # and a no-grad forward in train mode does not hand its graph-less weight to the next one
    model(ids, labels=ids).loss.backward()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_load_pretrained_builds_the_model_in_its_saved_dtype(dtype, tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().to(dtype).eval()
    compressed = torchdkm.kmeans_compress(model, DKMConfig.parse("fc:3/1#32a, emb:3/1#32a", min_numel=0))
    torchdkm.save_pretrained(compressed, tmp_path)
    loaded = torchdkm.load_pretrained(tmp_path)
    assert torch.get_default_dtype() == torch.float32  # restored
    saved, got = compressed.state_dict(), loaded.state_dict()
    assert saved.keys() == got.keys()
    assert all(got[k].dtype == saved[k].dtype and torch.equal(got[k], saved[k]) for k in saved)
    ids = torch.randint(3, 90, (2, 12))
    with torch.no_grad():  # as transformers' own loader builds it (rotary buffers made in the saved dtype's build)
        auto = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.equal(loaded(input_ids=ids).logits, auto(input_ids=ids).logits)

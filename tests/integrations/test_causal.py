"""Causal-LM compression: token windows, the next-token KL loss, perplexity, and ``torchdkm compress`` on a tiny LLaMA."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

import torchdkm
from torchdkm.cli import main
from torchdkm.errors import TorchdkmError
from torchdkm.integrations import causal, hf

transformers = pytest.importorskip("transformers")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
PASSAGES = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun.",
    "A journey of a thousand miles begins with a single step, and then another one after it.",
    "Whatever you can do, or dream you can, begin it; boldness has genius, power and magic in it.",
] * 6


@pytest.fixture(scope="module")
def tiny_llama_dir(minilm_dir, tmp_path_factory):
    """A 2-layer, 32-wide LLaMA (tied embedding) with MiniLM's tokenizer."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
    )  # fmt: skip
    directory = tmp_path_factory.mktemp("tiny-llama")
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in TOKENIZER:
        shutil.copy2(minilm_dir / name, directory / name)
    return directory


def test_token_windows(minilm_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    windows = causal.token_windows(tokenizer, PASSAGES, 16)
    ids = [t for p in PASSAGES for t in [*tokenizer(p, add_special_tokens=False)["input_ids"], tokenizer.sep_token_id]]
    assert windows.shape == (len(ids) // 16, 16) and windows.flatten().tolist() == ids[: windows.numel()]
    with pytest.raises(TorchdkmError, match="fewer than one window"):
        causal.token_windows(tokenizer, ["short"], 64)


def test_kl_is_zero_only_for_the_same_distribution():
    logits = torch.randn(2, 5, 11)
    assert float(causal.kl_next_token(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(causal.kl_next_token(logits, logits + 3.0)) == pytest.approx(0.0, abs=1e-6)  # softmax shift
    assert float(causal.kl_next_token(torch.randn(2, 5, 11), logits)) > 0.01


def test_perplexity_is_the_exponent_of_the_language_model_loss(tiny_llama_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    windows = torch.randint(0, 30522, (3, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert causal.perplexity(model, windows, batch_size=2) == pytest.approx(math.exp(sum(losses) / 3), rel=1e-5)


def test_compress_a_causal_lm_by_next_token_distillation(tiny_llama_dir, tmp_path, capsys):
    data, held_out = tmp_path / "train.txt", tmp_path / "eval.txt"
    data.write_text("\n".join(PASSAGES))
    held_out.write_text("\n".join(reversed(PASSAGES)))
    argv = ["compress", tiny_llama_dir, "--config", "fc:4/1#16a", "--data", data, "--eval-data", held_out]
    argv += ["--window", "16", "--batch-size", "2", "--max-steps", "2", "--hidden-loss", "0.5", "--out", tmp_path / "out"]
    assert main([str(a) for a in argv]) == 0
    captured = capsys.readouterr()
    assert "distilling next-token distributions on" in captured.err
    line = next(x for x in captured.out.splitlines() if x.startswith("perplexity on"))
    before, after = (float(v) for v in line.split(": ")[1].split(" -> "))
    assert "held-out windows of 16 tokens" in line and math.isfinite(before) and math.isfinite(after)
    model = torchdkm.load_pretrained(tmp_path / "out")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.model.layers[0].mlp.down_proj.palette["weight"].scale_block == 16


def test_compress_with_gptq_starts_from_compensated_weights(tiny_llama_dir, tmp_path, capsys):
    """--gptq: the rounding is compensated on the training windows before the first step, and said."""
    data = tmp_path / "train.txt"
    data.write_text("\n".join(PASSAGES))
    argv = ["compress", tiny_llama_dir, "--config", "fc:3/1#16a", "--gptq", "--data", data, "--window", "16",
            "--batch-size", "2", "--max-steps", "1", "--out", tmp_path / "out"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("GPTQ: ") and "layers" in x)
    before, after = (float(v) for v in line.split("output error ")[1].split(" -> "))
    assert after < before
    assert type(torchdkm.load_pretrained(tmp_path / "out")).__name__ == "LlamaForCausalLM"


def test_a_causal_lm_to_a_target_size_is_planned_by_fisher(tiny_llama_dir, tmp_path, capsys):
    """--target-bpw on a causal LM: the plan weighs errors by the next-token loss's squared gradients, and fits."""
    data = tmp_path / "train.txt"
    data.write_text("\n".join(PASSAGES))
    argv = ["compress", tiny_llama_dir, "--config", "fc:4/1#16a", "--target-bpw", "5", "--data", data,
            "--window", "16", "--batch-size", "2", "--max-steps", "1", "--out", tmp_path / "out"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    err = capsys.readouterr().err
    assert "Fisher" in err and "planned file:" in err
    params = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir).parameters())
    assert (tmp_path / "out" / hf.WEIGHTS).stat().st_size <= 5 * params / 8


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_coreml_call_of_a_causal_lm_is_causal(family):
    """The exported call passes a ready 4-D mask; a causal LM's must mask the future (it attended both ways)."""
    torch.manual_seed(0)
    if family == "llama":
        config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)  # fmt: skip
        model = transformers.LlamaForCausalLM(config).eval()
    else:
        config = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32)
        model = transformers.GPT2LMHeadModel(config).eval()
    wrapper = hf.CoreMLCall(model, 8)
    ids, mask = torch.randint(0, 64, (1, 8)), torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        expected = model(input_ids=ids[:, :6]).logits  # right padding: the first six positions see only themselves
        got = wrapper(ids, mask)
    torch.testing.assert_close(got[:, :6], expected, rtol=1e-5, atol=1e-5)


def test_export_coreml_of_a_compressed_causal_lm(tiny_llama_dir, tmp_path, capsys):
    pytest.importorskip("coremltools")
    model = torchdkm.kmeans_compress(transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_dir), "fc:3/1#16a")
    torchdkm.save_pretrained(model, tmp_path / "dkm")
    out = tmp_path / "tiny.mlpackage"
    assert main(["export", str(tmp_path / "dkm"), "--to", "coreml", "--out", str(out), "--seq-len", "8"]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").is_file()

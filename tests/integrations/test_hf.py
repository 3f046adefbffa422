"""Hugging Face integration: compress, save_pretrained, load_pretrained without model code."""

import math

import pytest
import torch

import torchdkm
from torchdkm.errors import TorchdkmError
from torchdkm.integrations import hf
from torchdkm.integrations.distill import distill, masked_mse, read_sentences
from torchdkm.nn.palettized import palettized_modules
from torchdkm.nn.parametrization import DKMParametrization

SENTENCES = ["A heron stood still at the edge of the water.", "The ferry crosses the strait several times a day."]


def test_minilm_reloads_bit_identical(minilm_dir, tmp_path):
    model, tokenizer = hf.load_hf(minilm_dir)
    reference = hf.embed(model, tokenizer, SENTENCES)
    compressed = torchdkm.kmeans_compress(model, "encoder.layer.0.attention.self.query:4/2, pooler.dense:3/1@64")
    expected = hf.embed(compressed, tokenizer, SENTENCES)
    out = torchdkm.save_pretrained(compressed, tmp_path / "minilm-dkm", source=minilm_dir)

    assert {"config.json", hf.WEIGHTS, "tokenizer.json", "vocab.txt"} <= {p.name for p in out.iterdir()}
    reloaded = torchdkm.load_pretrained(out)
    assert type(reloaded).__name__ == "BertModel" and not reloaded.training
    assert sorted(n for n, _ in palettized_modules(reloaded)) == [
        "encoder.layer.0.attention.self.query",
        "pooler.dense",
    ]
    from transformers import AutoTokenizer

    got = hf.embed(reloaded, AutoTokenizer.from_pretrained(out), SENTENCES)
    assert torch.equal(got, expected)
    assert torch.nn.functional.cosine_similarity(got, reference).min() > 0.9


def test_compress_distills_and_finalizes(tiny_bert_dir):
    compressed, original, tokenizer = hf.compress(
        tiny_bert_dir, "fc:3/1", sentences=SENTENCES * 2, batch_size=2, max_steps=2, max_length=32, progress=False
    )
    assert len(palettized_modules(compressed)) == 2 * 6 + 1  # six Linear per layer, plus the pooler
    assert not palettized_modules(original)
    assert hf.embed(compressed, tokenizer, SENTENCES).shape == (2, 32)


def test_distill_trains_dkm_layers_with_dropout_off(tiny_bert_dir):
    student, tokenizer = hf.load_hf(tiny_bert_dir)
    teacher, _ = hf.load_hf(tiny_bert_dir)
    torchdkm.prepare(student, "fc:2/1")
    seen = []
    hook = lambda module, *_: seen.append((type(module).__name__, module.training))  # noqa: E731
    for module in student.modules():
        if isinstance(module, (DKMParametrization, torch.nn.Dropout)):
            module.register_forward_hook(hook)
    losses = distill(student, teacher, tokenizer, SENTENCES * 3, batch_size=4, epochs=2, progress=False)
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)  # 6 sentences, batches of 4, 2 epochs
    assert {t for name, t in seen if name == "DKMParametrization"} == {True}
    assert {t for name, t in seen if name == "Dropout"} == {False}
    assert not student.training


def test_masked_mse_ignores_padding():
    a, b = torch.zeros(1, 3, 4), torch.zeros(1, 3, 4)
    b[0, 2] = 100.0  # only in the padded position
    assert masked_mse(a, b, torch.tensor([[1, 1, 0]])) == 0


def test_sentences(tmp_path):
    assert len(read_sentences()) >= 300
    (tmp_path / "s.txt").write_text("one\n\n  two  \n")
    assert read_sentences(tmp_path / "s.txt") == ["one", "two"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(TorchdkmError, match="no sentences"):
        read_sentences(tmp_path / "empty.txt")
    with pytest.raises(TorchdkmError, match="no such file"):
        read_sentences(tmp_path / "missing.txt")


def test_errors(tmp_path, minilm_dir):
    with pytest.raises(TorchdkmError, match="no config.json"):
        torchdkm.load_pretrained(tmp_path)
    with pytest.raises(TorchdkmError, match=hf.WEIGHTS):
        torchdkm.load_pretrained(minilm_dir)  # a plain HF directory, not compressed
    with pytest.raises(TorchdkmError, match="transformers model"):
        torchdkm.save_pretrained(torch.nn.Linear(2, 2), tmp_path / "x")
    with pytest.raises(TorchdkmError, match="no config.json"):
        hf.load_hf(tmp_path)


def test_a_model_with_a_head_round_trips(tiny_bert_dir, tmp_path):
    """The class comes from config.architectures: a classifier reloads as a classifier, logits and all."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=3).save_pretrained(tmp_path / "clf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "clf" / name).write_bytes((tiny_bert_dir / name).read_bytes())
    compressed, _, tokenizer = hf.compress(
        tmp_path / "clf", "fc:2/1", sentences=SENTENCES, batch_size=2, max_steps=1, max_length=32, progress=False
    )
    out = torchdkm.save_pretrained(compressed, tmp_path / "clf-dkm", tokenizer=tokenizer)
    reloaded = torchdkm.load_pretrained(out)
    assert type(reloaded) is BertForSequenceClassification
    batch = AutoTokenizer.from_pretrained(out)(SENTENCES, padding=True, return_tensors="pt")
    assert torch.equal(reloaded(**batch).logits, compressed(**batch).logits)
    assert hf.embed(reloaded, tokenizer, SENTENCES).shape == (2, 3)  # the logits themselves

"""``torchdkm compress`` on Hugging Face models, then inspect and export the result."""

import pytest
import torch

import torchdkm
from torchdkm.cli import main
from torchdkm.integrations import hf


@pytest.fixture(scope="module")
def compressed(tiny_bert_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli-hf") / "tiny-dkm"
    data = out.parent / "sentences.txt"
    data.write_text("The river rose quickly.\nShe planted tomatoes.\nThe bus was late.\nA cat sat on the wall.\n")
    argv = ["compress", tiny_bert_dir, "--config", "encoder.*.query:4/2, pooler.dense:3/1", "--data", data]
    argv += ["--batch-size", "2", "--max-length", "32", "--out", out]
    assert main([str(a) for a in argv]) == 0
    return out


def test_compress_writes_a_loadable_directory(compressed, capsys):
    names = {p.name for p in compressed.iterdir()}
    assert {"config.json", hf.WEIGHTS, "tokenizer.json"} <= names
    model = torchdkm.load_pretrained(compressed)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(compressed)
    assert hf.embed(model, tokenizer, ["hello there"]).shape == (1, 32)
    assert main(["inspect", str(compressed)]) == 0
    out = capsys.readouterr().out
    assert "encoder.layer.1.attention.self.query.weight" in out and "4/2" in out and "factor:" in out


def test_compress_minilm_two_steps(minilm_dir, tmp_path, capsys):
    argv = ["compress", minilm_dir, "--config", "encoder.layer.5.output.dense:4/2", "--max-steps", "2"]
    argv += ["--batch-size", "4", "--out", tmp_path / "minilm", "--quiet"]
    assert main([str(a) for a in argv]) == 0
    out = capsys.readouterr().out
    cosine = float(out.split("training sentences): ")[1].split()[0])
    assert 0.9 < cosine < 1  # one layer at 2 bits per weight, two steps: close to the original, not equal
    assert [n for n, _ in torchdkm.nn.palettized.palettized_modules(torchdkm.load_pretrained(tmp_path / "minilm"))] == [
        "encoder.layer.5.output.dense"
    ]


def test_export_coreml_of_a_compressed_directory(compressed, tmp_path, capsys):
    ct = pytest.importorskip("coremltools")
    assert ct is not None
    out = tmp_path / "tiny.mlpackage"
    assert main(["export", str(compressed), "--to", "coreml", "--out", str(out), "--seq-len", "16"]) == 0
    text = capsys.readouterr().out
    assert "2 palettized weights (1 not used by the exported output)" in text  # the queries; the pooler is not
    assert (out / "Data" / "com.apple.CoreML" / "weights" / "weight.bin").is_file()


def test_coreml_wrapper_matches_the_model(compressed):
    model = torchdkm.load_pretrained(compressed)
    wrapper = hf.CoreMLCall(model, 8)
    ids = torch.randint(1000, 2000, (1, 8))
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    expected = model(input_ids=ids, attention_mask=mask)[0]
    assert torch.allclose(wrapper(ids, mask)[:, :5], expected[:, :5], atol=1e-5)


def test_compress_to_a_target_size(tiny_bert_dir, tmp_path, capsys):
    """--target-bpw: the plan is printed, and the written weights file fits the budget, all in."""
    from transformers import AutoModel

    argv = ["compress", tiny_bert_dir, "--config", "fc:4/1, emb:4/1", "--target-bpw", "4.2", "--max-steps", "1"]
    assert main([str(a) for a in [*argv, "--batch-size", "4", "--out", tmp_path / "tiny"]]) == 0
    err = capsys.readouterr().err
    assert "planned file:" in err and "embeddings.word_embeddings.weight" in err
    params = sum(p.numel() for p in AutoModel.from_pretrained(tiny_bert_dir).parameters())
    assert (tmp_path / "tiny" / hf.WEIGHTS).stat().st_size <= 4.2 * params / 8

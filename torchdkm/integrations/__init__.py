"""Integrations with other libraries (optional dependencies, imported on use).

``torchdkm.integrations.hf``: Hugging Face transformers (``pip install 'torchdkm[hf]'``).
"""

"""Hugging Face transformers: compress a model, save it, rebuild it without writing model code.

A torchdkm pretrained directory holds ``config.json`` (the transformers config,
whose ``architectures`` names the model class and whose ``quantization_config``
lets transformers' own ``from_pretrained`` read the directory, see
:mod:`torchdkm.integrations.hf_quantizer`), ``model.safetensors`` (the torchdkm
file) and, for convenience, the tokenizer files.  :func:`load_pretrained`
builds the architecture from the config (random weights, no download) and
fills it from the torchdkm file, which is all the model code a user needs.
Everything works offline: directories are local, nothing touches the Hub.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import inspect
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..api import finalize, prepare
from ..budget import plan_to_size
from ..config import DKMConfig
from ..errors import TorchdkmError
from ..feedback import gptq as compensate
from ..io import load, save, saved_dtype
from ..io.format import WEIGHTS, weights_path
from . import causal
from .distill import distill, read_sentences
from .hf_quantizer import quantization_config_dict

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise TorchdkmError("Hugging Face support needs transformers: pip install 'torchdkm[hf]'") from None
    return transformers


def _model_class(config: Any) -> Any:
    """The transformers class ``config.architectures`` names, or ``None``."""
    names = getattr(config, "architectures", None) or []
    return getattr(_transformers(), names[0], None) if names else None


def load_hf(directory: str | os.PathLike) -> tuple[nn.Module, Any]:
    """A Hugging Face model directory's model (class from ``config.architectures``) and tokenizer."""
    transformers = _transformers()
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise TorchdkmError(f"{directory}: not a Hugging Face model directory (no config.json)")
    config = transformers.AutoConfig.from_pretrained(directory)
    cls = _model_class(config) or transformers.AutoModel
    model = cls.from_pretrained(directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    return model.eval(), tokenizer


def save_pretrained(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    tokenizer: Any = None,
    source: str | os.PathLike | None = None,
) -> Path:
    """Write a finalized transformers model to ``directory`` for :func:`load_pretrained`; returns it.

    ``tokenizer`` (saved with its ``save_pretrained``) or ``source`` (a model
    directory whose tokenizer files are copied) makes the directory
    self-contained for inference.
    """
    if not hasattr(model, "config") or not hasattr(model.config, "to_json_file"):
        raise TorchdkmError("save_pretrained: expected a transformers model (with a .config)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.quantization_config = quantization_config_dict()  # AutoModel.from_pretrained: hf_quantizer.py
    config.save_pretrained(directory)
    save(model, directory / WEIGHTS)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    elif source is not None:
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copy2(Path(source) / name, directory / name)
    return directory


def load_pretrained(directory: str | os.PathLike, *, model_class: Any = None) -> nn.Module:
    """Rebuild a model saved by :func:`save_pretrained` (or ``torchdkm compress``), in eval mode.

    The class is ``model_class``, else ``config.architectures[0]``, else ``AutoModel``; it is built in the
    dtype the model was saved in (its LUTs': a bfloat16 model comes back bfloat16).
    """
    transformers = _transformers()
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise TorchdkmError(f"{directory}: not a torchdkm pretrained directory (no config.json)")
    weights = weights_path(directory)
    config = transformers.AutoConfig.from_pretrained(directory)
    config.quantization_config = None  # built dense here, then filled by torchdkm.load
    cls = model_class or _model_class(config)
    with _skip_init(), _default_dtype(saved_dtype(weights)):
        model = cls(config) if cls is not None else transformers.AutoModel.from_config(config)
    return load(weights, model).eval()


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Build in ``dtype`` (as transformers' ``from_pretrained`` does with ``dtype=``), then restore the default."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _skip_init() -> contextlib.AbstractContextManager:
    """transformers' switch for building a model without initialising its weights, where it has one.

    Every weight is then read from the file, and a weight never written is never resident: a compressed
    SmolLM2-135M loads within its file's size plus a few MiB, not the dense model's 540 MB first
    (``python -m bench.inference --smollm2``, the peak-memory rows).  Buffers computed in ``__init__``
    (rotary frequencies) are still computed, unlike on the meta device.
    """
    try:
        initialization = importlib.import_module("transformers.initialization")
    except ImportError:
        return contextlib.nullcontext()
    no_init = getattr(initialization, "no_init_weights", None)
    return no_init() if no_init is not None else contextlib.nullcontext()


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, sentences: list[str], *, max_length: int = 128) -> Tensor:
    """Sentence embeddings: mean of the last hidden states over real tokens (sentence-transformers' pooling).

    A model whose first output is already one vector per sentence (a classification head) returns it as is.
    """
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    hidden = model(**batch)[0]
    if hidden.dim() != 3:
        return hidden
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1)


def compress(
    directory: str | os.PathLike,
    config: DKMConfig | str,
    *,
    sentences: list[str] | None = None,
    epochs: int = 1,
    batch_size: int = 16,
    lr: float = 1e-4,
    max_length: int = 128,
    max_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    target_bpw: float | None = None,
    window: int = 256,
    hidden_weight: float = 0.0,
    gptq: bool = False,
) -> tuple[nn.Module, nn.Module, Any]:
    """Load a Hugging Face model, DKM-compress it by distillation from itself; returns (compressed, original, tokenizer).

    ``sentences`` default to the built-in sample.  The compressed model is finalized (packed indices + LUTs).
    ``target_bpw``: choose each layer's bits so that the file holds at most that many bits per parameter,
    all in (:func:`torchdkm.plan_to_size`, ``config`` selecting the layers; calibrated on the sentences).
    A causal LM (``*ForCausalLM``) learns the teacher's next-token distributions on ``window``-token
    windows of the sentences (:mod:`.causal`; ``batch_size`` windows a step, ``hidden_weight`` adds the
    last hidden states' MSE); an encoder, its outputs on the sentences (:mod:`.distill`).
    ``gptq``: before training, :func:`torchdkm.gptq` on up to 64 windows (an encoder: 64 sentences), the
    layers' inputs the original model's (one pass), so DKM starts from error-compensated weights.
    """
    say = print if progress else (lambda *args, **kwargs: None)
    say(f"loading {directory} ...", file=sys.stderr, flush=True)
    teacher, tokenizer = load_hf(directory)
    sentences = read_sentences() if sentences is None else sentences
    windows = causal.token_windows(tokenizer, sentences, window) if causal.is_causal_lm(teacher) else None
    if target_bpw is not None:
        say(f"planning {target_bpw} bits per parameter (k-means per layer and option) ...", file=sys.stderr, flush=True)
        if windows is not None:  # a causal LM: its next-token loss on a few windows weighs the errors (Fisher)
            run = functools.partial(causal.window_losses, windows=causal.spread(windows, 8))
        else:
            batch = tokenizer(sentences[:16], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            run = lambda model: model(**batch)  # noqa: E731
        plan = plan_to_size(teacher, target_bpw, config, calibration=run, fisher=windows is not None)
        say(str(plan), file=sys.stderr, flush=True)
        config, importance = plan.config, plan.importance  # (Fisher: the k-means weighs what the plan measured)
    else:
        importance = None
    say(f"loaded {type(teacher).__name__}; initialising the centroids by k-means ...", file=sys.stderr, flush=True)
    student = prepare(copy.deepcopy(teacher), config, progress=progress, importance=importance)
    if gptq:
        say("GPTQ: compensating the rounding on the calibration ...", file=sys.stderr, flush=True)
        if windows is not None:
            chosen = causal.spread(windows, 64)
            run = lambda model: [model(input_ids=part) for part in chosen.split(batch_size)]  # noqa: E731
        else:
            batch = tokenizer(sentences[:64], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            run = lambda model: model(**batch)  # noqa: E731
        say(f"GPTQ: {compensate(student, run, reference=teacher).summary()}", file=sys.stderr, flush=True)
    if windows is not None:
        say(f"distilling next-token distributions on {len(windows)} windows of {window} tokens", file=sys.stderr)
        causal.distill_causal(
            student, teacher, windows, epochs=epochs, batch_size=batch_size, lr=lr, max_steps=max_steps,
            seed=seed, hidden_weight=hidden_weight, progress=progress,
        )  # fmt: skip
    else:
        distill(
            student,
            teacher,
            tokenizer,
            sentences,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            max_length=max_length,
            max_steps=max_steps,
            seed=seed,
            progress=progress,
        )
    return finalize(student).eval(), teacher, tokenizer


class CoreMLCall(nn.Module):
    """A fixed-length call of an encoder or a causal LM that coremltools converts.

    transformers builds position ids and the attention mask with ops the Core
    ML converter lacks; passing explicit ids and a ready additive 4-D mask
    avoids them.  A 4-D mask is used as given, so a causal LM's adds the causal
    part (future positions masked; without it the export attended both ways).
    Returns the model's first output (``last_hidden_state``, a causal LM's logits).
    """

    def __init__(self, model: nn.Module, seq_len: int):
        super().__init__()
        self.model = model
        self.seq_len = seq_len
        names = inspect.signature(model.forward).parameters
        ids = torch.arange(seq_len).unsqueeze(0)
        self.causal = causal.is_causal_lm(model)
        # (token type ids: an encoder's default; GPT-2 would add an embedding row for them)
        self.extra = [n for n in ("position_ids", "token_type_ids") if n in names and not (self.causal and n == "token_type_ids")]
        self.register_buffer("position_ids", ids, persistent=False)
        self.register_buffer("token_type_ids", torch.zeros_like(ids), persistent=False)
        future = torch.full((seq_len, seq_len), -1e4).triu(1) if self.causal else torch.zeros(seq_len, seq_len)
        self.register_buffer("future", future[None, None], persistent=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        mask = (1.0 - attention_mask[:, None, None, :].float()) * -1e4  # finite in fp16
        mask = mask.expand(-1, 1, self.seq_len, self.seq_len) + self.future
        extra: dict[str, Any] = {n: getattr(self, n) for n in self.extra}
        if self.causal:
            extra["use_cache"] = False  # (a cache is no tensor output)
        return self.model(input_ids=input_ids, attention_mask=mask, **extra)[0]


def export_coreml(model: nn.Module, path: str | os.PathLike, *, seq_len: int = 128, **options: Any) -> Any:
    """Convert a compressed transformers encoder or causal LM to Core ML (inputs ``input_ids``,
    ``attention_mask`` of ``(1, seq_len)``; output the first: hidden states, or a causal LM's logits)."""
    from ..io.coreml import export_coreml as convert

    example = (torch.zeros(1, seq_len, dtype=torch.long), torch.ones(1, seq_len, dtype=torch.long))
    wrapper = CoreMLCall(model, seq_len).eval()
    return convert(wrapper, example, path, input_names=["input_ids", "attention_mask"], **options)


__all__ = ["compress", "embed", "export_coreml", "load_hf", "load_pretrained", "save_pretrained"]

"""transformers' own ``from_pretrained`` for torchdkm directories, through its quantizer extension point.

A directory written by :func:`torchdkm.save_pretrained` carries
``"quantization_config": {"quant_method": "torchdkm", ...}`` in ``config.json``
and the torchdkm file under the name transformers looks for,
``model.safetensors``.  transformers' supported hooks for quantization methods
(``register_quantization_config`` / ``register_quantizer`` in
``transformers.quantizers.auto``) let ``AutoModel.from_pretrained(dir)`` hand
the model to :class:`TorchdkmHfQuantizer` twice:

* before the weights are loaded it reads the file's palette metadata (no
  tensor data) and swaps each palettized layer for its palettized class with
  empty index and LUT buffers of the right shapes, so transformers' loader
  fills them like any other tensor (the memory stays compressed);
* after loading it reads the file once more through :func:`torchdkm.io.read`
  (checksums verified) and loads every tensor with ``strict=True``, so the
  model is exactly what :func:`torchdkm.load_pretrained` returns.

Tied weights: transformers ties ``Parameter``s (``lm_head.weight`` =
``model.embed_tokens.weight``); a palettized tied tensor is one pair of index
and LUT buffers held by both modules, stored once in the file.  The quantizer
takes the palettized pairs out of transformers' tying map (it would look for a
``Parameter`` that is no longer there), tells its loader that the second
holder's buffers are absent from the file on purpose (so its report does not
call them missing and re-initialised), and torchdkm's load ties the buffers.

Registration needs transformers imported.  ``import torchdkm`` registers at
once when transformers is already imported, and otherwise when it is (an
import hook: torchdkm's own import does not pay for transformers').
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from safetensors import safe_open
from torch import nn

from ..errors import TorchdkmError
from ..io.format import FORMAT, load_into_palettized, palettize_from_meta

QUANT_METHOD = "torchdkm"
_REGISTERED: list[bool] = []


def quantization_config_dict() -> dict[str, Any]:
    """What ``save_pretrained`` writes into ``config.json`` as ``quantization_config``."""
    from .. import __version__

    return {"quant_method": QUANT_METHOD, "torchdkm_version": __version__}


def register() -> None:
    """Register torchdkm's quantization config and quantizer with transformers (once)."""
    if _REGISTERED:
        return
    from transformers.quantizers import HfQuantizer
    from transformers.quantizers.auto import register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    @register_quantization_config(QUANT_METHOD)
    @dataclass
    class TorchdkmConfig(QuantizationConfigMixin):
        """``quantization_config`` of a torchdkm directory: the method, and the version that wrote it."""

        quant_method: str = QUANT_METHOD
        torchdkm_version: str | None = None

    @register_quantizer(QUANT_METHOD)
    class TorchdkmHfQuantizer(HfQuantizer):
        """Palettized modules before loading, torchdkm's verified load after (see the module docstring)."""

        requires_calibration = True  # loads torchdkm files only; it does not quantize dense weights

        def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs) -> None:
            self.path = single_checkpoint(checkpoint_files)
            meta = read_meta(self.path)
            palettize_from_meta(self.path, model, meta)
            untie_for_transformers(model, meta)

        def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
            load_into_palettized(self.path, model)
            return model

        def is_serializable(self) -> bool:
            return False  # transformers' save_pretrained would write a file torchdkm did not check

        @property
        def is_trainable(self) -> bool:
            return False  # palettized weights are decoded from buffers

    _REGISTERED.append(True)


def untie_for_transformers(model: nn.Module, meta: dict[str, Any]) -> None:
    """Leave palettized tied tensors to torchdkm (see the module docstring)."""
    palettized = {f"{name}.{p}" if name else p for name, entry in meta["layers"].items() for p in entry["params"]}
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        model.all_tied_weights_keys = {k: v for k, v in tied.items() if k not in palettized and v not in palettized}
    stored_once = {re.escape(key) for key in meta["aliases"] if key.rpartition("_")[0] in palettized}
    if stored_once:
        model._keys_to_ignore_on_load_missing = list(model._keys_to_ignore_on_load_missing or []) + [
            f"^{key}$" for key in sorted(stored_once)
        ]


def single_checkpoint(files: Any) -> str:
    if not files or len(files) != 1:
        raise TorchdkmError(f"torchdkm quantizer: expected one checkpoint file (model.safetensors), got {files!r}")
    return str(files[0])


def read_meta(path: str) -> dict[str, Any]:
    """The torchdkm metadata of a file, without reading its tensors."""
    with safe_open(path, framework="pt") as handle:
        header = handle.metadata() or {}
    if FORMAT not in header:
        raise TorchdkmError(f"{path}: config.json says quant_method 'torchdkm' but the file has no torchdkm metadata")
    return json.loads(header[FORMAT])


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Runs :func:`register` right after ``transformers`` itself is imported."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "transformers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            register()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def register_when_transformers_loads() -> None:
    """Register now if transformers is imported, else as soon as it is; nothing if it is not installed."""
    if "transformers" in sys.modules:
        register()
    elif importlib.machinery.PathFinder.find_spec("transformers") is not None:
        if not any(isinstance(f, _RegisterOnImport) for f in sys.meta_path):
            sys.meta_path.insert(0, _RegisterOnImport())


__all__ = ["QUANT_METHOD", "quantization_config_dict", "register", "register_when_transformers_loads"]

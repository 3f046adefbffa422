"""torchdkm: train-time weight clustering (DKM) for any PyTorch model.

model = torchdkm.prepare(model, "cv:6/6, fc:6/4")   # attach DKM
...train with your own loop and loss...
model = torchdkm.finalize(model)                      # packed indices + LUTs
torchdkm.report(model); torchdkm.save(model, "model.dkm.safetensors")
"""

from .api import finalize, kmeans_compress, prepare
from .config import DKMConfig, LayerConfig
from .errors import TorchdkmError
from .integrations.hf import load_pretrained, save_pretrained
from .io import load, save
from .nn import keep_decoded
from .report import Report, report

__version__ = "0.1.0"

__all__ = [
    "keep_decoded",
    "DKMConfig",
    "LayerConfig",
    "Report",
    "TorchdkmError",
    "finalize",
    "kmeans_compress",
    "load",
    "load_pretrained",
    "prepare",
    "report",
    "save",
    "save_pretrained",
]

"""torchdkm: train-time weight clustering (DKM) for any PyTorch model.

model = torchdkm.prepare(model, "cv:6/6, fc:6/4")   # attach DKM
...train with your own loop and loss...
model = torchdkm.finalize(model)                      # packed indices + LUTs
torchdkm.report(model); torchdkm.save(model, "model.dkm.safetensors")
"""

from .api import finalize, kmeans_compress, prepare
from .budget import SizePlan, plan_to_size
from .config import DKMConfig, LayerConfig
from .errors import TorchdkmError
from .feedback import GPTQReport, gptq
from .importance import fisher
from .integrations.hf import load_pretrained, save_pretrained
from .integrations.hf_quantizer import register_when_transformers_loads
from .io import load, save
from .nn import keep_decoded
from .report import Report, report
from .schedule import TauSchedule

__version__ = "0.1.0"

register_when_transformers_loads()  # AutoModel.from_pretrained reads torchdkm directories

__all__ = [
    "keep_decoded",
    "DKMConfig",
    "GPTQReport",
    "LayerConfig",
    "Report",
    "SizePlan",
    "TauSchedule",
    "TorchdkmError",
    "finalize",
    "fisher",
    "gptq",
    "kmeans_compress",
    "load",
    "load_pretrained",
    "plan_to_size",
    "prepare",
    "report",
    "save",
    "save_pretrained",
]

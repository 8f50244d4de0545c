"""relu-opt: find the ReLUs a model does not need for private inference, and prove the saving."""

import os
import sys

if "torch" not in sys.modules:  # torch's C++ warnings (a peer's closed socket: 50 stack frames) drown our one line
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from relu_opt.api import count, export, load, optimize
from relu_opt.errors import ReluOptError
from relu_opt.export import ExportResult
from relu_opt.models import create_model, list_models, register_model
from relu_opt.passes.census import Census, Site

__version__ = "0.1.0"

__all__ = [
    "Census",
    "ExportResult",
    "ReluOptError",
    "Site",
    "count",
    "create_model",
    "export",
    "list_models",
    "load",
    "optimize",
    "register_model",
]

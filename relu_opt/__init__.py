"""relu-opt: find the non-linearities a model does not need for private inference, and prove the saving.

The public API is what this module exports; relu_opt.api documents each function."""

import os
import sys

if "torch" not in sys.modules:  # torch's C++ warnings (a peer's closed socket: 50 stack frames) drown our one line
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

from relu_opt import distributed  # noqa: F401 (relu_opt.distributed: rank, is_main, on_main)
from relu_opt.api import (
    Loaded,
    ModelInfo,
    TrainOutcome,
    bench,
    check_optimize,
    check_writable,
    count,
    export,
    link,
    load,
    load_model,
    optimize,
    rank,
    report,
    run,
    train,
    write_json,
    zoo,
)
from relu_opt.backends import DEFAULT_BACKEND, HostRole, Network, Pricing, list_backends, parse_network
from relu_opt.encrypted import BenchResult
from relu_opt.errors import ConfigError, ReluOptError
from relu_opt.models import create_model, list_models, register_model
from relu_opt.onnx_export import DEFAULT_OPSET, ExportResult
from relu_opt.optimizer import OptimizeConfig, OptimizeResult
from relu_opt.passes.census import Census, Site
from relu_opt.pipeline import RunConfig, RunResult
from relu_opt.ranking import Criticality
from relu_opt.training import TrainConfig, TrainingInterrupted

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_BACKEND",
    "DEFAULT_OPSET",
    "BenchResult",
    "Census",
    "ConfigError",
    "Criticality",
    "ExportResult",
    "HostRole",
    "Loaded",
    "ModelInfo",
    "Network",
    "OptimizeConfig",
    "OptimizeResult",
    "Pricing",
    "list_backends",
    "ReluOptError",
    "RunConfig",
    "RunResult",
    "Site",
    "TrainConfig",
    "TrainOutcome",
    "TrainingInterrupted",
    "bench",
    "check_optimize",
    "check_writable",
    "count",
    "create_model",
    "export",
    "link",
    "list_models",
    "load",
    "load_model",
    "zoo",
    "optimize",
    "parse_network",
    "rank",
    "register_model",
    "report",
    "run",
    "train",
    "write_json",
]

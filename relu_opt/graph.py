"""The graph view of a model: fx tracing with user-named leaves, and shape propagation."""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Iterable, Iterator

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from relu_opt.errors import InputShapeError, TraceError

_TORCH_DIR = os.path.dirname(torch.__file__)
_PKG_DIR = os.path.dirname(__file__)

# Module types fx must not trace into (our own activation modules register here), so that each
# one stays a single node that passes and the census can recognise.
_LEAF_TYPES: set[type] = set()


def register_leaf(cls: type) -> type:
    """Make instances of `cls` fx leaves in every relu-opt trace; returns `cls`."""
    _LEAF_TYPES.add(cls)
    return cls


def register_leaves(model: nn.Module, names: Iterable[str]) -> None:
    """Make the module classes `names` (class names, or submodule names whose class is meant) fx leaves
    in every later trace of this process: optimize, rank and bench trace the model again."""
    by_name = dict(model.named_modules())
    for m in model.modules():
        if type(m).__name__ in names:
            register_leaf(type(m))
    for name in names:
        if name in by_name:
            register_leaf(type(by_name[name]))


def user_leaves(model: nn.Module) -> tuple[str, ...]:
    """Return the class names of `model`'s modules registered as leaves that are not relu-opt's own."""
    mine = {type(m) for m in model.modules() if type(m) in _LEAF_TYPES}
    return tuple(sorted(c.__name__ for c in mine if not c.__module__.startswith("relu_opt")))


class ReluOptTracer(fx.Tracer):
    """An fx Tracer that keeps named module classes opaque and remembers where tracing broke."""

    def __init__(self, leaf: Iterable[str | type] = ()) -> None:
        super().__init__()
        self.leaf_names = {x if isinstance(x, str) else x.__name__ for x in leaf}
        self._stack: list[tuple[str, str]] = []
        self.failed_in: tuple[str, str] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, tuple(_LEAF_TYPES)) or type(m).__name__ in self.leaf_names:
            return True
        return qualname in self.leaf_names or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self._stack.append((self.path_of_module(m), type(m).__name__))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self._stack[-1]
            raise
        finally:
            self._stack.pop()


def _user_frame(exc: BaseException) -> traceback.FrameSummary | None:
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith((_TORCH_DIR, _PKG_DIR)) and "<" not in f.filename
    ]
    return frames[-1] if frames else None


def trace(model: nn.Module, leaf: Iterable[str | type] = ()) -> fx.GraphModule:
    """Return an fx GraphModule of `model`; raise TraceError naming the module and line that broke."""
    if isinstance(model, fx.GraphModule) and not leaf:
        return model
    tracer = ReluOptTracer(leaf)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        name, cls = tracer.failed_in or ("", type(model).__name__)
        where = f"module '{name}' ({cls})" if name else f"the top-level module ({cls})"
        frame = _user_frame(exc)
        line = f" at {frame.filename}:{frame.lineno}: `{(frame.line or '').strip()}`" if frame else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"torch.fx cannot trace {where}{line} ({first}). Mark it a leaf so it runs as one opaque "
            f"call: --leaf {cls} on the CLI, or leaf=['{cls}'] in the API"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block and restore each submodule's mode after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.train(training)


def propagate_shapes(gm: fx.GraphModule, example: torch.Tensor) -> fx.GraphModule:
    """Run `gm` once on `example` (eval mode, no grad) and store tensor_meta on every node."""
    with eval_mode(gm), torch.no_grad():
        ShapeProp(gm).propagate(example.clone())
    return gm


def parse_input_shape(text: str | Iterable[int]) -> tuple[int, ...]:
    """Return the input shape from '1,3,32,32' (or a sequence); raise InputShapeError if malformed."""
    if not isinstance(text, str):
        items = list(text) if isinstance(text, list | tuple | torch.Size) else None
        if items is None or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
            raise InputShapeError(f"input shape {text!r} must be integers, e.g. (1, 3, 32, 32) or '1,3,32,32'")
        shape = tuple(items)
    else:
        try:
            shape = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
        except ValueError:
            raise InputShapeError(
                f"--input-shape '{text}' is not a list of integers; write it like 1,3,32,32"
            ) from None
    if len(shape) < 2 or any(v <= 0 for v in shape):
        raise InputShapeError(f"input shape {shape} must have a batch dimension and positive sizes, e.g. 1,3,32,32")
    return shape

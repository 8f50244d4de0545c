"""The op table: one record per non-linear kind, read by every part of relu-opt that needs op knowledge.

For each kind: its PyTorch spellings (module classes, functions, tensor methods), the ONNX ops an export
turns it into, its elements per sample (the output elements, one unit everywhere; max-pool counts its
comparisons, k-1 per output), the plaintext function it computes, its secure comparisons per element,
and its cost category under MPC. The fx census, the ONNX census, the cost models, calibration and the
backends' lowerings all read this table, so adding a kind is one `register_kind(OpKind(...))`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

# Cost categories under MPC. "polynomial" kinds are only multiplications; every other category needs
# comparisons or an iterative approximation, and is what the optimizer replaces by default.
COMPARISON = "comparison"
TRANSCENDENTAL = "transcendental"  # exp / sigmoid / erf approximations: many rounds per site
SOFTMAX = "softmax"  # exp, a sum and a reciprocal per row
NORMALIZATION = "normalization"  # an inverse square root per row
POLYNOMIAL = "polynomial"
COST_CATEGORIES = (COMPARISON, TRANSCENDENTAL, SOFTMAX, NORMALIZATION, POLYNOMIAL)

KIND_META = "relu_opt_ops"  # node.meta key: ((kind, elements per sample), ...) of the node


@dataclass(frozen=True)
class OpKind:
    """One non-linear kind: how to recognise it, count it, compute it and what it costs under MPC."""

    name: str
    cost: str
    fn: Callable[[Tensor], Tensor] | None = None  # the plaintext function (elementwise kinds: of x)
    modules: tuple[type, ...] = ()
    functions: tuple[Callable, ...] = ()
    methods: tuple[str, ...] = ()
    onnx_ops: tuple[str, ...] = ()
    comparisons: int = 0  # secure comparisons per element (per counted comparison for max-pool)
    elementwise: bool = True  # y_i depends on x_i only: polynomials can be fitted, masks can split it
    exact_onnx: bool = False  # the exported ONNX graph must count exactly what the fx census counts
    fix: str = ""  # what to do where a backend cannot run it (empty: optimize it away, see `fix_for`)
    description: str = ""

    @property
    def polynomial(self) -> bool:
        return self.cost == POLYNOMIAL


_KINDS: dict[str, OpKind] = {}
# Spellings whose kind depends on their arguments (clamp(min=0) is a ReLU, clamp(0, 6) a ReLU6).
_FUNCTION_RESOLVERS: dict[Callable, Callable[[fx.Node], str | None]] = {}
_METHOD_RESOLVERS: dict[str, Callable[[fx.Node], str | None]] = {}


def register_kind(kind: OpKind) -> OpKind:
    """Add (or replace) a kind in the table; returns it. Its spellings then count everywhere."""
    if kind.cost not in COST_CATEGORIES:
        raise ValueError(f"kind '{kind.name}': unknown cost category '{kind.cost}'; use one of {COST_CATEGORIES}")
    _KINDS[kind.name] = kind
    return kind


def unregister_kind(name: str) -> None:
    """Remove a kind from the table (tests use this to undo `register_kind`)."""
    _KINDS.pop(name, None)


def get_kind(name: str) -> OpKind:
    """Return the table entry of kind `name` (KeyError naming the known kinds if absent)."""
    try:
        return _KINDS[name]
    except KeyError:
        raise KeyError(f"unknown non-linear kind '{name}'; known: {', '.join(sorted(_KINDS))}") from None


def all_kinds() -> list[OpKind]:
    """Return every registered kind, in registration order."""
    return list(_KINDS.values())


def kind_names(polynomial: bool | None = None) -> list[str]:
    """Return the registered kind names; only (non-)polynomial ones when `polynomial` is given."""
    return [k.name for k in _KINDS.values() if polynomial is None or k.polynomial == polynomial]


def fix_for(name: str) -> str:
    """Return what a user does where a backend cannot run kind `name`: the table's fix, else optimize it."""
    entry = _KINDS.get(name)
    return (entry.fix if entry else "") or f"replace it: relu-opt optimize --kinds {name}"


def find_kind(name: str) -> OpKind | None:
    """Return the table entry of kind `name`, or None when no such kind is registered."""
    return _KINDS.get(name)


def comparisons_per_element(kind: str) -> int:
    """Return the secure comparisons one element of `kind` costs (0 for unknown kinds)."""
    k = _KINDS.get(kind)
    return k.comparisons if k else 0


def node_arg(node: fx.Node, index: int, name: str, default=None):
    """Return a call node's argument by keyword `name`, else by position `index`, else `default`."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _clamp_kind(node: fx.Node) -> str | None:
    name = node.target if isinstance(node.target, str) else node.target.__name__
    lo = node_arg(node, 1, "min")
    hi = None if "clamp_min" in name else node_arg(node, 2, "max")
    return bounds_kind(lo, hi)


def bounds_kind(lo, hi) -> str:
    """Return the kind of clamp(x, lo, hi): relu for (0, None), relu6 for (0, 6), else hardtanh/clamp."""
    if isinstance(lo, (int, float)) and lo == 0 and hi is None:
        return "relu"
    if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo == 0 and hi == 6:
        return "relu6"
    return "hardtanh" if lo is not None and hi is not None else "clamp"


def _threshold_kind(node: fx.Node) -> str:
    return "relu" if node_arg(node, 1, "threshold") == 0 and node_arg(node, 2, "value") == 0 else "clamp"


for _f in (torch.clamp, torch.clip, torch.clamp_, torch.clamp_min, torch.clamp_min_):
    _FUNCTION_RESOLVERS[_f] = _clamp_kind
for _m in ("clamp", "clamp_", "clip", "clip_", "clamp_min", "clamp_min_"):
    _METHOD_RESOLVERS[_m] = _clamp_kind
_FUNCTION_RESOLVERS[F.threshold] = _threshold_kind


def node_kind(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Return the kind of a standard non-linear op node (None for anything else)."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        best, depth = None, math.inf
        for k in _KINDS.values():  # the most specific class wins: ReLU6 over its base Hardtanh
            for cls in k.modules:
                if isinstance(mod, cls) and type(mod).__mro__.index(cls) < depth:
                    best, depth = k.name, type(mod).__mro__.index(cls)
        return best
    if node.op == "call_function":
        if node.target in _FUNCTION_RESOLVERS:
            return _FUNCTION_RESOLVERS[node.target](node)
        return next((k.name for k in _KINDS.values() if node.target in k.functions), None)
    if node.op == "call_method":
        if node.target in _METHOD_RESOLVERS:
            return _METHOD_RESOLVERS[node.target](node)
        return next((k.name for k in _KINDS.values() if node.target in k.methods), None)
    return None


def onnx_kind(op_type: str) -> str | None:
    """Return the kind an ONNX op type counts as (Clip is resolved by its bounds, elsewhere)."""
    return next((k.name for k in _KINDS.values() if op_type in k.onnx_ops), None)


# ---- the table --------------------------------------------------------------------------------------
_MAXPOOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_FIX_POLY = "replace it: relu-opt optimize --kinds {name} (a polynomial fitted to it at each site)"

for _k in (
    OpKind(
        "relu",
        COMPARISON,
        torch.relu,
        modules=(nn.ReLU,),
        functions=(torch.relu, torch.relu_, F.relu, F.relu_),
        methods=("relu", "relu_"),
        onnx_ops=("Relu",),
        comparisons=1,
        exact_onnx=True,
        description="max(x, 0)",
    ),
    OpKind(
        "relu6",
        COMPARISON,
        F.relu6,
        modules=(nn.ReLU6,),
        functions=(F.relu6,),
        comparisons=2,
        exact_onnx=True,
        description="min(max(x, 0), 6), also clamp(x, 0, 6)",
    ),
    OpKind(
        "hardtanh",
        COMPARISON,
        F.hardtanh,
        modules=(nn.Hardtanh,),
        functions=(F.hardtanh, F.hardtanh_),
        comparisons=2,
        exact_onnx=True,
        description="clamp(x, lo, hi)",
    ),
    OpKind("clamp", COMPARISON, None, comparisons=1, exact_onnx=True, description="clamp with one bound"),
    OpKind(
        "leaky_relu",
        COMPARISON,
        F.leaky_relu,
        modules=(nn.LeakyReLU,),
        functions=(F.leaky_relu, F.leaky_relu_),
        onnx_ops=("LeakyRelu",),
        comparisons=1,
        exact_onnx=True,
    ),
    OpKind(
        "prelu",
        COMPARISON,
        None,  # its slope is a parameter of the site
        modules=(nn.PReLU,),
        functions=(F.prelu, torch.prelu),
        onnx_ops=("PRelu",),
        comparisons=1,
        exact_onnx=True,
    ),
    OpKind(
        "maxpool",
        COMPARISON,
        None,
        modules=_MAXPOOLS,
        functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d),
        onnx_ops=("MaxPool",),
        comparisons=1,  # its elements are already comparisons: k - 1 per output
        elementwise=False,
        exact_onnx=True,
        description="counted in comparisons: k - 1 per output",
    ),
    OpKind(
        "hardswish",
        COMPARISON,
        F.hardswish,
        modules=(nn.Hardswish,),
        functions=(F.hardswish,),
        onnx_ops=("HardSwish",),
        comparisons=2,
        exact_onnx=True,
        description="x * clip(x + 3, 0, 6) / 6",
    ),
    OpKind(
        "hardsigmoid",
        COMPARISON,
        F.hardsigmoid,
        modules=(nn.Hardsigmoid,),
        functions=(F.hardsigmoid,),
        onnx_ops=("HardSigmoid",),
        comparisons=2,
        exact_onnx=True,
    ),
    OpKind(
        "gelu",
        TRANSCENDENTAL,
        F.gelu,
        modules=(nn.GELU,),
        functions=(F.gelu,),
        onnx_ops=("Gelu", "Erf"),
        description="x * Phi(x); exported as Erf",
    ),
    OpKind(
        "silu",
        TRANSCENDENTAL,
        F.silu,
        modules=(nn.SiLU,),
        functions=(F.silu,),
        onnx_ops=(),  # exported as Sigmoid * x: the ONNX census fuses the pair back into one silu
        description="x * sigmoid(x)",
    ),
    OpKind(
        "mish",
        TRANSCENDENTAL,
        F.mish,
        modules=(nn.Mish,),
        functions=(F.mish,),
        onnx_ops=("Mish",),  # or Softplus -> Tanh -> Mul, fused by the ONNX census
        fix=_FIX_POLY.format(name="mish"),
    ),
    OpKind(
        "elu",
        TRANSCENDENTAL,
        F.elu,
        modules=(nn.ELU, nn.SELU, nn.CELU),
        functions=(F.elu, F.selu, F.celu),
        onnx_ops=("Elu", "Selu", "Celu"),
        fix=_FIX_POLY.format(name="elu"),
    ),
    OpKind(
        "softplus",
        TRANSCENDENTAL,
        F.softplus,
        modules=(nn.Softplus,),
        functions=(F.softplus,),
        onnx_ops=("Softplus",),
        fix=_FIX_POLY.format(name="softplus"),
    ),
    OpKind(
        "sigmoid",
        TRANSCENDENTAL,
        torch.sigmoid,
        modules=(nn.Sigmoid,),
        functions=(torch.sigmoid, F.sigmoid),
        methods=("sigmoid", "sigmoid_"),
        onnx_ops=("Sigmoid",),
    ),
    OpKind(
        "tanh",
        TRANSCENDENTAL,
        torch.tanh,
        modules=(nn.Tanh,),
        functions=(torch.tanh, F.tanh),
        methods=("tanh", "tanh_"),
        onnx_ops=("Tanh",),
    ),
    OpKind(
        "softmax",
        SOFTMAX,
        None,  # along a dimension: not elementwise
        modules=(nn.Softmax, nn.LogSoftmax),
        functions=(torch.softmax, torch.log_softmax, F.softmax, F.log_softmax),
        methods=("softmax", "log_softmax"),
        onnx_ops=("Softmax", "LogSoftmax"),
        elementwise=False,
        exact_onnx=True,
    ),
    OpKind(
        "layernorm",
        NORMALIZATION,
        None,
        modules=(nn.LayerNorm, nn.GroupNorm),
        functions=(F.layer_norm, F.group_norm),
        onnx_ops=("LayerNormalization", "GroupNormalization"),
        elementwise=False,
        exact_onnx=True,
        description="elements: the normalised output elements",
    ),
    OpKind(
        "rsqrt",
        NORMALIZATION,
        torch.rsqrt,
        functions=(torch.rsqrt,),
        methods=("rsqrt",),
        onnx_ops=(),  # exported as Sqrt then Div(1, .): the ONNX census fuses the pair back
        description="1 / sqrt(x), as in a hand-written LayerNorm",
    ),
    OpKind(
        "sqrt",
        NORMALIZATION,
        torch.sqrt,
        functions=(torch.sqrt,),
        methods=("sqrt",),
        onnx_ops=("Sqrt",),
    ),
    OpKind("poly", POLYNOMIAL, None, description="relu-opt's fitted polynomial (only multiplications)"),
    OpKind("square", POLYNOMIAL, torch.square, description="x**2 (one multiplication)"),
    OpKind(
        "2quad",
        POLYNOMIAL,
        None,
        elementwise=False,
        description="(x + c)^2 / sum (x + c)^2: squares and one reciprocal per row (MPCFormer's softmax)",
    ),
):
    register_kind(_k)

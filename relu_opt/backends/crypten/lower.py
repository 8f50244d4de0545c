"""CrypTen lowering: every non-linear kind CrypTen's ONNX converter lacks becomes ops it runs.

One table, `LOWERINGS` (kind -> factory of the module that replaces the node), filled with
`@register_lowering`. Kinds CrypTen runs as exported (ReLU, Clip for ReLU6/Hardtanh, MaxPool, Sigmoid,
SiLU, Softmax, Sqrt) need no entry; kinds with neither (Mish, Softplus, GroupNorm) are named with
their fix before any party starts (relu_opt/backends/crypten/convert.py: check_lowered, check_supported).

The lowered modules compute the same function (LayerNorm and rsqrt with CrypTen's own inverse-square-root
iteration, so plaintext and encrypted runs agree; GELU within 0.021, see GeluBySigmoid) and report the
kind they stand for to the census.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import Tensor, nn

from relu_opt import ops
from relu_opt.graph import register_leaf
from relu_opt.passes.replace import replace_sites

LOWERINGS: dict[str, Callable[[fx.GraphModule, fx.Node], nn.Module | None]] = {}


def register_lowering(kind: str):
    """Register a factory `(gm, node) -> module | None` that lowers nodes of `kind`; returns the decorator."""

    def wrap(fn):
        LOWERINGS[kind] = fn
        return fn

    return wrap


# CrypTen's default is 3 Newton steps; 5 keep 1/sqrt(v) within 0.1% for v in [0.03, 300] (3: [0.1, 300]),
# which LayerNorm needs for rows of small variance. Above ~500 the initial guess turns negative.
INV_SQRT_ITERS = 5


def inv_sqrt(x: Tensor, iters: int = INV_SQRT_ITERS) -> Tensor:
    """Return 1/sqrt(x) as CrypTen computes it: exp-based initial guess, then Newton-Raphson steps."""
    # Written encrypted-operand first: CrypTen has no Neg and cannot subtract from a public constant.
    y = 2.2 * torch.exp(x * -0.5 - 0.2) + x * (-1 / 1024) + 0.2
    for _ in range(iters):
        y = y * (x * y**2 * -1 + 3) * 0.5
    return y


class _Lowered(nn.Module):
    kind = ""
    comparisons_kind = ""  # the kind the lowered graph counts as in ONNX (Clip -> relu6)

    def census_items(self, shape: tuple[int, ...]) -> list[tuple[str, int]]:
        return [(self.comparisons_kind or self.kind, math.prod(shape))]


@register_leaf
class HardSwishClip(_Lowered):
    """x * clip(x + 3, 0, 6) / 6: HardSwish with CrypTen's Clip."""

    kind, comparisons_kind = "hardswish", "relu6"

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.clamp(x + 3, 0, 6) * (1 / 6)


@register_leaf
class HardSigmoidClip(_Lowered):
    """clip(x + 3, 0, 6) / 6."""

    kind, comparisons_kind = "hardsigmoid", "relu6"

    def forward(self, x: Tensor) -> Tensor:
        return torch.clamp(x + 3, 0, 6) * (1 / 6)


@register_leaf
class LeakyReLUByReLU(_Lowered):
    """a * x + (1 - a) * relu(x), with a per-channel slope for PReLU (one comparison per element)."""

    kind, comparisons_kind = "leaky_relu", "relu"

    def __init__(self, slope: Tensor | float) -> None:
        super().__init__()
        self.register_buffer("slope", torch.as_tensor(slope, dtype=torch.float32).detach().clone().reshape(-1))

    def forward(self, x: Tensor) -> Tensor:
        a = self.slope.reshape((-1,) + (1,) * (x.dim() - 2)) if self.slope.numel() > 1 else self.slope
        return a * x + (1 - a) * torch.relu(x)


@register_leaf
class TanhBySigmoid(_Lowered):
    """2 * sigmoid(2x) - 1 (CrypTen has Sigmoid, not Tanh)."""

    kind = "tanh"

    def forward(self, x: Tensor) -> Tensor:
        return 2 * torch.sigmoid(2 * x) - 1


@register_leaf
class GeluBySigmoid(_Lowered):
    """GELU as x * sigmoid(1.702 x) (within 0.021 of the exact GELU everywhere).

    Not CrypTen's Erf: that is a Taylor series which diverges past |x| of about 2.5, where a trained
    network's activations often are; nor the tanh form, whose cubic term drives CrypTen's exp out of range."""

    kind = "gelu"

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


@register_leaf
class EluByExp(_Lowered):
    """relu(x) + alpha * (exp(-relu(-x)) - 1): ELU with one comparison and CrypTen's Exp."""

    kind = "elu"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(x) + self.alpha * (torch.exp(torch.relu(x * -1) * -1) - 1)


@register_leaf
class InvSqrt(_Lowered):
    """torch.rsqrt by CrypTen's own iteration (no division by an encrypted value)."""

    kind = "rsqrt"

    def forward(self, x: Tensor) -> Tensor:
        return inv_sqrt(x)


@register_leaf
class CryptenLayerNorm(_Lowered):
    """LayerNorm from means, a variance and CrypTen's inverse-square-root iteration."""

    kind = "layernorm"

    def __init__(self, normalized_shape: tuple[int, ...], weight: Tensor | None, bias: Tensor | None, eps: float):
        super().__init__()
        self.dims = tuple(range(-len(normalized_shape), 0))
        self.eps = float(eps)
        self.weight = nn.Parameter(weight.detach().clone()) if weight is not None else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: Tensor) -> Tensor:
        centred = x - x.mean(self.dims, keepdim=True)
        var = (centred**2).mean(self.dims, keepdim=True)
        y = centred * inv_sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


def _module(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _fn_arg(node: fx.Node, index: int, name: str, default=None):
    return ops.node_arg(node, index, name, default)


@register_lowering("hardswish")
def _hardswish(gm, node):
    return HardSwishClip()


@register_lowering("hardsigmoid")
def _hardsigmoid(gm, node):
    return HardSigmoidClip()


@register_lowering("leaky_relu")
def _leaky(gm, node):
    mod = _module(gm, node)
    return LeakyReLUByReLU(mod.negative_slope if mod is not None else _fn_arg(node, 1, "negative_slope", 0.01))


@register_lowering("prelu")
def _prelu(gm, node):
    mod = _module(gm, node)
    if mod is None:
        return None  # the slope is a graph value: left to the op check
    return LeakyReLUByReLU(mod.weight)


@register_lowering("tanh")
def _tanh(gm, node):
    return TanhBySigmoid()


@register_lowering("gelu")
def _gelu(gm, node):
    return GeluBySigmoid()


@register_lowering("elu")
def _elu(gm, node):
    mod = _module(gm, node)
    if mod is not None and type(mod) is nn.ELU:
        return EluByExp(mod.alpha)
    if mod is None and node.target is torch.nn.functional.elu:
        return EluByExp(_fn_arg(node, 1, "alpha", 1.0))
    return None  # SELU/CELU: scaled forms, left to the op check


@register_lowering("rsqrt")
def _rsqrt(gm, node):
    return InvSqrt()


@register_lowering("layernorm")
def _layernorm(gm, node):
    mod = _module(gm, node)
    if isinstance(mod, nn.LayerNorm):
        return CryptenLayerNorm(tuple(mod.normalized_shape), mod.weight, mod.bias, mod.eps)
    if mod is None and node.target is torch.nn.functional.layer_norm:
        w, b = _fn_arg(node, 2, "weight"), _fn_arg(node, 3, "bias")
        if w is None and b is None:
            shape = _fn_arg(node, 1, "normalized_shape")
            return CryptenLayerNorm(tuple(shape), None, None, _fn_arg(node, 4, "eps", 1e-5))
    return None  # GroupNorm, or weights passed as graph values: left to the op check


def _lowered(gm: fx.GraphModule, node: fx.Node) -> nn.Module | None:
    kind = ops.node_kind(gm, node)
    factory = LOWERINGS.get(kind) if kind else None
    return factory(gm, node) if factory else None


def _lower_inner(site: nn.Module) -> nn.Module | None:
    """Return a copy of a partial/masked site whose own op (`original`) is lowered, or None if it needs none."""
    from relu_opt.graph import trace

    original = getattr(site, "original", None)
    if not isinstance(original, nn.Module):
        return None
    inner = trace(nn.Sequential(original))
    node = next(n for n in inner.graph.nodes if n.op == "call_module")
    lowered = _lowered(inner, node)
    if lowered is None:
        return None
    site = copy.deepcopy(site)
    site.original = lowered
    site.kind = lowered.comparisons_kind or lowered.kind  # what the lowered graph counts as
    return site


def lower_for_crypten(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` with every node whose kind has a lowering replaced by its lowered module
    (inside partial sites too: a kept Hardswish is lowered like a whole one)."""
    new = {}
    for node in gm.graph.nodes:
        module = _lowered(gm, node)
        if module is None and node.op == "call_module":
            module = _lower_inner(gm.get_submodule(node.target))
        if module is not None:
            new[node.name] = module
    return replace_sites(gm, new)

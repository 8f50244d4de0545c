"""relu-opt's own torch.fx -> JAX lowering, for SPU.

The prepared graph (BatchNorm folded, partial sites gathered, polynomials folded: what every backend
runs) is traced once more to ATen ops with `make_fx`, and each ATen op becomes jax.numpy through one
table, `ATEN`. Float parameters and buffers become inputs (party 0's weights, secret-shared); integer
buffers (a partial site's public indices) and shapes stay constants of the program. An op outside the
table is named with the fix before any party starts (`check`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from relu_opt.errors import BackendError

ATEN: dict[str, Callable] = {}  # ATen overload packet name (in-place '_' dropped) -> jax implementation
LINEAR_OPS = ("convolution", "addmm", "mm", "bmm", "matmul")  # what Cheetah runs with HE


def aten(*names: str):
    """Register a jax implementation for the ATen ops `names`; returns the decorator."""

    def wrap(fn):
        for name in names:
            ATEN[name] = fn
        return fn

    return wrap


def _jnp():
    import jax.numpy as jnp

    return jnp


def _lax():
    from jax import lax

    return lax


@aten("convolution")
def _conv(x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        raise BackendError("SPU lowering: transposed convolutions are not lowered yet; use a plain convolution")
    nd = w.ndim - 2
    spatial = "DHW"[-nd:]
    dims = (f"NC{spatial}", f"OI{spatial}", f"NC{spatial}")
    y = _lax().conv_general_dilated(
        x, w, tuple(stride), [(p, p) for p in padding], rhs_dilation=tuple(dilation),
        dimension_numbers=dims, feature_group_count=groups,
    )  # fmt: skip
    return y if b is None else y + b.reshape((1, -1) + (1,) * nd)


@aten("addmm")
def _addmm(bias, a, b, beta=1, alpha=1):
    return bias * beta + (a @ b) * alpha


@aten("mm", "bmm", "matmul")
def _mm(a, b):
    return a @ b


@aten("t")
def _t(x):
    return x.T


@aten("transpose")
def _transpose(x, d0, d1):
    return _jnp().swapaxes(x, d0, d1)


@aten("permute")
def _permute(x, dims):
    return _jnp().transpose(x, dims)


@aten("view", "_unsafe_view", "reshape")
def _view(x, shape):
    return x.reshape(shape)


@aten("expand")
def _expand(x, shape, implicit=False):
    shape = [x.shape[i - (len(shape) - x.ndim)] if s == -1 else s for i, s in enumerate(shape)]
    return _jnp().broadcast_to(x, shape)


@aten("unsqueeze")
def _unsqueeze(x, dim):
    return _jnp().expand_dims(x, dim)


@aten("squeeze")
def _squeeze(x, dim=None):
    return _jnp().squeeze(x, dim)


@aten("clone", "contiguous", "detach", "alias", "lift_fresh_copy", "_to_copy", "dropout")
def _same(x, *args, **kwargs):
    return x


@aten("add")
def _add(a, b, alpha=1):
    return a + (b * alpha if alpha != 1 else b)


@aten("sub")
def _sub(a, b, alpha=1):
    return a - (b * alpha if alpha != 1 else b)


@aten("rsub")
def _rsub(a, b, alpha=1):
    return b - (a * alpha if alpha != 1 else a)


@aten("mul")
def _mul(a, b):
    return a * b


@aten("div")
def _div(a, b, rounding_mode=None):
    return a / b


@aten("neg")
def _neg(x):
    return -x


@aten("pow")
def _pow(x, e):
    if e == 2:
        return _jnp().square(x)  # SPU squares a secret at about half the price of a general product
    if isinstance(e, int | float) and float(e).is_integer() and 1 <= e <= 8:
        y = x
        for _ in range(int(e) - 1):
            y = y * x
        return y
    return x**e


@aten("relu")
def _relu(x):
    return _jnp().maximum(x, 0)


@aten("hardtanh", "clamp")
def _clamp(x, lo=None, hi=None):
    jnp = _jnp()
    if lo is not None:
        x = jnp.maximum(x, lo)
    return x if hi is None else jnp.minimum(x, hi)


@aten("clamp_min")
def _clamp_min(x, lo):
    return _jnp().maximum(x, lo)


@aten("clamp_max")
def _clamp_max(x, hi):
    return _jnp().minimum(x, hi)


@aten("maximum")
def _maximum(a, b):
    return _jnp().maximum(a, b)


@aten("minimum")
def _minimum(a, b):
    return _jnp().minimum(a, b)


@aten("mean")
def _mean(x, dims=None, keepdim=False, dtype=None):
    return _jnp().mean(x, axis=None if dims is None else tuple(dims), keepdims=keepdim)


@aten("sum")
def _sum(x, dims=None, keepdim=False, dtype=None):
    return _jnp().sum(x, axis=None if dims is None else tuple(dims), keepdims=keepdim)


@aten("index_select")
def _index_select(x, dim, index):
    return _jnp().take(x, np.asarray(index), axis=dim)


@aten("select")
def _select(x, dim, index):
    return _jnp().take(x, index, axis=dim)


@aten("slice")
def _slice(x, dim=0, start=None, end=None, step=1):
    idx = [slice(None)] * x.ndim
    idx[dim] = slice(start, None if end is not None and end >= 2**62 else end, step)
    return x[tuple(idx)]


@aten("cat")
def _cat(xs, dim=0):
    return _jnp().concatenate(xs, axis=dim)


def _window(x, kernel, stride, padding, init, op):
    nd = len(kernel)
    stride = tuple(stride) or tuple(kernel)
    padding = tuple(padding) if len(padding) == nd else tuple(padding) * nd
    pads = [(0, 0), (0, 0)] + [(p, p) for p in padding]
    return _lax().reduce_window(x, init, op, (1, 1) + tuple(kernel), (1, 1) + stride, pads)


@aten("avg_pool2d", "avg_pool1d")
def _avg_pool(x, kernel, stride=(), padding=(0,), ceil_mode=False, count_include_pad=True, divisor=None):
    if ceil_mode or (any(padding) and not count_include_pad):
        raise BackendError("SPU lowering: average pooling with ceil_mode or count_include_pad=False is not lowered")
    summed = _window(x, kernel, stride, padding, 0.0, _lax().add)
    return summed / (divisor or math.prod(kernel))


@aten("max_pool2d_with_indices", "max_pool2d", "max_pool1d")
def _max_pool(x, kernel, stride=(), padding=(0,), dilation=(1,), ceil_mode=False):
    if ceil_mode or any(d != 1 for d in dilation):
        raise BackendError("SPU lowering: max pooling with ceil_mode or dilation is not lowered")
    if any(padding):
        x = _jnp().pad(x, [(0, 0), (0, 0)] + [(p, p) for p in padding], constant_values=-1e4)
        padding = (0,) * len(kernel)
    return _window(x, kernel, stride, padding, -np.inf, _lax().max), None


@aten("_adaptive_avg_pool2d", "adaptive_avg_pool2d")
def _adaptive_avg(x, size):
    h, w = x.shape[-2:]
    oh, ow = size
    if h % oh or w % ow:
        raise BackendError(f"SPU lowering: adaptive average pooling {h}x{w} -> {oh}x{ow} is not an even split")
    return x.reshape(x.shape[:-2] + (oh, h // oh, ow, w // ow)).mean(axis=(-3, -1))


@aten("sigmoid")
def _sigmoid(x):
    import jax

    return jax.nn.sigmoid(x)


@aten("exp")
def _exp(x):
    return _jnp().exp(x)


@aten("tanh")
def _tanh(x):
    return _jnp().tanh(x)


@aten("rsqrt")
def _rsqrt(x):
    import jax

    return jax.lax.rsqrt(x)


@aten("sqrt")
def _sqrt(x):
    return _jnp().sqrt(x)


@aten("reciprocal")
def _reciprocal(x):
    return 1 / x


@aten("gelu")
def _gelu(x, approximate="none"):
    import jax

    return jax.nn.gelu(x, approximate=approximate == "tanh")


@aten("silu")
def _silu(x):
    import jax

    return jax.nn.silu(x)


@aten("_softmax", "softmax")
def _softmax(x, dim, half=False):
    import jax

    return jax.nn.softmax(x, axis=dim)


@aten("native_layer_norm")
def _layer_norm(x, shape, w, b, eps):
    jnp = _jnp()
    axes = tuple(range(-len(shape), 0))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) * _lax().rsqrt(var + eps)
    y = y * w if w is not None else y
    return (y + b if b is not None else y), mean, jnp.zeros_like(mean)


@aten("leaky_relu")
def _leaky(x, slope=0.01):
    return _jnp().where(x > 0, x, x * slope)


@aten("hardswish")
def _hardswish(x):
    return x * _jnp().clip(x + 3, 0, 6) / 6


@aten("hardsigmoid")
def _hardsigmoid(x):
    return _jnp().clip(x + 3, 0, 6) / 6


def op_name(node: fx.Node) -> str:
    """Return the ATen op a make_fx node calls, by its packet name with any in-place '_' dropped."""
    if node.target is operator.getitem:
        return "getitem"
    packet = getattr(node.target, "overloadpacket", None)
    name = getattr(packet, "__name__", None) or getattr(node.target, "__name__", str(node.target))
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


@dataclass
class Lowered:
    """A prepared graph as a jax function `fn(x, *weights)`, with party 0's weights (float parameters and
    buffers, in input order) and the ATen graph it was lowered from."""

    fn: Callable
    weights: list[np.ndarray]
    aten: fx.GraphModule
    input_shape: tuple[int, ...]

    def trace(self) -> None:
        """Evaluate the function on abstract values: a lowering error shows here, before any party starts."""
        import jax

        jax.eval_shape(self.fn, np.zeros(self.input_shape, np.float32), *self.weights)

    @property
    def ops(self) -> list[str]:
        return [op_name(n) for n in self.aten.graph.nodes if n.op == "call_function"]


def aten_graph(gm: fx.GraphModule, x: torch.Tensor) -> fx.GraphModule:
    """Return `gm` traced to ATen ops on an input shaped like `x`."""
    from torch.fx.experimental.proxy_tensor import make_fx

    with torch.no_grad():
        return make_fx(gm.eval(), tracing_mode="real")(x)


def check_ops(g: fx.GraphModule, where: str = "") -> None:
    """Raise BackendError naming the first ATen op the lowering lacks, with the fix."""
    for node in g.graph.nodes:
        if node.op == "call_function" and op_name(node) not in ATEN and op_name(node) != "getitem":
            raise BackendError(
                f"the SPU backend cannot run aten.{op_name(node)}{where} (no lowering to JAX); replace that op "
                "(relu-opt optimize --replace) or use --backend crypten"
            )


def lower(gm: fx.GraphModule, x: torch.Tensor) -> Lowered:
    """Return `gm` (a prepared graph) as a jax function of (x, *weights) for inputs shaped like `x`."""
    g = aten_graph(gm, x)
    check_ops(g)
    consts: dict[str, np.ndarray] = {}
    secret: list[str] = []
    for node in g.graph.nodes:
        if node.op == "get_attr":
            value = getattr(g, node.target)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                secret.append(node.name)
                consts[node.name] = value.detach().float().numpy().copy()
            elif isinstance(value, torch.Tensor):
                consts[node.name] = value.detach().numpy().copy()
            else:
                raise BackendError(f"SPU lowering: attribute '{node.target}' is not a tensor")
    nodes = list(g.graph.nodes)

    def fn(xin, *weights):
        env: dict[str, object] = dict(zip(secret, weights))

        def value(a):
            return fx.node.map_arg(a, lambda n: env[n.name])

        for node in nodes:
            if node.op == "placeholder":
                env[node.name] = xin
            elif node.op == "get_attr":
                env.setdefault(node.name, consts[node.name])
            elif node.op == "call_function":
                args, kwargs = value(node.args), value(node.kwargs)
                if node.target is operator.getitem:
                    env[node.name] = args[0][args[1]]
                else:
                    env[node.name] = ATEN[op_name(node)](*args, **kwargs)
            elif node.op == "output":
                out = value(node.args[0])
                return out[0] if isinstance(out, list | tuple) else out
        raise BackendError("SPU lowering: the graph has no output")

    return Lowered(fn, [consts[n] for n in secret], g, tuple(x.shape))

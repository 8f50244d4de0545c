"""ONNX export with verification: checker, onnxruntime parity, and a census of the ONNX graph."""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from relu_opt import atomic, ops
from relu_opt.errors import ExportError, first_line
from relu_opt.graph import eval_mode

DEFAULT_OPSET = 17
# Max abs error relative to the output's max magnitude. Export bugs give errors of order 1; float32 op
# orderings differ by ~1e-6 per layer, and folded polynomials (passes/fold_residual_poly.py) carry per-channel
# scales and their inverses: a random-weight ResNet-18 with 15 folded sites differed by 1.3e-4.
PARITY_TOLERANCE = 1e-3


def exact_kinds() -> tuple[str, ...]:
    """Return the kinds whose ONNX count must equal the fx census (from the op table)."""
    return tuple(k.name for k in ops.all_kinds() if k.exact_onnx)


@dataclass(frozen=True)
class OnnxSite:
    """One non-linear ONNX node with its elements per sample (comparisons, for MaxPool)."""

    node: str
    op_type: str
    kind: str
    elements: int


@dataclass(frozen=True)
class OnnxCensus:
    sites: tuple[OnnxSite, ...]
    totals_by_kind: dict[str, int]

    @property
    def total_relu(self) -> int:
        return self.totals_by_kind.get("relu", 0)

    @property
    def total_comparisons(self) -> int:
        """Return the secure comparisons per sample of every counted node."""
        return sum(v * ops.comparisons_per_element(k) for k, v in self.totals_by_kind.items())


@dataclass(frozen=True)
class ExportResult:
    """What export wrote and how it was verified."""

    path: str
    opset: int
    max_abs_err: float
    output_scale: float
    onnx_totals: dict[str, int]
    census_totals: dict[str, int] = field(default_factory=dict)
    op_types: tuple[str, ...] = ()

    @property
    def rel_err(self) -> float:
        return self.max_abs_err / max(self.output_scale, 1e-12)

    @property
    def onnx_relu(self) -> int:
        return self.onnx_totals.get("relu", 0)

    def to_dict(self) -> dict:
        """Return a JSON-ready dict."""
        return {
            "path": self.path,
            "opset": self.opset,
            "max_abs_err": self.max_abs_err,
            "output_scale": self.output_scale,
            "rel_err": self.rel_err,
            "onnx_relu": self.onnx_relu,
            "onnx_totals": dict(self.onnx_totals),
            "census_totals": dict(self.census_totals),
            "op_types": list(self.op_types),
        }


@contextlib.contextmanager
def _quiet_stdout():
    """Send what C++ code writes to file descriptor 1 nowhere for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def to_onnx_bytes(model: nn.Module, example: torch.Tensor, opset: int = DEFAULT_OPSET) -> bytes:
    """Return the ONNX bytes of `model` (eval mode, TorchScript exporter, dynamic batch axis)."""
    buf = io.BytesIO()
    # the exporter prints its whole IR graph to stdout (from C++) when an op fails; the error says what failed
    with eval_mode(model), torch.no_grad(), warnings.catch_warnings(), _quiet_stdout():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=["input"],
                output_names=["output"],
                dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                do_constant_folding=True,
            )
        except Exception as exc:
            raise ExportError(f"ONNX export (opset {opset}) failed: {first_line(exc)}") from exc
    return buf.getvalue()


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = numpy_helper.to_array(a.t)
    return values


def _clip_kind(node: onnx.NodeProto, consts: dict[str, np.ndarray]) -> str:
    def value(i: int):
        if len(node.input) > i and node.input[i]:
            v = consts.get(node.input[i])
            return None if v is None else float(np.asarray(v).reshape(-1)[0])
        return None

    attrs = {a.name: a.f for a in node.attribute}  # before opset 11 the bounds are attributes
    lo = value(1) if len(node.input) > 1 else attrs.get("min")
    hi = value(2) if len(node.input) > 2 else attrs.get("max")
    return ops.bounds_kind(lo, hi)


def _fused_kinds(mp: onnx.ModelProto, consts: dict[str, np.ndarray]) -> dict[int, str | None]:
    """Return node index -> kind for the ONNX patterns one fx op exports as: Sigmoid(x) * x is silu,
    Softplus -> Tanh -> Mul(x) is mish, Div(1, Sqrt(x)) is rsqrt.
    The pattern's first node gets the kind and the others None (not counted)."""
    nodes = list(mp.graph.node)
    users: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.input:
            users.setdefault(name, []).append(i)

    def only_user(i: int, op: str) -> int | None:
        u = users.get(nodes[i].output[0], [])
        return u[0] if len(u) == 1 and nodes[u[0]].op_type == op else None

    out: dict[int, str | None] = {}
    for i, n in enumerate(nodes):
        x = n.input[0] if n.input else None
        if n.op_type == "Sigmoid":
            j = only_user(i, "Mul")
            if j is not None and x in nodes[j].input:
                out[i] = "silu"
        elif n.op_type == "Softplus":
            j = only_user(i, "Tanh")
            k = only_user(j, "Mul") if j is not None else None
            if k is not None and x in nodes[k].input:
                out[i], out[j] = "mish", None
        elif n.op_type == "Sqrt":
            j = only_user(i, "Div")
            num = consts.get(nodes[j].input[0]) if j is not None else None
            if num is not None and np.all(np.asarray(num) == 1):
                out[i] = "rsqrt"
    return out


def _output_shapes(mp: onnx.ModelProto, names: list[str], sample: np.ndarray) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes of `names`: static shape inference first, one onnxruntime run for the rest."""
    inferred = onnx.shape_inference.infer_shapes(mp)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        rest = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if dims and None not in rest:
            shapes[vi.name] = tuple(rest)
    unknown = [n for n in names if n not in shapes]
    if unknown:
        import onnxruntime as ort

        probe = onnx.ModelProto()
        probe.CopyFrom(mp)
        probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in unknown)
        sess = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        outs = sess.run(unknown, {sess.get_inputs()[0].name: sample})
        shapes.update({n: tuple(o.shape[1:]) for n, o in zip(unknown, outs)})
    return shapes


def onnx_census(mp: onnx.ModelProto, input_shape: tuple[int, ...]) -> OnnxCensus:
    """Return the non-linear ONNX nodes with elements per sample, counted as the fx census counts."""
    consts = _constants(mp.graph)
    fused = _fused_kinds(mp, consts)
    picked = []
    for i, n in enumerate(mp.graph.node):
        kind = _clip_kind(n, consts) if n.op_type == "Clip" else ops.onnx_kind(n.op_type)
        kind = fused.get(i, kind)
        if kind:
            picked.append((n, kind))
    sample = np.random.default_rng(0).standard_normal((1, *input_shape[1:])).astype(np.float32)
    shapes = _output_shapes(mp, [n.output[0] for n, _ in picked], sample)
    sites = []
    for n, kind in picked:
        elements = math.prod(shapes[n.output[0]])
        if kind == "maxpool":
            kernel = next(a.ints for a in n.attribute if a.name == "kernel_shape")
            elements *= math.prod(kernel) - 1
        sites.append(OnnxSite(n.name, n.op_type, kind, int(elements)))
    totals = Counter()
    for s in sites:
        totals[s.kind] += s.elements
    return OnnxCensus(tuple(sites), dict(totals))


def check_parity(
    onnx_bytes: bytes,
    model: nn.Module,
    example: torch.Tensor,
    batch: int = 2,
    seed: int = 0,
    inputs: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Return (max abs error, output scale) of onnxruntime vs PyTorch on `inputs` (default: random)."""
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    x = inputs if inputs is not None else torch.randn((batch, *example.shape[1:]), generator=gen, dtype=example.dtype)
    with eval_mode(model), torch.no_grad():
        ref = model(x).float().numpy()
    if not np.isfinite(ref).all():
        raise ExportError(
            "the model's own output is NaN or infinite on the parity inputs: it overflows (polynomial "
            "activations do, far from the range they were fitted on). Fine-tune longer, or use a larger budget "
            "or --replace square/identity"
        )
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    if got.shape != ref.shape:
        raise ExportError(f"onnxruntime output shape {got.shape} differs from PyTorch's {ref.shape}")
    return float(np.abs(got - ref).max()), float(np.abs(ref).max())


def export(
    model: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    opset: int = DEFAULT_OPSET,
    census_totals: dict[str, int] | None = None,
    parity_inputs: torch.Tensor | None = None,
) -> ExportResult:
    """Export, check, verify parity and ReLU count, then write `path` atomically; returns the result.

    Parity is checked on `parity_inputs` when given (real samples: a polynomial network can overflow on
    random inputs far from its data), else on a random batch of two.

    Raises ExportError (and writes nothing) when the checker fails, the onnxruntime output differs by
    more than PARITY_TOLERANCE of the output scale, or the ONNX ReLU/max-pool count differs from
    `census_totals` when given.
    """
    data = to_onnx_bytes(model, example, opset)
    mp = onnx.load_from_string(data)
    try:
        onnx.checker.check_model(mp)
    except onnx.checker.ValidationError as exc:
        raise ExportError(
            f"onnx.checker rejected the graph exported at --opset {opset} ({first_line(exc)}); try the default "
            f"--opset {DEFAULT_OPSET}"
        ) from exc
    err, scale = check_parity(data, model, example, inputs=parity_inputs)
    if not math.isfinite(err) or err > PARITY_TOLERANCE * max(scale, 1e-12):
        raise ExportError(
            f"onnxruntime output differs from PyTorch by {err:.3g} (output scale {scale:.3g}), "
            f"over the {PARITY_TOLERANCE:g} relative tolerance; try another --opset"
        )
    counted = onnx_census(mp, tuple(example.shape))
    if census_totals is not None:
        for kind in exact_kinds():
            a, b = counted.totals_by_kind.get(kind, 0), census_totals.get(kind, 0)
            if a != b:
                hint = (
                    f"; --opset {opset} may lack the op, try --opset {DEFAULT_OPSET}" if opset != DEFAULT_OPSET else ""
                )
                raise ExportError(f"ONNX graph has {a} {kind} elements per sample but the census has {b}{hint}")
    atomic.write_bytes(path, data)
    return ExportResult(
        path=str(path),
        opset=opset,
        max_abs_err=err,
        output_scale=scale,
        onnx_totals=counted.totals_by_kind,
        census_totals=dict(census_totals or {}),
        op_types=tuple(sorted({n.op_type for n in mp.graph.node})),
    )

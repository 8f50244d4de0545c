"""Every repair relu-opt needs to run crypten 0.4.1 on current torch and ONNX exports, in one place.

Each repair names the behaviour it works around, is applied only when a feature check says it is needed
(never by version string), and has a test in tests/test_compat.py that fails without it.
"""

from __future__ import annotations

import importlib
import sys

import numpy as np
import onnx
from onnx import helper, numpy_helper

from relu_opt.errors import BackendError

_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"


def registration_alias_needed() -> bool:
    """True when torch no longer has the module path crypten's converter imports."""
    present = sys.modules.get(_OLD_REGISTRATION)
    if present is not None:
        return present.__name__ != _OLD_REGISTRATION  # our alias is in place
    try:
        importlib.import_module(_OLD_REGISTRATION)
        return False
    except ImportError:
        return True


def alias_onnx_registration() -> None:
    """Repair: crypten/nn/onnx_converter.py imports `torch.onnx._internal.registration`, which torch
    moved to `torch.onnx._internal.torchscript_exporter.registration`; alias the old name to the new."""
    if registration_alias_needed() and _OLD_REGISTRATION not in sys.modules:
        sys.modules[_OLD_REGISTRATION] = importlib.import_module(_NEW_REGISTRATION)


def import_crypten():
    """Return the crypten module, importable on this torch; raise BackendError with the fix if absent."""
    if "crypten" in sys.modules:
        return sys.modules["crypten"]
    alias_onnx_registration()
    try:
        import crypten
    except ImportError as exc:
        raise BackendError(
            f"cannot import crypten ({exc}); install it with `bash install.sh`, or "
            "`pip install '.[crypten]' && pip install --no-deps crypten==0.4.1`"
        ) from exc
    return crypten


def _rename_inputs(graph: onnx.GraphProto, old: str, new: str) -> None:
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
    for out in graph.output:
        if out.name == old:
            out.name = new


def remove_identity(mp: onnx.ModelProto) -> onnx.ModelProto:
    """Repair: CrypTen has no ONNX `Identity` op, which the exporter emits (e.g. for shared or
    deduplicated initialisers); rewire each Identity's consumers to its input and drop it."""
    graph = mp.graph
    graph_outputs = {o.name for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "Identity"]:
        src, dst = node.input[0], node.output[0]
        graph.node.remove(node)
        if dst in graph_outputs and src in {i.name for i in graph.input}:
            raise BackendError(f"ONNX graph output '{dst}' is an Identity of its input; nothing to compute")
        if dst in graph_outputs:  # keep the output's name: rename the producer's output instead
            for n in graph.node:
                for i, name in enumerate(n.output):
                    if name == src:
                        n.output[i] = dst
            _rename_inputs(graph, src, dst)
            for init in graph.initializer:
                if init.name == src:
                    init.name = dst
        else:
            _rename_inputs(graph, dst, src)
    return mp


def dedupe_repeated_inputs(mp: onnx.ModelProto) -> onnx.ModelProto:
    """Repair: CrypTen's `nn.Graph.forward` marks only the first occurrence of an input name as
    available, so `Mul(x, x)` never runs ("Graph.forward() failed. Is graph unconnected?"). Rewrite
    `Mul(x, x)` as `Pow(x, 2)` and `Add(x, x)` as `Mul(x, 2)` (public constants)."""
    graph = mp.graph
    for node in list(graph.node):
        if len(node.input) < 2 or len(set(node.input)) == len(node.input):
            continue
        if node.op_type not in ("Mul", "Add") or len(node.input) != 2:
            raise BackendError(
                f"ONNX node '{node.name}' ({node.op_type}) takes the same tensor twice, which CrypTen "
                "cannot run; compute a copy of it first"
            )
        const_name = f"{node.output[0]}__const2"
        const = helper.make_node(
            "Constant",
            [],
            [const_name],
            value=numpy_helper.from_array(np.array(2.0, dtype=np.float32)),
            name=f"{node.name}__const2",
        )
        new = helper.make_node(
            "Pow" if node.op_type == "Mul" else "Mul",
            [node.input[0], const_name],
            list(node.output),
            name=node.name,
        )
        pos = list(graph.node).index(node)
        graph.node.remove(node)
        graph.node.insert(pos, new)
        graph.node.insert(pos, const)
    return mp


def integer_initializers_to_constants(mp: onnx.ModelProto) -> onnx.ModelProto:
    """Repair: CrypTen turns every initialiser into a trainable Parameter, which fails for integer
    tensors ("Only Tensors of floating point ... can require gradients"): index buffers and Reshape
    shapes. Move integer initialisers into Constant nodes, which CrypTen keeps public."""
    graph = mp.graph
    ints = [t for t in graph.initializer if not np.issubdtype(numpy_helper.to_array(t).dtype, np.floating)]
    consts = []
    for t in ints:
        consts.append(helper.make_node("Constant", [], [t.name], value=t, name=f"{t.name}__const"))
        graph.initializer.remove(t)
    for i, c in enumerate(consts):
        graph.node.insert(i, c)
    for inp in [i for i in graph.input if i.name in {t.name for t in ints}]:
        graph.input.remove(inp)
    return mp


def repair_for_crypten(mp: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy of `mp` with every repair CrypTen needs applied (each only where it applies)."""
    out = onnx.ModelProto()
    out.CopyFrom(mp)
    for repair in (remove_identity, dedupe_repeated_inputs, integer_initializers_to_constants):
        out = repair(out)
    return out

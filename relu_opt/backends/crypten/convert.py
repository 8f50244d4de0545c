"""From a (rewritten) PyTorch model to the ONNX graph CrypTen runs: the PI passes, CrypTen's lowering,
export, CrypTen's repairs, and a check of every op before any party starts."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx
import torch
import torch.fx as fx
from onnx import numpy_helper
from torch import nn

from relu_opt import ops
from relu_opt.backends.crypten.compat import import_crypten, repair_for_crypten
from relu_opt.backends.crypten.lower import lower_for_crypten
from relu_opt.errors import BackendError
from relu_opt.onnx_export import to_onnx_bytes
from relu_opt.passes.base import GraphPass
from relu_opt.passes.pi import prepare_for_pi

CRYPTEN_OPSET = 17  # the opset crypten 0.4.1's converter targets


def supported_ops() -> set[str]:
    """Return the ONNX op types crypten.nn.from_onnx can convert."""
    import_crypten()
    from crypten.nn import module
    from crypten.nn.onnx_converter import ONNX_TO_CRYPTEN

    # The converter looks an op up as a class in crypten.nn.module, then in ONNX_TO_CRYPTEN.
    return {n for n in dir(module) if isinstance(getattr(module, n), type)} | set(ONNX_TO_CRYPTEN)


_DIVIDE_FIX = (
    "write 1 / sqrt(v) as torch.rsqrt(v), which relu-opt lowers to CrypTen's inverse square root, "
    "or divide an encrypted value instead (x / y)"
)


def _fix_for(op_type: str) -> str:
    if op_type == "Reciprocal":
        return f"1 / x of an encrypted x: {_DIVIDE_FIX}"
    kind = ops.onnx_kind(op_type)
    if kind is None:
        return "replace the module that produces it, or mark it for rewriting before bench"
    return ops.fix_for(kind)


LOWERING = (GraphPass(lower_for_crypten),)  # after the PI passes: every kind CrypTen lacks, lowered


def prepare(
    model: nn.Module, example: torch.Tensor, leaf: Iterable[str | type] = (), public_coeffs: bool = False
) -> fx.GraphModule:
    """Return the eval-mode GraphModule CrypTen runs (the PI passes and CrypTen's lowering applied)."""
    return prepare_for_pi(model, example, leaf, public_coeffs, LOWERING)


def check_lowered(gm: fx.GraphModule) -> None:
    """Raise BackendError naming the first node of a kind CrypTen cannot run even lowered (none of the
    kind's ONNX ops is one CrypTen converts), with the op table's fix; run on a lowered graph, before
    export and before any party starts."""
    runs = supported_ops()
    for node in gm.graph.nodes:
        kind = ops.node_kind(gm, node)
        entry = ops.find_kind(kind) if kind else None
        if entry is not None and entry.onnx_ops and not set(entry.onnx_ops) & runs:
            raise BackendError(
                f"CrypTen cannot run {kind} (node '{node.name}', {_spelling(node)}); {ops.fix_for(kind)}"
            )


def _spelling(node: fx.Node) -> str:
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    return f".{node.target}()" if node.op == "call_method" else f"module '{node.target}'"


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: n for n in graph.node for out in n.output}


def _is_public(name: str, producers: dict[str, onnx.NodeProto], memo: dict[str, bool]) -> bool:
    """True when a value depends on Constant nodes only (CrypTen keeps those public, unencrypted)."""
    if name not in memo:
        node = producers.get(name)
        memo[name] = node is not None and (
            node.op_type == "Constant" or all(_is_public(i, producers, memo) for i in node.input if i)
        )
    return memo[name]


def check_supported(mp: onnx.ModelProto) -> None:
    """Raise BackendError naming the first ONNX node CrypTen cannot run, with the replacement to use:
    an op its converter lacks, a division of a public value by an encrypted one, or a non-integer power."""
    ok = supported_ops()
    producers, memo = _producers(mp.graph), {}
    consts = {t.name: t for t in mp.graph.initializer}
    for node in mp.graph.node:
        if node.op_type not in ok:
            raise BackendError(
                f"CrypTen cannot run ONNX op '{node.op_type}' (node '{node.name}'); {_fix_for(node.op_type)}"
            )
        public = [_is_public(i, producers, memo) for i in node.input[:2]] if node.op_type in ("Sub", "Div") else []
        if node.op_type == "Sub" and public == [True, False]:
            raise BackendError(
                f"CrypTen cannot subtract an encrypted value from a public one (ONNX node '{node.name}', "
                "Sub); write c - x as x * -1 + c"
            )
        if node.op_type == "Div" and public == [True, False]:
            raise BackendError(
                f"CrypTen cannot divide a public value by an encrypted one (ONNX node '{node.name}', Div); "
                + _DIVIDE_FIX
            )
        if node.op_type == "Pow" and len(node.input) > 1:
            exponent = _constant_value(node.input[1], producers, consts)
            if exponent is not None and (exponent.size != 1 or float(exponent.reshape(-1)[0]) % 1):
                raise BackendError(
                    f"CrypTen raises only to integer powers (ONNX node '{node.name}', Pow "
                    f"{exponent.reshape(-1)[:1].tolist()}); use torch.rsqrt / torch.sqrt or an integer exponent"
                )


def _constant_value(name: str, producers: dict[str, onnx.NodeProto], consts: dict) -> np.ndarray | None:
    node = producers.get(name)
    if node is not None and node.op_type == "Constant":
        for a in node.attribute:
            if a.name == "value":
                return numpy_helper.to_array(a.t)
    return numpy_helper.to_array(consts[name]) if name in consts else None


def crypten_onnx(prepared: nn.Module, example: torch.Tensor) -> bytes:
    """Return ONNX bytes of a prepared model, repaired for CrypTen and checked op by op."""
    if isinstance(prepared, fx.GraphModule):
        check_lowered(prepared)
    mp = repair_for_crypten(onnx.load_from_string(to_onnx_bytes(prepared, example, CRYPTEN_OPSET)))
    check_supported(mp)
    return mp.SerializeToString()

"""From a (rewritten) PyTorch model to the ONNX graph CrypTen runs: BN folded, partial ReLUs gathered."""

from __future__ import annotations

import onnx
import torch
from torch import nn

from relu_opt.crypto_backend.compat import import_crypten, repair_for_crypten
from relu_opt.errors import CryptenError
from relu_opt.export import to_onnx_bytes
from relu_opt.passes.pi import linear_floor, prepare_for_pi

__all__ = ["CRYPTEN_OPSET", "check_supported", "crypten_onnx", "linear_floor", "prepare_for_pi", "supported_ops"]

CRYPTEN_OPSET = 17  # the opset crypten 0.4.1's converter targets


def supported_ops() -> set[str]:
    """Return the ONNX op types crypten.nn.from_onnx can convert."""
    import_crypten()
    from crypten.nn import module
    from crypten.nn.onnx_converter import ONNX_TO_CRYPTEN

    # The converter looks an op up as a class in crypten.nn.module, then in ONNX_TO_CRYPTEN.
    return {n for n in dir(module) if isinstance(getattr(module, n), type)} | set(ONNX_TO_CRYPTEN)


def check_supported(mp: onnx.ModelProto) -> None:
    """Raise CryptenError naming the first ONNX node whose op CrypTen cannot run."""
    ok = supported_ops()
    for node in mp.graph.node:
        if node.op_type not in ok:
            raise CryptenError(
                f"CrypTen cannot run ONNX op '{node.op_type}' (node '{node.name}'); replace the module "
                "that produces it, or mark it for rewriting before bench"
            )


def crypten_onnx(prepared: nn.Module, example: torch.Tensor) -> bytes:
    """Return ONNX bytes of a prepared model, repaired for CrypTen and checked op by op."""
    mp = repair_for_crypten(onnx.load_from_string(to_onnx_bytes(prepared, example, CRYPTEN_OPSET)))
    check_supported(mp)
    return mp.SerializeToString()

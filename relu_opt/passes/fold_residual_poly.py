"""One-round polynomials after residual additions: fold a degree-2 site's coefficients upstream.

`fold_poly` folds a degree-2 Poly whose input comes from one linear layer. After a residual addition the
input is x = u + v, u from a linear layer and v the block's shortcut, usually the previous block's output,
which other layers read too. With a > 0 (per channel), completing the square gives

    a x^2 + b x + c = (s x + t)^2 + k,   s = sqrt(a), t = b / (2 sqrt(a)), k = c - b^2 / (4a),

so the site becomes z^2 + k (one round) once its input is s x + t. The scale and shift are pushed upstream,
exactly: into u's linear layer (rows and bias); through the addition into v with the scale only; and from v
into whatever computed it: a linear layer (rows), a not yet folded Poly (its coefficients times s), an
already folded square (sqrt(s) into its own input, its offset times s), or a ReLU (relu(s x) = s relu(x)
for s > 0, so on into its input). Every other reader of a scaled value is a linear layer that takes 1/s
into its input columns. Where any step is not exact (a < 0 somewhere, a reader that is not linear, a
partly kept site on the way, a shift that would meet a second reader), the site keeps its 2-round form.
Sites are folded last first, so the scale a later site pushes into an earlier Poly is folded with it.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import Tensor, nn

from relu_opt.activations import ChannelAffine, Poly
from relu_opt.passes.fold_poly import OffsetSquare, scale_input, scale_output
from relu_opt.passes.utils import set_submodule

_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, ChannelAffine)
_ADDS = (operator.add, torch.add)
_RELUS = (torch.relu, torch.nn.functional.relu)


class _Fold:
    """One site's fold, planned on copies of the modules it touches and applied only if it all holds."""

    def __init__(self, gm: fx.GraphModule, calls: dict[str, int]) -> None:
        self.gm, self.calls = gm, calls
        self.mods: dict[str, nn.Module] = {}

    def module(self, n: fx.Node) -> nn.Module | None:
        if n.op != "call_module":
            return None
        return self.mods.get(n.target) or self.gm.get_submodule(n.target)

    def linear(self, n: fx.Node) -> nn.Module | None:
        mod = self.module(n)
        ok = isinstance(mod, _LINEAR) and self.calls.get(n.target) == 1 and len(n.args) == 1 and not n.kwargs
        return mod if ok else None

    def compensate(self, reader: fx.Node, s: Tensor) -> bool:
        """Make the linear layer `reader` take 1/s into its input columns."""
        mod = self.linear(reader)
        if mod is None or isinstance(mod, nn.Linear) and _rank(reader.args[0]) != 2:
            return False
        new = scale_input(mod, 1 / s)
        if new is None:
            return False
        self.mods[reader.target] = new
        return True

    def push(self, n: fx.Node, s: Tensor, t: Tensor | None, reader: fx.Node) -> bool:
        """Make node `n` compute s * n + t (per channel), as `reader` sees it; its other readers undo s."""
        others = [u for u in n.users if u is not reader]
        if others and t is not None:
            return False  # a shift cannot be undone by a padded linear layer
        if not all(self.compensate(u, s) for u in others):
            return False
        return self.produce(n, s, t)

    def produce(self, n: fx.Node, s: Tensor, t: Tensor | None) -> bool:
        mod = self.module(n)
        lin = self.linear(n)
        if lin is not None:
            if isinstance(lin, nn.Linear) and _rank(n) != 2:
                return False
            new = scale_output(lin, s, torch.zeros_like(s) if t is None else t / s)
            if new is None:
                return False
            self.mods[n.target] = new
            return True
        if n.op == "call_function" and n.target in _ADDS and len(n.args) == 2 and not n.kwargs:
            u, v = n.args
            if not (isinstance(u, fx.Node) and isinstance(v, fx.Node)) or u is v:
                return False
            if t is not None and self.linear(u) is None:
                u, v = v, u  # the shift goes where a bias takes it
            return self.push(u, s, t, n) and self.push(v, s, None, n)
        if isinstance(mod, Poly) and self.calls.get(n.target) == 1:
            new = Poly(_per_channel(mod.coeffs.detach(), s) * s)
            if t is not None:
                with torch.no_grad():
                    new.coeffs[0] += t
            self.mods[n.target] = new
            return True
        if isinstance(mod, OffsetSquare) and self.calls.get(n.target) == 1:
            x = n.args[0]
            off = mod.offset.double().expand(s.numel()) if mod.offset.numel() == 1 else mod.offset.double()
            new_off = off * s + (0 if t is None else t)
            if not (isinstance(x, fx.Node) and self.push(x, s.sqrt(), None, n)):
                return False
            self.mods[n.target] = OffsetSquare(new_off.float())
            return True
        if isinstance(mod, (nn.Identity, nn.Dropout)) and n.args and isinstance(n.args[0], fx.Node):
            return self.push(n.args[0], s, t, n)  # an identity shortcut (Dropout is one in eval mode)
        relu = isinstance(mod, nn.ReLU) or n.op == "call_function" and n.target in _RELUS
        relu = relu or n.op == "call_method" and n.target == "relu"
        if relu and t is None and isinstance(n.args[0], fx.Node):
            return self.push(n.args[0], s, None, n)
        return False


def _rank(n) -> int | None:
    meta = n.meta.get("tensor_meta") if isinstance(n, fx.Node) else None
    return len(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _per_channel(coeffs: Tensor, s: Tensor) -> Tensor:
    """Return (degree+1, C) coefficients, one set repeated per channel when the Poly had one for all."""
    return coeffs.double().expand(coeffs.shape[0], s.numel()) if coeffs.shape[1] == 1 else coeffs.double()


def fold_residual_poly(gm: fx.GraphModule, max_offset: float = 1024.0) -> fx.GraphModule:
    """Return a copy of `gm` with each degree-2 Poly site whose input is a residual addition turned into
    an OffsetSquare, its coefficients pushed upstream (module docstring); outputs unchanged up to float
    rounding. Reads tensor_meta shapes (run propagate_shapes first)."""
    import copy

    gm = copy.deepcopy(gm)
    calls: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    sites = [
        n
        for n in gm.graph.nodes
        if n.op == "call_module"
        and isinstance(gm.get_submodule(n.target), Poly)
        and len(n.args) == 1
        and isinstance(n.args[0], fx.Node)
        and calls[n.target] == 1
    ]
    for node in reversed(sites):
        poly = gm.get_submodule(node.target)
        x = node.args[0]
        if poly.degree != 2 or not (x.op == "call_function" and x.target in _ADDS) or len(x.users) != 1:
            continue
        channels = x.meta["tensor_meta"].shape[1] if _rank(x) else None
        if channels is None or poly.coeffs.shape[1] not in (1, channels):
            continue
        c, b, a = (poly.coeffs.detach().double()[i].expand(channels) for i in range(3))
        if bool((a <= 0).any()):
            continue
        k = c - b * b / (4 * a)
        if float(k.abs().max()) > max_offset:
            continue
        s, t = a.sqrt(), b / (2 * a.sqrt())
        fold = _Fold(gm, calls)
        if not fold.push(x, s, t, node):
            continue
        for target, mod in fold.mods.items():
            set_submodule(gm, target, mod)
        set_submodule(gm, node.target, OffsetSquare(k.float()))
    gm.graph.lint()
    gm.recompile()
    return gm

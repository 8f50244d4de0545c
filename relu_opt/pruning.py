"""Structures as units of choice: output channels of linear layers, and whole residual branches.

Channels are removed through torch-pruning's dependency graph (DepGraph), which carries a removal through
residual adds, concatenations, BatchNorms and group convolutions, so the graph stays consistent. A residual
branch is a residual add's input that holds more linear layers since the fork than the other (a ResNet
block's two convolutions beside its shortcut): dropping it removes all of its channels, and with them
its convolutions' per-layer cost, which under Cheetah does not shrink with the channel count (a 3x3
convolution at 28x28 costs 1.26 MB with 4 channels and 1.80 MB with 16, measured).

Importance is first-order Taylor in the units of the sites' ranking: |sum a * dL/da| of what a removal
zeroes (a channel at every layer output of its group, as torch-pruning maps it; a branch's output), per
batch of one gradient pass, summed over batches. A Pruning records what was removed so that
`apply_pruning` replays it exactly on the base graph (plan.json keeps it; relu_opt.load rebuilds it).
"""

from __future__ import annotations

import copy
import operator
from dataclasses import asdict, dataclass

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from relu_opt.data import Dataset, batches
from relu_opt.graph import eval_mode, propagate_shapes

LINEAR = (nn.modules.conv._ConvNd, nn.Linear)
KEEP_FRACTIONS = (1.0, 0.75, 0.5, 0.25)  # of each channel group's channels, tried as candidates
MODES = ("none", "channels")
_ADDS = {operator.add, torch.add}


@dataclass(frozen=True)
class Pruning:
    """What was removed from the base graph, in the order it is replayed."""

    keep: float = 1.0  # fraction of each channel group's output channels kept
    branches: tuple[str, ...] = ()  # residual add nodes whose branch was dropped
    channels: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (root module, removed output channels)
    loss: float = 0.0  # first-order Taylor estimate of the loss the removal costs

    @property
    def empty(self) -> bool:
        return not self.branches and not self.channels

    def describe(self) -> str:
        """Return what was removed, as one line."""
        if self.empty:
            return "nothing pruned"
        removed = sum(len(i) for _, i in self.channels)
        parts = [f"{len(self.branches)} residual branch(es) dropped"] if self.branches else []
        parts += [f"{removed:,} channels removed ({self.keep:g} of each group kept)"] if removed else []
        return ", ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = [[m, list(i)] for m, i in self.channels]
        d["branches"] = list(self.branches)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Pruning:
        return cls(
            float(d.get("keep", 1.0)),
            tuple(d.get("branches", ())),
            tuple((str(m), tuple(int(i) for i in idx)) for m, idx in d.get("channels", ())),
            float(d.get("loss", 0.0)),
        )


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(a for a in n.all_input_nodes)
    return seen


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (node.op == "call_method" and node.target == "add")


def residual_branches(gm: fx.GraphModule) -> dict[str, tuple[str, str]]:
    """Return, per residual add node, (the branch input, the input that stays): the branch holds more
    linear layers since the fork than the other input."""

    def linear_count(nodes: set[fx.Node]) -> int:
        return sum(n.op == "call_module" and isinstance(gm.get_submodule(n.target), LINEAR) for n in nodes)

    out = {}
    for node in gm.graph.nodes:
        args = [a for a in node.args if isinstance(a, fx.Node)]
        if not _is_add(node) or len(args) != 2 or len(node.args) != 2:
            continue
        a, b = args
        anc_a, anc_b = _ancestors(a), _ancestors(b)
        na, nb = linear_count(anc_a - anc_b), linear_count(anc_b - anc_a)
        shape = lambda n: getattr(n.meta.get("tensor_meta"), "shape", None)  # noqa: E731
        if na == nb or shape(a) != shape(b) or shape(a) is None:
            continue
        branch, stays = (a, b) if na > nb else (b, a)
        out[node.name] = (branch.name, stays.name)
    return out


def drop_branches(gm: fx.GraphModule, adds: tuple[str, ...]) -> fx.GraphModule:
    """Return `gm` with the branch of each named residual add removed (the add passes the other input)."""
    if not adds:
        return gm
    found = residual_branches(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    for name in adds:
        if name not in found:
            raise ValueError(f"'{name}' is not a residual add of this model")
        _, stays = found[name]
        nodes[name].replace_all_uses_with(nodes[stays])
        gm.graph.erase_node(nodes[name])
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    # an in-place op after a dropped add (a block's closing ReLU) would now overwrite the previous block's
    # output, which autograd still needs
    for n in gm.graph.nodes:
        if n.kwargs.get("inplace"):
            n.kwargs = {**n.kwargs, "inplace": False}
    for m in gm.modules():
        if getattr(m, "inplace", False) is True:
            m.inplace = False
    gm.recompile()
    return gm


def _groups(gm: fx.GraphModule, example: torch.Tensor):
    """Return torch-pruning's dependency graph of `gm` and its channel groups as (root module name, group);
    the output layer is never pruned (its channels are the classes)."""
    import torch_pruning as tp

    dg = tp.DependencyGraph().build_dependency(gm, example_inputs=example)
    last = [m for m in gm.modules() if isinstance(m, LINEAR)][-1:]
    names = {m: n for n, m in gm.named_modules()}
    out = []
    for group in dg.get_all_groups(ignored_layers=last, root_module_types=list(LINEAR)):
        root = group[0].dep.target.module
        if names.get(root) is not None:
            out.append((names[root], group))
    return dg, out


def _prune_fn(module: nn.Module):
    import torch_pruning as tp

    return tp.prune_linear_out_channels if isinstance(module, nn.Linear) else tp.prune_conv_out_channels


def _out_channels(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def apply_pruning(gm: fx.GraphModule, pruning: Pruning, example: torch.Tensor) -> fx.GraphModule:
    """Return a copy of the shape-propagated `gm` with `pruning` replayed: branches dropped, then each
    recorded group's channels removed (ValueError when it does not fit the graph)."""
    gm = drop_branches(copy.deepcopy(gm), pruning.branches)
    if pruning.channels:
        dg, _ = _groups(gm, example)
        modules = dict(gm.named_modules())
        for name, idx in pruning.channels:
            mod = modules.get(name)
            if mod is None or not isinstance(mod, LINEAR) or max(idx, default=-1) >= _out_channels(mod):
                raise ValueError(f"channel removal of '{name}' does not fit this model")
            dg.get_pruning_group(mod, _prune_fn(mod), list(idx)).prune()
    return propagate_shapes(gm, example)


@dataclass(frozen=True)
class StructureScores:
    """First-order Taylor importance of each channel group's channels and of each residual branch: per
    batch |the loss change removing it would make|, summed over batches (as the sites' taylor ranking)."""

    channels: dict[str, torch.Tensor]  # root module of a group -> per channel (over all its layers' outputs)
    branches: dict[str, float]  # residual add -> of its branch


def _gate(model: fx.GraphModule, node: fx.Node, name: str, shape: tuple[int, ...]) -> None:
    """Multiply `node`'s output by a new parameter of ones `name` (its gradient is sum a * dL/da)."""
    model.register_parameter(name, nn.Parameter(torch.ones(shape)))
    users = list(node.users)
    with model.graph.inserting_after(node):
        gate = model.graph.get_attr(name)
    with model.graph.inserting_after(gate):
        gated = model.graph.call_function(operator.mul, (node, gate))
    for u in users:
        u.replace_input_with(node, gated)


def _layer_outputs(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Return per linear layer the node holding its output channels: its BatchNorm when one follows alone."""
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and isinstance(gm.get_submodule(n.target), LINEAR):
            users = list(n.users)
            bn = users[0] if len(users) == 1 and users[0].op == "call_module" else None
            norm = bn is not None and isinstance(gm.get_submodule(bn.target), nn.modules.batchnorm._BatchNorm)
            out[n.target] = bn if norm else n
    return out


def _out_handler(dep) -> bool:
    import torch_pruning as tp

    return dep.handler in (tp.prune_conv_out_channels, tp.prune_linear_out_channels)


def _root_index(i) -> int:
    """Return the root channel a torch-pruning index maps to (its own index where it carries no root's)."""
    root = getattr(i, "root_idx", None)
    return int(root if root is not None else getattr(i, "idx", i))


def structure_scores(gm: fx.GraphModule, data: Dataset, samples: int = 5000) -> StructureScores:
    """Return the StructureScores of `gm` from one gradient pass of cross-entropy over `samples` train samples:
    gates of ones on every branch and every layer's output channels, whose gradients are sum a * dL/da."""
    model, plain = copy.deepcopy(gm), copy.deepcopy(gm)
    nodes = {n.name: n for n in model.graph.nodes}
    gates, layer_gates = {}, {}
    for i, (add, (branch, _)) in enumerate(residual_branches(model).items()):
        gates[add] = f"_relu_opt_gate_{i}"
        _gate(model, nodes[branch], gates[add], ())
    for i, (layer, node) in enumerate(_layer_outputs(model).items()):
        shape = tuple(node.meta["tensor_meta"].shape)
        layer_gates[layer] = f"_relu_opt_channels_{i}"
        _gate(model, node, layer_gates[layer], (1, shape[1]) + (1,) * (len(shape) - 2))
    model.recompile()
    params = dict(model.named_parameters())
    _, groups = _groups(plain, data.train.x[:1])
    names = {m: n for n, m in plain.named_modules()}
    sal = dict.fromkeys(gates, 0.0)
    chans = {root: 0.0 for root, _ in groups}
    with eval_mode(model):
        for x, y in batches(data.train.subset(samples), 128):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            for add, name in gates.items():
                sal[add] += float(params[name].grad.abs())
            for root, group in groups:
                total = torch.zeros(_out_channels(plain.get_submodule(root)))
                for dep, idxs in group:
                    layer = names.get(dep.target.module)
                    if _out_handler(dep) and layer in layer_gates:
                        g = params[layer_gates[layer]].grad.reshape(-1)
                        at = torch.tensor([int(getattr(i, "idx", i)) for i in idxs])
                        pos = torch.tensor([_root_index(i) for i in idxs])
                        total.index_add_(0, pos, g[at])
                chans[root] = chans[root] + total.abs()
    return StructureScores(chans, sal)


def _rounded(n: int, keep: float) -> int:
    if keep >= 1:
        return n
    k = round(n * keep / 4) * 4 if n >= 8 else round(n * keep)
    return max(1, min(n, k))


def candidate(
    gm: fx.GraphModule, example: torch.Tensor, scores: StructureScores, keep: float, branches: int
) -> Pruning:
    """Return the Pruning that drops the `branches` least important residual branches, then removes the
    least important channels of every group so that `keep` of each stays."""
    order = sorted(scores.branches, key=scores.branches.get)[:branches]
    pruning = Pruning(branches=tuple(order), loss=sum(scores.branches[a] for a in order))
    if keep >= 1:
        return pruning
    g = drop_branches(copy.deepcopy(gm), pruning.branches)
    _, groups = _groups(g, example)
    channels, loss = [], pruning.loss
    for root, _ in groups:
        mod = g.get_submodule(root)
        n = _out_channels(mod)
        k = _rounded(n, keep)
        if k >= n:
            continue
        s = scores.channels.get(root)
        if s is None or len(s) != n:  # a group that dropping branches changed: its root's magnitude instead
            s = mod.weight.detach().flatten(1).norm(dim=1)
        idx = torch.argsort(s, stable=True)[: n - k].tolist()
        loss += float(s[idx].sum())
        channels.append((root, tuple(sorted(idx))))
    return Pruning(keep, pruning.branches, tuple(channels), loss)

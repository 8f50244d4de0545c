"""Fold eval-mode BatchNorm into the convolution before it; turn the rest into per-channel affines.

CrypTen recomputes an encrypted inverse square root for every BatchNorm on every forward, so a model
must reach it with no BatchNorm left.
"""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from relu_opt.activations import ChannelAffine
from relu_opt.passes.utils import set_submodule

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of `gm` with every BatchNorm folded into its conv or turned into ChannelAffine."""
    gm = copy.deepcopy(gm)
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), _BN):
            continue
        bn = modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue  # normalises with batch statistics even in eval mode: not an affine map
        src = node.args[0]
        conv = modules.get(src.target) if isinstance(src, fx.Node) and src.op == "call_module" else None
        if isinstance(conv, nn.modules.conv._ConvNd) and not conv.transposed and len(src.users) == 1:
            set_submodule(gm, src.target, fuse_conv_bn_eval(conv.eval(), bn.eval()))
            node.replace_all_uses_with(src)
            gm.graph.erase_node(node)
        else:
            scale = (
                bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
                if bn.affine
                else (1 / (bn.running_var + bn.eps).sqrt())
            )
            shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
            set_submodule(gm, node.target, ChannelAffine(scale, shift))
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm

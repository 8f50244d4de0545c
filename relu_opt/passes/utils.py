"""Small helpers shared by the passes."""

from __future__ import annotations

import torch.fx as fx
from torch import nn


def set_submodule(gm: fx.GraphModule, qualname: str, module: nn.Module) -> None:
    """Put `module` at dotted `qualname` in `gm`, creating nothing but the last attribute."""
    parent, _, name = qualname.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, name, module)

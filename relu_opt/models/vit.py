"""A small Vision Transformer: patch embedding, a few pre-norm blocks (LayerNorm, softmax attention, GELU
MLP), mean-pooled tokens. Works on any input size divisible by the patch (28x28 and 32x32 with patch 4).

Written with ops CrypTen's ONNX converter runs: heads as separate projections (no head reshapes), and
a depthwise-conv positional encoding (CPVT's conditional encoding), so no table sized to one input.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from relu_opt.models.registry import register_model


class Attention(nn.Module):
    """Multi-head softmax self-attention with one query/key/value projection per head."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q = nn.ModuleList(nn.Linear(dim, self.head_dim) for _ in range(heads))
        self.k = nn.ModuleList(nn.Linear(dim, self.head_dim) for _ in range(heads))
        self.v = nn.ModuleList(nn.Linear(dim, self.head_dim) for _ in range(heads))
        self.proj = nn.Linear(self.head_dim * heads, dim)
        self.scale = 1 / math.sqrt(self.head_dim)

    def forward(self, x: Tensor) -> Tensor:
        outs = []
        for q, k, v in zip(self.q, self.k, self.v):
            scores = q(x) @ k(x).transpose(1, 2) * self.scale
            outs.append(torch.softmax(scores, -1) @ v(x))
        return self.proj(torch.cat(outs, -1))


class Block(nn.Module):
    """x + attn(LN(x)), then x + MLP(LN(x)) with a GELU MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Patch embedding, positional depthwise conv, `depth` blocks, LayerNorm, mean over tokens, linear head."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        dim: int = 32,
        depth: int = 2,
        heads: int = 2,
        patch: int = 4,
    ) -> None:
        super().__init__()
        self.embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.pos = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        x = x + self.pos(x)
        tokens = x.flatten(2).transpose(1, 2)  # (N, patches, dim)
        tokens = self.norm(self.blocks(tokens))
        return self.head(tokens.mean(1))


@register_model
def vit_tiny(num_classes: int = 10, in_channels: int = 3) -> ViT:
    """Small ViT: patch 4, dim 32, 2 blocks of 2-head softmax attention and a GELU MLP, LayerNorm."""
    return ViT(num_classes, in_channels)

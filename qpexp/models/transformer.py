"""A small pre-LN transformer encoder classifier (ViT-style) for images and 1-D sequences.

Patch embedding: a convolution whose kernel and stride are the patch size (``Conv2d`` for images,
``Conv1d`` for sequences), a learned position embedding, ``depth`` pre-LN blocks
(``x + MHA(LN(x))``, ``x + MLP(LN(x))`` with GELU, ``nn.MultiheadAttention``), a final LayerNorm,
then the class token (``pool="cls"``) or the mean over tokens (``pool="mean"``) into a linear head.

``patch=None`` picks ``max(1, L // 10)`` for sequences (MNIST-1D: 4, i.e. 10 tokens) and
``max(1, min(H, W) // 8)`` for images (32x32: 4, i.e. 64 tokens; 8x8: 1).
"""

from __future__ import annotations

import torch
from torch import nn

from qpexp.models.common import signal


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_dim, dim)

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class Transformer(nn.Module):
    def __init__(
        self,
        input_shape,
        num_classes: int,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        patch: int | None = None,
        pool: str = "cls",
        dropout: float = 0.0,
    ):
        super().__init__()
        s = signal(input_shape, "transformer")
        if pool not in ("cls", "mean"):
            raise ValueError(f"model.pool={pool!r} must be 'cls' or 'mean'")
        if dim % heads:
            raise ValueError(f"model.dim={dim} must be divisible by model.heads={heads}")
        if patch is None:
            patch = max(1, s.size[0] // 10) if s.dims == 1 else max(1, min(s.size) // 8)
        tokens = 1
        for d in s.size:
            tokens *= d // patch
        if tokens < 1:
            raise ValueError(f"model.patch={patch} is larger than the samples ({tuple(input_shape)})")
        self.pool = pool
        self.reshape = s.reshape()
        self.embed = s.conv(s.channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + (pool == "cls"), dim) * 0.02)
        self.blocks = nn.Sequential(
            *[Block(dim, heads, round(dim * mlp_ratio), dropout) for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.embed(self.reshape(x)).flatten(2).transpose(1, 2)  # (N, tokens, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        return self.head(x[:, 0] if self.pool == "cls" else x.mean(1))


def transformer(input_shape, num_classes: int, **kwargs) -> Transformer:
    return Transformer(input_shape, num_classes, **kwargs)

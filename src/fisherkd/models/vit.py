"""A tiny Vision Transformer in plain PyTorch, for 28×28 and 32×32 images."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherkd.models.registry import register_model


class Attention(nn.Module):
    """Multi-head self-attention; ``probs`` is an identity module whose output is the (B, heads, N, N) attention map."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # softmax is computed explicitly (not fused) so attention-distillation losses can tap the maps
        self.probs = nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = self.probs((q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1))
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a GELU MLP, each added back to the residual stream."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ClassToken(nn.Module):
    """Select the class token: (B, N, D) → (B, D)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[:, 0]


class VisionTransformer(nn.Module):
    """ViT: patch embedding (``stem``), class token, learned positions, ``blocks.0``..``blocks.{depth-1}``, head.

    Positions are learned for ``image_size``; other input sizes (28×28 for a model built for 32×32) get them
    bicubically interpolated to their patch grid.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int = 32,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        self.grid = image_size // patch_size
        self.stem = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.blocks = nn.Sequential(*(Block(dim, heads, mlp_ratio) for _ in range(depth)))
        self.features = nn.Sequential(nn.LayerNorm(dim), ClassToken())
        self.head = nn.Linear(dim, num_classes)
        self.stages: tuple[str, ...] = tuple(f"blocks.{i}" for i in range(depth))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def positions(self, h: int, w: int) -> Tensor:
        if (h, w) == (self.grid, self.grid):
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = patches.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        pos = self.positions(*x.shape[-2:])
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        return self.head(self.features(self.blocks(x)))


@register_model("vit_tiny")
def vit_tiny(in_channels: int = 3, num_classes: int = 100, **kwargs) -> VisionTransformer:
    """A tiny ViT (Dosovitskiy et al., "An Image is Worth 16x16 Words", 2021): patch 4, dim 64, depth 4, 4 heads."""
    return VisionTransformer(in_channels, num_classes, **kwargs)

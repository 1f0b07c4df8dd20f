"""DiT: a transformer over patch tokens with adaLN-Zero conditioning (Peebles & Xie, 2023).

The backbone is `net(x, t, cond) -> out` and knows nothing of diffusion or parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from dtrain.models.layers import (Attention, FinalLayer, LabelEmbedder, Mlp, PatchEmbed,
                                  TimestepEmbedder, init_backbone_, modulate, sincos_pos_embed_2d,
                                  span_condition, span_embedding, unpatchify, zero_)


class DiTBlock(nn.Module):
    """Attention + MLP, each gated by adaLN-Zero: shift, scale and gate regressed from c
    (DiT Sec. 3.2); DiT zero-initialises the regressor."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # x [B, N, D], c [B, D]
        s1, sc1, g1, s2, sc2, g2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class DiT(nn.Module):
    def __init__(self, image_size: int, in_channels: int, patch_size: int, hidden_size: int,
                 depth: int, num_heads: int, num_classes: int, class_dropout: float = 0.1,
                 mlp_ratio: float = 4.0, qk_norm: bool = False, grad_checkpointing: bool = False,
                 flow_map: bool = False):
        super().__init__()
        self.in_channels, self.patch_size = in_channels, patch_size
        self.grid = image_size // patch_size
        self.grad_checkpointing = grad_checkpointing
        self.x_embed = PatchEmbed(in_channels, patch_size, hidden_size)
        self.t_embed = TimestepEmbedder(hidden_size)
        self.y_embed = LabelEmbedder(num_classes, hidden_size, class_dropout)
        self.span_embed = span_embedding(hidden_size, flow_map)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size, in_channels)
        init_backbone_(self)
        # adaLN-Zero: every block starts as the identity and the output layer at zero.
        zero_(*(b.adaLN[-1] for b in self.blocks), self.final.linear, self.final.adaLN[-1],
              *([self.span_embed.mlp[-1]] if flow_map else []))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                s: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] in [0, 1], cond [B] class labels -> [B, C, H, W]; a flow map also takes
        the time s [B] it jumps to (None: s = t, its velocity)."""
        h = self.x_embed(x) + self.pos_embed.to(x.dtype)  # [B, N, D]
        c = self.t_embed(t) + self.y_embed(cond) + span_condition(self, t, s)  # [B, D]
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = checkpoint(block, h, c, use_reentrant=False)
            else:
                h = block(h, c)
        return unpatchify(self.final(h, c), self.patch_size, self.in_channels, self.grid)


@dataclass(frozen=True)
class DiTSize:
    hidden_size: int
    depth: int
    num_heads: int


# Sizes registry: the DiT paper's S/B/L/XL (Table 1), plus small ones for CPUs and tests.
SIZES = {
    "tiny": DiTSize(64, 2, 2),
    "mini": DiTSize(128, 6, 4),
    "S": DiTSize(384, 12, 6),
    "B": DiTSize(768, 12, 12),
    "L": DiTSize(1024, 24, 16),
    "XL": DiTSize(1152, 28, 16),
}


def build(m) -> DiT:
    """Build from a ModelConfig; nonzero hidden_size/depth/num_heads override the named size."""
    size = SIZES[m.size]
    return DiT(image_size=m.image_size, in_channels=m.in_channels, patch_size=m.patch_size,
               hidden_size=m.hidden_size or size.hidden_size, depth=m.depth or size.depth,
               num_heads=m.num_heads or size.num_heads, num_classes=m.num_classes,
               class_dropout=m.class_dropout, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm, flow_map=m.flow_map)

"""DiT: a transformer over patch tokens with adaLN-Zero conditioning (Peebles & Xie, 2023).

The backbone is `net(x, t, cond) -> out` and knows nothing of diffusion or parallelism.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from dtrain.models.layers import (Attention, Context, CrossAttention, FinalLayer, LabelEmbedder, Mlp,
                                  PatchEmbed, TimestepEmbedder, init_backbone_, modulate,
                                  sincos_pos_embed_2d, span_condition, span_embedding, unpatchify, zero_)
from dtrain.models.text import TextEncoder


class DiTBlock(nn.Module):
    """Attention + MLP, each gated by adaLN-Zero: shift, scale and gate regressed from c
    (DiT Sec. 3.2); DiT zero-initialises the regressor. A text block cross-attends to the caption
    between the two (PixArt-alpha)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, qk_norm: bool, text: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, qk_norm)
        self.cross = CrossAttention(dim, heads) if text else None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        """x [B, N, D], c [B, D]; context: the caption (text blocks only)."""
        s1, sc1, g1, s2, sc2, g2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + g1.unsqueeze(1) * self.attn(modulate(self.norm1(x), s1, sc1))
        if self.cross is not None:
            x = self.cross(x, context)
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))


class DiT(nn.Module):
    def __init__(self, image_size: int, in_channels: int, patch_size: int, hidden_size: int,
                 depth: int, num_heads: int, num_classes: int, class_dropout: float = 0.1,
                 mlp_ratio: float = 4.0, qk_norm: bool = False, grad_checkpointing: bool = False,
                 flow_map: bool = False, text: TextSpec | None = None):
        super().__init__()
        self.in_channels, self.patch_size = in_channels, patch_size
        self.grid = image_size // patch_size
        self.grad_checkpointing = grad_checkpointing
        self.x_embed = PatchEmbed(in_channels, patch_size, hidden_size)
        self.t_embed = TimestepEmbedder(hidden_size)
        # one conditioner: class labels, or a caption's token ids through a text encoder
        self.y_embed = LabelEmbedder(num_classes, hidden_size, class_dropout) if text is None else None
        self.text = None if text is None else TextEncoder(text.vocab_size, text.max_tokens, hidden_size, text.depth,
                                                          num_heads, class_dropout, text.embed_dim)
        self.span_embed = span_embedding(hidden_size, flow_map)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, self.grid)[None], persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, text is not None)
                                    for _ in range(depth))
        self.final = FinalLayer(hidden_size, patch_size, in_channels)
        init_backbone_(self)
        # adaLN-Zero: every block starts as the identity and the output layer at zero.
        zero_(*(b.adaLN[-1] for b in self.blocks), self.final.linear, self.final.adaLN[-1],
              *([self.span_embed.mlp[-1]] if flow_map else []), *cross_outputs(self.blocks))

    def condition(self, cond: torch.Tensor) -> tuple[torch.Tensor, Context | None]:
        """cond -> (its vector [B, D] for adaLN, the caption's tokens for cross-attention or None):
        class labels [B], or token ids [B, L] of a text model (dtrain.models.text)."""
        if self.text is None:
            return self.y_embed(cond), None
        context, pooled = self.text(cond)
        return pooled, context

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                s: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, C, H, W], t [B] in [0, 1], cond [B] class labels or [B, L] token ids -> [B, C, H, W]; a
        flow map also takes the time s [B] it jumps to (None: s = t, its velocity)."""
        y, context = self.condition(cond)
        return self.forward_conditioned(x, t, y, context, s)

    def forward_conditioned(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, context: Context | None,
                            s: torch.Tensor | None = None) -> torch.Tensor:
        """forward on a condition already built (`condition`'s vector y [B, D] and caption context): the
        seam regional attention (dtrain.regions) uses to hand the blocks a context of its own."""
        h = self.x_embed(x) + self.pos_embed.to(x.dtype)  # [B, N, D]
        c = self.t_embed(t) + y + span_condition(self, t, s)  # [B, D]
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                h = checkpoint(block, h, c, context, use_reentrant=False)
            else:
                h = block(h, c, context)
        return unpatchify(self.final(h, c), self.patch_size, self.in_channels, self.grid)


def cross_outputs(blocks) -> list[nn.Linear]:
    """The cross-attention output projections, zero-initialised like adaLN-Zero's gates."""
    return [b.cross.proj for b in blocks if b.cross is not None]


@dataclass(frozen=True)
class TextSpec:
    """A text model's caption encoder: token table size, caption length in tokens, encoder depth, and the
    width of a frozen encoder's embeddings it takes instead of token ids (0: none, ids)."""
    vocab_size: int
    max_tokens: int
    depth: int
    embed_dim: int = 0


def text_spec(m) -> TextSpec | None:
    """The ModelConfig's text encoder, or None for a class-conditional model."""
    if m.conditioning != "text":
        return None
    if m.text_encoder and not m.text_embed_dim:
        raise ValueError(f"model.text_embed_dim: unset for the frozen encoder {m.text_encoder} (the driver sets it "
                         "from the encoder's config)")
    return TextSpec(m.vocab_size, m.max_tokens, m.text_depth, m.text_embed_dim if m.text_encoder else 0)


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
               class_dropout=m.class_dropout, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm, flow_map=m.flow_map,
               text=text_spec(m))

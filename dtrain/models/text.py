"""A caption encoder trained with the backbone: token ids -> per-token states and a pooled vector (the
conditioning a text-to-image backbone cross-attends to and feeds its adaLN, PixArt-style).

From scratch, it embeds token ids: PAD_ID is padding, and an all-padding row is the empty caption, the
null condition of classifier-free guidance. Over a frozen Hugging Face encoder (dtrain.data.text_encoders)
it takes that encoder's embeddings [B, L, E] instead, padding rows zero (an all-zero caption is the null
condition), and projects them to the backbone's width; its own blocks then adapt them. A learned start
token always sits at position 0, so the empty caption is a sequence of one token, never an empty
attention (whose softmax would be NaN), and its encoding is learned like any other caption's.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from dtrain.models.layers import Attention, Context, Mlp

PAD_ID = 0  # the tokenizer's padding id (dtrain.data.captions puts [PAD] first)


class TextBlock(nn.Module):
    """Pre-norm transformer encoder block over the caption's tokens; padding is masked out."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4.0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x [B, M, D], mask [B, M]
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    """ids [B, L] (or a frozen encoder's embeddings [B, L, E] when embed_dim > 0) -> (Context(tokens
    [B, L+1, D], mask [B, L+1]), pooled [B, D]); the pooled vector is the start token's final state. In
    training each caption is replaced by the empty one with probability `dropout` (what classifier-free
    guidance needs, as LabelEmbedder does for labels)."""

    def __init__(self, vocab_size: int, max_tokens: int, dim: int, depth: int, heads: int, dropout: float,
                 embed_dim: int = 0):
        super().__init__()
        self.max_tokens, self.dropout = max_tokens, dropout
        self.table = nn.Embedding(vocab_size, dim) if not embed_dim else None
        self.project = nn.Linear(embed_dim, dim) if embed_dim else None
        self.start = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, max_tokens + 1, dim))
        nn.init.normal_(self.start, std=0.02)
        nn.init.normal_(self.pos, std=0.02)
        self.blocks = nn.ModuleList(TextBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pooled = nn.Linear(dim, dim)

    def forward(self, cond: torch.Tensor) -> tuple[Context, torch.Tensor]:
        B, L = cond.shape[:2]
        if L > self.max_tokens:
            raise ValueError(f"{L} tokens per caption, more than the encoder's {self.max_tokens} (model.max_tokens)")
        frozen = self.project is not None
        if frozen != cond.is_floating_point():
            raise ValueError("a text model over a frozen encoder takes its embeddings [B, L, E], one trained from "
                             f"scratch token ids [B, L]; got {cond.dtype} {list(cond.shape)}")
        if self.training and self.dropout > 0:
            drop = torch.rand(B, device=cond.device) < self.dropout
            cond = torch.where(drop.view(-1, *[1] * (cond.ndim - 1)), torch.zeros_like(cond), cond)
        present = cond.abs().amax(-1) > 0 if frozen else cond != PAD_ID  # [B, L]
        mask = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=cond.device), present], dim=1)
        tokens = self.project(cond.to(self.project.weight.dtype)) if frozen else self.table(cond)
        h = torch.cat([self.start.expand(B, -1, -1), tokens], dim=1) + self.pos[:, :L + 1]
        for block in self.blocks:
            h = block(h, mask)
        h = self.norm(h)
        return Context(h, mask), self.pooled(h[:, 0])

"""Blocks shared by every backbone: embeddings, attention, MLP, adaLN modulation, patching."""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x [B, N, D], shift/scale [B, D] (DiT, Peebles & Xie 2023, Sec. 3.2)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Continuous t in [0, 1] -> sinusoidal features (t scaled by 1000, as DDPM steps) -> MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # t [B] -> [B, D]
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def span_embedding(hidden: int, flow_map: bool) -> nn.Module | None:
    """A flow map's second time, embedded as the span s - t (MeanFlow embeds t - r) and added to the
    conditioning; its output layer is zeroed after the backbone's init (`zero_span`), so a flow-map net
    starts as the velocity net it may be initialised from: u(x, t, t) = v(x, t)."""
    return TimestepEmbedder(hidden) if flow_map else None


def span_condition(module: nn.Module, t: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor | float:
    """What the span adds to the conditioning c [B, D]: 0 for a velocity net (s must be None)."""
    if module.span_embed is None:
        if s is not None:
            raise ValueError("this net takes one time (a velocity net): build it with model.flow_map=true "
                             "to give it a second")
        return 0.0
    return module.span_embed(torch.zeros_like(t) if s is None else s - t)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Index num_classes is the null label, and so is any negative label; in
    training each label is replaced by it with probability `dropout`, which is what classifier-free
    guidance needs."""

    def __init__(self, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.num_classes, self.dropout = num_classes, dropout
        self.table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        # a negative label (-1: a captioned sample without a class) means "no class": the null label
        labels = torch.where(labels < 0, torch.full_like(labels, self.num_classes), labels)
        if self.training and self.dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.dropout
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.table(labels)


class Attention(nn.Module):
    """Multi-head self-attention through scaled_dot_product_attention (flash kernels on GPU)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False):
        super().__init__()
        assert dim % heads == 0, f"hidden size {dim} not divisible by {heads} heads"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        head_dim = dim // heads
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # [B, N, D]
        """mask [B, N] bool: the tokens that may be attended to (None: all)."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        attn_mask = None if mask is None else mask[:, None, None, :]
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v, attn_mask=attn_mask)  # [B, H, N, Dh]
        return self.proj(out.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    """Image tokens attend to a caption's tokens (PixArt-alpha, Chen et al. 2023, Sec. 2.3): a
    pre-norm residual branch after self-attention, without adaLN modulation. Its output projection is
    zero-initialised by the backbone, so a text block starts as the block without it."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        assert dim % heads == 0, f"hidden size {dim} not divisible by {heads} heads"
        self.heads = heads
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        # (probs [B, H, N, M], allowed [B, 1, N or 1, M]) -> the probabilities used: set by prompt-to-prompt
        # editing (dtrain.editing) to record or replace the maps; None (always, outside an edit): fused SDPA
        self.probs_hook = None

    def forward(self, x: torch.Tensor, context: "Context") -> torch.Tensor:  # x [B, N, D] -> x + attention
        B, N, D = x.shape
        M, H = context.tokens.shape[1], self.heads
        q = self.q(self.norm(x)).view(B, N, H, D // H).transpose(1, 2)  # [B, H, N, Dh]
        k, v = self.kv(context.tokens).view(B, M, 2, H, D // H).permute(2, 0, 3, 1, 4)  # each [B, H, M, Dh]
        mask = context.mask[:, None, :]  # [B, 1, M]: every image token sees the caption's existing tokens
        if context.query_mask is not None:
            mask = mask & context.query_mask  # [B, N, M]: regional attention
        if self.probs_hook is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # broadcast over heads
        else:  # the same attention with its probabilities explicit, for the hook to see or swap
            scores = (q @ k.transpose(-2, -1)) * (D // H) ** -0.5  # [B, H, N, M]
            allowed = mask[:, None]
            out = self.probs_hook(scores.masked_fill(~allowed, float("-inf")).softmax(-1), allowed) @ v
        return x + self.proj(out.transpose(1, 2).reshape(B, N, D))


class Context(NamedTuple):
    """A caption as the backbone's blocks see it: tokens [B, M, D] at the backbone's width and the
    mask [B, M] of the ones that exist (always at least the start token). query_mask [B, N, M]: which
    tokens each image token (row-major patch) may attend to besides, for regional attention
    (dtrain.regions); None: every image token sees every existing token."""
    tokens: torch.Tensor
    mask: torch.Tensor
    query_mask: torch.Tensor | None = None


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = int(dim * ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)(W/p), D] tokens in row-major order."""

    def __init__(self, in_channels: int, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unpatchify(x: torch.Tensor, patch: int, channels: int, grid: int) -> torch.Tensor:
    """[B, N, p*p*C] -> [B, C, H, W]; inverse of PatchEmbed's token order."""
    B = x.shape[0]
    x = x.view(B, grid, grid, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, grid * patch, grid * patch)


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embedding [grid*grid, dim] (MAE / DiT)."""
    assert dim % 4 == 0, "hidden size must be divisible by 4 for 2D sin-cos embeddings"
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def emb(pos: torch.Tensor) -> torch.Tensor:
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([emb(ys), emb(xs)], dim=1).float()


def zero_(*layers: nn.Linear) -> None:
    for layer in layers:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def init_backbone_(net: nn.Module) -> None:
    """DiT's init: Xavier linears, N(0, 0.02) label, token and timestep embeddings. Call before the
    zero-inits of adaLN-Zero, which the backbone applies last."""
    for m in net.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            nn.init.xavier_uniform_(m.proj.weight.view(m.proj.weight.shape[0], -1))
            nn.init.zeros_(m.proj.bias)
        elif isinstance(m, nn.Embedding):  # a label table or a text encoder's token table
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, TimestepEmbedder):
            for layer in (m.mlp[0], m.mlp[2]):
                nn.init.normal_(layer.weight, std=0.02)


class FinalLayer(nn.Module):
    """adaLN -> linear to patch pixels; the backbone zero-initialises both (zero output at init)."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))

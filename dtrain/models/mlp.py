"""A residual MLP for vector data (e.g. 2-D Gaussian-mixture points), conditioned like DiT.

The backbone is `net(x, t, cond) -> out` and knows nothing of diffusion or parallelism. It flattens
whatever shape the data path gives ([B, C, H, W] with C*H*W = dim; GMM shards store a D-dimensional
point as [D, 1, 1]) to [B, dim] and returns the input's shape. Time and class enter through
adaLN-Zero (DiT Sec. 3.2): each residual block starts as the identity and the output layer at zero,
so an untrained net predicts v = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from dtrain.models.layers import LabelEmbedder, TimestepEmbedder, init_backbone_, span_condition, span_embedding, zero_


def _modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN on vectors: h, shift, scale [B, D]."""
    return h * (1 + scale) + shift


class MLPBlock(nn.Module):
    """h + gate * MLP(modulate(LN(h))), with shift, scale and gate regressed from c (zero-initialised)."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 3 * dim))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:  # h, c [B, D]
        shift, scale, gate = self.adaLN(c).chunk(3, dim=-1)
        return h + gate * self.mlp(_modulate(self.norm(h), shift, scale))


class FourierFeatures(nn.Module):
    """x [B, D] -> [x, sin(2^k pi x), cos(2^k pi x) for k < octaves] [B, D (1 + 2 octaves)]: the positional
    encoding of NeRF (Mildenhall et al. 2020, Eq. 4). An MLP on raw low-dimensional inputs learns sharp
    functions of them slowly (spectral bias; Tancik et al. 2020); on these it does not."""

    def __init__(self, octaves: int):
        super().__init__()
        self.register_buffer("freqs", math.pi * 2.0 ** torch.arange(octaves, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angles = (x[..., None] * self.freqs.to(x.dtype)).flatten(1)  # [B, D * octaves]
        return torch.cat([x, angles.sin(), angles.cos()], dim=1)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden_size: int, depth: int, num_classes: int,
                 class_dropout: float = 0.1, mlp_ratio: float = 4.0, flow_map: bool = False, fourier_octaves: int = 0):
        super().__init__()
        self.dim = dim
        self.features = FourierFeatures(fourier_octaves) if fourier_octaves else nn.Identity()
        self.x_embed = nn.Linear(dim * (1 + 2 * fourier_octaves), hidden_size)
        self.t_embed = TimestepEmbedder(hidden_size)
        self.y_embed = LabelEmbedder(num_classes, hidden_size, class_dropout)  # null label = num_classes
        self.span_embed = span_embedding(hidden_size, flow_map)
        self.blocks = nn.ModuleList(MLPBlock(hidden_size, mlp_ratio) for _ in range(depth))
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_adaLN = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.final = nn.Linear(hidden_size, dim)
        init_backbone_(self)
        # adaLN-Zero: every block starts as the identity and the output layer at zero.
        zero_(*(b.adaLN[-1] for b in self.blocks), self.final_adaLN[-1], self.final,
              *([self.span_embed.mlp[-1]] if flow_map else []))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                s: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, ...] with prod(...) = dim, t [B] in [0, 1], cond [B] class labels -> x's shape; a flow
        map also takes the time s [B] it jumps to (None: s = t)."""
        if x[0].numel() != self.dim:
            raise ValueError(f"mlp backbone built for {self.dim} features per sample, got shape {tuple(x.shape[1:])}")
        h = self.x_embed(self.features(x.flatten(1)))  # [B, H]
        c = self.t_embed(t) + self.y_embed(cond) + span_condition(self, t, s)  # [B, H]
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_adaLN(c).chunk(2, dim=-1)
        return self.final(_modulate(self.final_norm(h), shift, scale)).view_as(x)


@dataclass(frozen=True)
class MLPSize:
    hidden_size: int
    depth: int


# Sizes registry: tiny for tests, S/B for 2-D toy problems on a CPU.
SIZES = {
    "tiny": MLPSize(32, 2),
    "S": MLPSize(256, 4),
    "B": MLPSize(512, 6),
}


def build(m) -> MLP:
    """Build from a ModelConfig: dim = in_channels * image_size**2 (a 2-D point: in_channels=2,
    image_size=1, patch_size=1); nonzero hidden_size/depth override the named size; num_heads,
    patch_size and qk_norm are unused."""
    size = SIZES[m.size]
    return MLP(dim=m.in_channels * m.image_size ** 2, hidden_size=m.hidden_size or size.hidden_size,
               depth=m.depth or size.depth, num_classes=m.num_classes, class_dropout=m.class_dropout,
               mlp_ratio=m.mlp_ratio, flow_map=m.flow_map, fourier_octaves=m.fourier_octaves)

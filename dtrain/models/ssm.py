"""SSM hybrid: DiT with most attention blocks replaced by bidirectional Mamba-2 mixers.

Each mixer scans the patch tokens in one of several orders (rows, columns, snake), forward and
backward, in O(N) time; every `attn_every`-th block stays a DiT attention block for global mixing
(attn_every = 0: pure SSM). Conditioning, embeddings and the output layer are DiT's (adaLN-Zero).
The backbone is `net(x, t, cond) -> out` and knows nothing of diffusion or parallelism.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dtrain.models.dit import DiT, DiTBlock, TextSpec, cross_outputs, text_spec
from dtrain.models.layers import Context, CrossAttention, Mlp, init_backbone_, modulate, zero_
from dtrain.models.scan import ssd_scan


class MambaMixer(nn.Module):
    """Mamba-2 mixer (Dao & Gu 2024, Sec. 7.1), run over the sequence and its reverse.

    in_proj -> z, xBC, dt; xBC -> causal depthwise conv -> SiLU -> x, B, C;
    dt = softplus(dt + bias); y = SSD scan + D x; out_proj(RMSNorm(y * SiLU(z))).

    The two directions share the x/z/B/C projections and out_proj and have their own conv, dt
    projection, dt bias, A and D (~1% of the mixer's parameters at size S and up), as Vision Mamba does
    (Zhu et al. 2024): a causal conv and a decay rate are directional, so sharing them would make
    both scans look the same way. The reversed copy is stacked on the head axis, so both
    directions run as one conv and one scan call with 2H heads; their outputs are summed.
    """

    def __init__(self, dim: int, d_state: int = 64, head_dim: int = 64, expand: int = 2,
                 groups: int = 1, conv_kernel: int = 4, chunk: int = 64):
        super().__init__()
        inner = expand * dim
        assert inner % head_dim == 0, f"expand * hidden = {inner} not divisible by head_dim {head_dim}"
        self.inner, self.heads, self.head_dim = inner, inner // head_dim, head_dim
        self.groups, self.d_state, self.chunk = groups, d_state, chunk
        self.conv_dim = inner + 2 * groups * d_state  # x, B, C of one direction
        self.in_proj = nn.Linear(dim, inner + self.conv_dim + 2 * self.heads, bias=False)  # z, xBC, dt x2
        self.conv = nn.Conv1d(2 * self.conv_dim, 2 * self.conv_dim, conv_kernel, groups=2 * self.conv_dim,
                              padding=conv_kernel - 1)
        # Mamba's init: dt = softplus(dt_bias) log-uniform in [1e-3, 1e-1]; A = -exp(A_log) in [-16, -1].
        dt = torch.exp(torch.empty(2 * self.heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
        self.A_log = nn.Parameter(torch.empty(2 * self.heads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.ones(2 * self.heads))  # skip connection y += D x
        self.norm = nn.RMSNorm(inner)  # Mamba-2's extra norm before out_proj, for stability (Sec. 7.1)
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, u: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        b, L, _ = u.shape
        H, P, G, N = self.heads, self.head_dim, self.groups, self.d_state
        z, xbc, dt = self.in_proj(u).split([self.inner, self.conv_dim, 2 * H], dim=-1)
        xbc = torch.cat([xbc, xbc.flip(1)], dim=-1)  # [B, L, 2 conv_dim]: forward | reversed
        xbc = F.silu(self.conv(xbc.transpose(1, 2))[..., :L].transpose(1, 2))  # causal: first L outputs
        x, Bm, Cm = xbc.reshape(b, L, 2, self.conv_dim).split([self.inner, G * N, G * N], dim=-1)
        x = x.reshape(b, L, 2 * H, P)  # heads [0, H) forward, [H, 2H) reversed
        Bm, Cm = Bm.reshape(b, L, 2 * G, N), Cm.reshape(b, L, 2 * G, N)  # groups likewise
        dt = F.softplus(torch.cat([dt[..., :H], dt[..., H:].flip(1)], dim=-1) + self.dt_bias)  # [B, L, 2H]
        y = ssd_scan(x, dt, -torch.exp(self.A_log), Bm, Cm, self.chunk) + self.D[:, None] * x
        y = y[:, :, :H] + y[:, :, H:].flip(1)  # undo the reversal and sum directions: [B, L, H, P]
        return self.out_proj(self.norm(y.reshape(b, L, self.inner) * F.silu(z)))


def _snake(g: torch.Tensor) -> torch.Tensor:
    g = g.clone()
    g[1::2] = g[1::2].flip(1)
    return g


# Scan orders: grid of row-major token indices [H', W'] -> the same indices in scan order.
SCAN_ORDERS = {"row": lambda g: g, "col": lambda g: g.t(), "zigzag": _snake}


def scan_order(name: str, grid: int) -> torch.Tensor:
    """perm [grid*grid]: the i-th scanned token is row-major token perm[i]."""
    return SCAN_ORDERS[name](torch.arange(grid * grid).view(grid, grid)).reshape(-1)


class SSMBlock(nn.Module):
    """DiTBlock with the attention replaced by a MambaMixer over the tokens in one scan order;
    adaLN-Zero conditioning as in DiT Sec. 3.2 (the backbone zero-initialises the regressor)."""

    def __init__(self, dim: int, mlp_ratio: float, grid: int, order: str, heads: int = 1, text: bool = False,
                 **mixer_kw):
        super().__init__()
        self.order = order
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = MambaMixer(dim, **mixer_kw)
        self.cross = CrossAttention(dim, heads) if text else None  # a text model's caption, as in DiTBlock
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, mlp_ratio)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        perm = scan_order(order, grid)
        self.register_buffer("perm", perm, persistent=False)
        self.register_buffer("inv", torch.argsort(perm), persistent=False)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: Context | None = None) -> torch.Tensor:
        """x [B, N, D], c [B, D]; context: the caption (text blocks only)."""
        s1, sc1, g1, s2, sc2, g2 = self.adaLN(c).chunk(6, dim=-1)
        h = self.mixer(modulate(self.norm1(x), s1, sc1)[:, self.perm])[:, self.inv]  # scan order and back
        x = x + g1.unsqueeze(1) * h
        if self.cross is not None:
            x = self.cross(x, context)
        return x + g2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), s2, sc2))

    def extra_repr(self) -> str:
        return f"order={self.order}"


class SSMHybrid(DiT):
    """DiT's patch/time/label embeddings, forward and output layer around a stack where block i is
    a DiTBlock if attn_every > 0 and (i + 1) % attn_every == 0, else an SSMBlock. SSM blocks take
    the scan orders in turn."""

    def __init__(self, image_size: int, in_channels: int, patch_size: int, hidden_size: int,
                 depth: int, num_heads: int, num_classes: int, class_dropout: float = 0.1,
                 mlp_ratio: float = 4.0, qk_norm: bool = False, grad_checkpointing: bool = False,
                 attn_every: int = 4, d_state: int = 64, head_dim: int = 64, expand: int = 2,
                 scan_orders: tuple[str, ...] = ("row", "col", "zigzag"), flow_map: bool = False,
                 text: TextSpec | None = None):
        super().__init__(image_size=image_size, in_channels=in_channels, patch_size=patch_size,
                         hidden_size=hidden_size, depth=0, num_heads=num_heads, num_classes=num_classes,
                         class_dropout=class_dropout, mlp_ratio=mlp_ratio, qk_norm=qk_norm,
                         grad_checkpointing=grad_checkpointing, flow_map=flow_map, text=text)
        orders, cross = itertools.cycle(scan_orders), text is not None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, cross) if attn_every and (i + 1) % attn_every == 0
            else SSMBlock(hidden_size, mlp_ratio, self.grid, next(orders), num_heads, cross, d_state=d_state,
                          head_dim=head_dim, expand=expand)
            for i in range(depth))
        init_backbone_(self.blocks)  # DiT's init already ran on the rest (zero output layer)
        # adaLN-Zero: every block starts as the identity
        zero_(*(b.adaLN[-1] for b in self.blocks), *cross_outputs(self.blocks))


@dataclass(frozen=True)
class SSMSize:
    hidden_size: int
    depth: int
    num_heads: int  # of the attention blocks
    attn_every: int  # every k-th block is attention; 0 = pure SSM
    d_state: int  # N, state size per head
    head_dim: int  # P, channels per SSM head (heads = 2 * hidden / head_dim, per direction)


# Sizes registry: DiT's widths, depths and heads, so each size is within ~10% of the DiT size of
# the same name in parameters (an SSM block has ~20 hidden^2 weights, a DiT block ~18).
SIZES = {
    "tiny": SSMSize(64, 2, 2, 2, 16, 16),
    "mini": SSMSize(128, 6, 4, 3, 32, 32),
    "S": SSMSize(384, 12, 6, 4, 64, 64),
    "B": SSMSize(768, 12, 12, 4, 64, 64),
    "L": SSMSize(1024, 24, 16, 4, 128, 64),
    "XL": SSMSize(1152, 28, 16, 4, 128, 64),
}


def build(m) -> SSMHybrid:
    """Build from a ModelConfig; nonzero hidden_size/depth/num_heads and attn_every >= 0 override
    the named size; d_state and head_dim come from the size."""
    size = SIZES[m.size]
    return SSMHybrid(image_size=m.image_size, in_channels=m.in_channels, patch_size=m.patch_size,
                     hidden_size=m.hidden_size or size.hidden_size, depth=m.depth or size.depth,
                     num_heads=m.num_heads or size.num_heads, num_classes=m.num_classes,
                     class_dropout=m.class_dropout, mlp_ratio=m.mlp_ratio, qk_norm=m.qk_norm,
                     attn_every=size.attn_every if m.attn_every < 0 else m.attn_every,
                     d_state=size.d_state, head_dim=size.head_dim, flow_map=m.flow_map, text=text_spec(m))

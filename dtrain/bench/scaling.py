"""`dtrain bench scaling`: forward+backward time against token count for a DiT and an SSM-hybrid
of equal width and depth, and the fitted cost exponent of each (time ~ tokens^k)."""
from __future__ import annotations

import math
import time

import torch

from dtrain.config import ModelConfig
from dtrain.models import build_model

GRIDS = (16, 24, 32, 48, 64)  # patch-1 grids: 256, 576, 1024, 2304, 4096 tokens


def fwd_bwd_seconds(net: torch.nn.Module, tokens_side: int, channels: int, repeats: int) -> float:
    """Best of `repeats` timed forward+backward passes at batch 1, after one warm-up pass."""
    x = torch.randn(1, channels, tokens_side, tokens_side)
    t, y = torch.rand(1), torch.zeros(1, dtype=torch.long)
    best = math.inf
    for i in range(repeats + 1):
        start = time.perf_counter()
        net(x, t, y).square().mean().backward()
        if i:
            best = min(best, time.perf_counter() - start)
        net.zero_grad(set_to_none=True)
    return best


def fitted_exponent(tokens: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(time) on log(tokens)."""
    lx, ly = [math.log(v) for v in tokens], [math.log(v) for v in seconds]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def run(width: int = 256, depth: int = 8, grids: tuple[int, ...] = GRIDS, repeats: int = 2,
        attn_every: int = 4) -> tuple[list[dict], dict]:
    """A model per resolution (position embeddings and scan orders depend on the grid)."""
    rows, params = [], {}
    for g in grids:
        row = {"tokens": g * g}
        for arch in ("dit", "ssm"):
            torch.manual_seed(0)
            net = build_model(ModelConfig(arch=arch, size="S", hidden_size=width, depth=depth, num_heads=4,
                                          patch_size=1, in_channels=4, image_size=g, attn_every=attn_every))
            params[arch] = sum(p.numel() for p in net.parameters())
            row[f"{arch}_s"] = round(fwd_bwd_seconds(net.train(), g, 4, repeats), 4)
        row["ssm_speedup"] = round(row["dit_s"] / row["ssm_s"], 3)
        rows.append(row)
    tokens = [r["tokens"] for r in rows]
    summary = {f"{arch}_exponent": round(fitted_exponent(tokens, [r[f"{arch}_s"] for r in rows]), 3)
               for arch in ("dit", "ssm")}
    summary.update(width=width, depth=depth, attn_every=attn_every, threads=torch.get_num_threads(),
                   params_dit=params["dit"], params_ssm=params["ssm"])
    return rows, summary

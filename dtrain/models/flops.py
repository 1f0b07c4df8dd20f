"""Analytic cost of a backbone: multiply-accumulates of one forward pass, counted by torch's
FlopCounterMode on the meta device (no memory, no compute, any size)."""
from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from dtrain.models import build_model


def forward_macs(model_cfg, batch: int = 1) -> int:
    """MACs of net(x, t, cond) for `batch` samples (FLOPs / 2, the DiT paper's "Gflops")."""
    with torch.device("meta"):
        net = build_model(model_cfg).eval()
        m = model_cfg
        x = torch.empty(batch, m.in_channels, m.image_size, m.image_size)
        t = torch.empty(batch)
        cond = torch.zeros((batch, m.max_tokens) if m.conditioning == "text" else (batch,), dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        net(x, t, cond)
    return counter.get_total_flops() // 2

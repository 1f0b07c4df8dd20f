"""Backbones `net(x, t, cond) -> out`. Each family is a module with a SIZES registry and build(cfg)."""
from __future__ import annotations

import torch.nn as nn

from dtrain.models import dit, mlp, ssm

BACKBONES = {"dit": dit, "ssm": ssm, "mlp": mlp}


def build_model(model_cfg) -> nn.Module:
    """The one place a ModelConfig becomes a network."""
    return BACKBONES[model_cfg.arch].build(model_cfg)


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())

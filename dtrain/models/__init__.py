"""Backbones `net(x, t, cond) -> out`. Each family is a module with a SIZES registry and build(cfg)."""
from __future__ import annotations

import torch.nn as nn

from dtrain.models import dit, mlp, ssm
from dtrain.models.text import PAD_ID

BACKBONES = {"dit": dit, "ssm": ssm, "mlp": mlp}


def build_model(model_cfg) -> nn.Module:
    """The one place a ModelConfig becomes a network."""
    return BACKBONES[model_cfg.arch].build(model_cfg)


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def null_condition(model_cfg) -> int:
    """The value a null condition is filled with (`torch.full_like(cond, null)`): the null label
    num_classes of a class model; padding of a text model, whose all-padding row is the empty caption."""
    return PAD_ID if model_cfg.conditioning == "text" else model_cfg.num_classes

"""Objectives (small callables `loss(net, x, cond) -> [B]`) and samplers (pure functions)."""
from __future__ import annotations

from dtrain.diffusion.flow import RectifiedFlowLoss

OBJECTIVES = {"rectified_flow": RectifiedFlowLoss}


def build_objective(objective_cfg):
    return OBJECTIVES[objective_cfg.name](time_sampling=objective_cfg.time_sampling)

"""Objectives (small callables `loss(model_fn, batch) -> [B]`, each with `prediction` and `path`),
the parameterisation that converts a net's output for the solvers, and samplers (pure functions)."""
from __future__ import annotations

from dtrain.diffusion.ddpm import DDPMLoss
from dtrain.diffusion.flow import RectifiedFlowLoss
from dtrain.diffusion.meanflow import MeanFlowLoss

OBJECTIVES = {"rectified_flow": RectifiedFlowLoss, "ddpm": DDPMLoss, "mean_flow": MeanFlowLoss}


def _objective_class(objective_cfg):
    if objective_cfg.name not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective_cfg.name!r}: choose one of {', '.join(OBJECTIVES)}")
    return OBJECTIVES[objective_cfg.name]


def build_objective(objective_cfg):
    """The loss callable for config attributes name, time_sampling, prediction, schedule."""
    return _objective_class(objective_cfg).from_config(objective_cfg)


def prediction_and_path(objective_cfg):
    """(prediction, path): what a checkpoint's net predicts and on which path, for the samplers."""
    return _objective_class(objective_cfg).prediction_and_path(objective_cfg)

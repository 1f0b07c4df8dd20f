"""Rectified flow / flow matching objective (Liu et al. 2022, Lipman et al. 2023).

Convention used across dtrain: t = 0 is noise, t = 1 is data. The straight path
    x_t = t * x_1 + (1 - t) * x_0,   x_0 ~ N(0, I), x_1 ~ data          (Liu et al., Eq. 1)
has constant velocity v = x_1 - x_0, which the network regresses; sampling integrates
dx/dt = v(x_t, t) from t = 0 to 1.
"""
from __future__ import annotations

from typing import Callable

import torch

from dtrain.diffusion.paths import PATHS

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TIME_SAMPLINGS = ("uniform", "logit_normal")


def check_time_sampling(how: str) -> None:
    if how not in TIME_SAMPLINGS:
        raise ValueError(f"unknown time_sampling {how!r}: choose one of {', '.join(TIME_SAMPLINGS)}")


def sample_time(n: int, how: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times t [n]: uniform, or logit-normal (SD3, Esser et al. 2024, Eq. 19), which
    weights the middle of the path where the velocity is hardest to predict."""
    check_time_sampling(how)
    if how == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(torch.randn(n, generator=generator))


def batch_noise(batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """The noise paired with batch["x"] [B, ...]: batch["noise"] when the data brings it (reflow pairs),
    else fresh N(0, I) drawn on the CPU (with `generator` when given) and moved to x."""
    x = batch["x"]
    if batch.get("noise") is not None:
        return batch["noise"].to(x)
    return torch.randn(x.shape, generator=generator).to(x)


class RectifiedFlowLoss:
    """loss(model_fn, batch) -> per-sample mean squared velocity error [B]."""

    prediction = "velocity"
    path = PATHS["linear"]

    def __init__(self, time_sampling: str = "logit_normal"):
        check_time_sampling(time_sampling)  # fail now, not at the first step
        self.time_sampling = time_sampling

    @classmethod
    def from_config(cls, objective_cfg) -> "RectifiedFlowLoss":
        return cls(time_sampling=objective_cfg.time_sampling)

    @classmethod
    def prediction_and_path(cls, objective_cfg) -> tuple:
        return cls.prediction, cls.path

    def __call__(self, model_fn: ModelFn, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x1 = batch["x"]  # [B, ...] data
        x0 = batch_noise(batch, generator)  # [B, ...] noise
        t = sample_time(x1.shape[0], self.time_sampling, generator).to(x1)  # [B]
        tb = t.view(-1, *([1] * (x1.ndim - 1)))
        xt = tb * x1 + (1 - tb) * x0
        v = model_fn(xt, t, batch["cond"])
        return (v.float() - (x1 - x0).float()).pow(2).flatten(1).mean(1)

"""Denoising diffusion objective on a variance-preserving path (t = 0 noise, t = 1 data)."""
from __future__ import annotations

import torch

from dtrain.diffusion.flow import ModelFn, batch_noise, check_time_sampling, sample_time
from dtrain.diffusion.parameterization import PREDICTIONS, from_x_eps
from dtrain.diffusion.paths import PATHS

SCHEDULES = ("cosine", "vp_linear")
DDPM_PREDICTIONS = tuple(p for p in PREDICTIONS if p != "velocity")  # eps, v, x0


def _check(prediction: str, schedule: str) -> None:
    if prediction not in DDPM_PREDICTIONS:
        raise ValueError(f"unknown ddpm prediction {prediction!r}: choose one of {', '.join(DDPM_PREDICTIONS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown ddpm schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


class DDPMLoss:
    """loss(model_fn, batch) -> per-sample mean squared error [B] of the net's prediction at
        x_t = alpha(t) x + sigma(t) eps,   t in [t_min, 1) of the schedule's path,
    against eps (L_simple, Ho et al. 2020, Eq. 14), v = alpha eps - sigma x (Salimans & Ho 2022,
    Sec. 4) or x itself. Unweighted, as in L_simple, whatever the prediction."""

    def __init__(self, prediction: str = "eps", schedule: str = "cosine", time_sampling: str = "uniform"):
        _check(prediction, schedule)
        check_time_sampling(time_sampling)
        self.prediction, self.path, self.time_sampling = prediction, PATHS[schedule], time_sampling

    @classmethod
    def from_config(cls, objective_cfg) -> "DDPMLoss":
        return cls(objective_cfg.prediction, objective_cfg.schedule, objective_cfg.time_sampling)

    @classmethod
    def prediction_and_path(cls, objective_cfg) -> tuple:
        _check(objective_cfg.prediction, objective_cfg.schedule)
        return objective_cfg.prediction, PATHS[objective_cfg.schedule]

    def __call__(self, model_fn: ModelFn, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x = batch["x"]  # [B, ...] data
        eps = batch_noise(batch, generator)  # [B, ...]
        u = sample_time(x.shape[0], self.time_sampling, generator).to(x)  # [B] in [0, 1)
        t = self.path.t_min + (1 - self.path.t_min) * u  # [B] in [t_min, 1)
        tb = t.view(-1, *([1] * (x.ndim - 1)))
        xt = self.path.alpha(tb) * x + self.path.sigma(tb) * eps
        out = model_fn(xt, t, batch["cond"])
        target = from_x_eps(self.prediction, x, eps, t, self.path)
        return (out.float() - target.float()).pow(2).flatten(1).mean(1)

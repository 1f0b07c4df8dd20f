"""Rectified flow / flow matching objective (Liu et al. 2022, Lipman et al. 2023).

Convention used across dtrain: t = 0 is noise, t = 1 is data. The straight path
    x_t = t * x_1 + (1 - t) * x_0,   x_0 ~ N(0, I), x_1 ~ data          (Liu et al., Eq. 1)
has constant velocity v = x_1 - x_0, which the network regresses; sampling integrates
dx/dt = v(x_t, t) from t = 0 to 1.

The regression target is by default that one pair's velocity (objective.target=sample). Its variance
about the field E[x_1 - x_0 | x_t] is large wherever many data points could have made x_t: at small t,
and for the unconditional (null-condition) field everywhere. objective.target=stable replaces it with the
stable target field (Xu et al. 2023, Eq. 6 on this path): the posterior-weighted mean of the velocities
of every data point in the batch that shares the row's condition (all of them for a null row),

    w_ij ~ N(x_t,i; t_i x_1,j, (1 - t_i)^2 I),   target_i = sum_j w_ij (x_1,j - x_t,i) / (1 - t_i),

which is x_1,i - x_0,i when x_t,i is only x_1,i's (near t = 1) and averages out the noise where the
posterior spreads. It needs independent noise (not reflow's pairs) and must know which rows are null,
so the loss drops conditions itself (`drop_conditions`) rather than the backbone's embedder.
"""
from __future__ import annotations

from typing import Callable

import torch

from dtrain.diffusion.paths import PATHS
from dtrain.diffusion.samplers import dropped

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
TIME_SAMPLINGS = ("uniform", "logit_normal")
TARGETS = ("sample", "stable")


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

    def __init__(self, time_sampling: str = "logit_normal", target: str = "sample"):
        check_time_sampling(time_sampling)  # fail now, not at the first step
        if target not in TARGETS:
            raise ValueError(f"unknown objective.target {target!r}: choose one of {', '.join(TARGETS)}")
        self.time_sampling, self.target = time_sampling, target
        self.null, self.cond_dropout = None, 0.0  # set by drop_conditions

    @classmethod
    def from_config(cls, objective_cfg) -> "RectifiedFlowLoss":
        return cls(time_sampling=objective_cfg.time_sampling, target=objective_cfg.target)

    def drop_conditions(self, null: int, rate: float) -> None:
        """Replace each row's condition by `null` with probability `rate` here, in the loss (the backbone's
        own dropout must then be off): the stable target needs to know which rows are unconditional."""
        self.null, self.cond_dropout = null, rate

    @classmethod
    def prediction_and_path(cls, objective_cfg) -> tuple:
        return cls.prediction, cls.path

    def __call__(self, model_fn: ModelFn, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x1, cond = batch["x"], batch["cond"]  # [B, ...] data, [B, ...] conditions
        x0 = batch_noise(batch, generator)  # [B, ...] noise
        t = sample_time(x1.shape[0], self.time_sampling, generator).to(x1)  # [B]
        null_rows = torch.zeros(x1.shape[0], dtype=torch.bool)
        if self.cond_dropout > 0:
            null_rows = torch.rand(x1.shape[0], generator=generator) < self.cond_dropout
        tb = t.view(-1, *([1] * (x1.ndim - 1)))
        xt = tb * x1 + (1 - tb) * x0
        v = model_fn(xt, t, cond if self.null is None else dropped(cond, null_rows.to(cond.device), self.null))
        target = x1 - x0
        if self.target == "stable":
            if batch.get("noise") is not None:
                raise ValueError("objective.target=stable needs independent noise; this batch brings its own (reflow pairs)")
            target = target + stable_correction(x1, xt, t, same_condition(cond, null_rows))
        return (v.float() - target.float()).pow(2).flatten(1).mean(1)


def same_condition(cond: torch.Tensor, null_rows: torch.Tensor) -> torch.Tensor:
    """[B, B] bool: which rows j are references for row i, those with row i's condition (labels [B], token
    ids [B, L] or embeddings [B, L, E]), or every row when row i is null."""
    flat = cond.reshape(len(cond), -1)
    same = (flat[:, None, :] == flat[None, :, :]).all(-1)
    return same | null_rows.to(same.device)[:, None]


def stable_correction(x1: torch.Tensor, xt: torch.Tensor, t: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """The stable target minus the pair's own velocity, sum_j w_ij (x_1,j - x_1,i) / (1 - t_i) [B, ...]
    (module docstring); refs [B, B] says which j may stand in for i (i itself always does). Squared distances
    in float64 from the expanded form, so that the sharp weights near t = 1 do not lose their precision."""
    a, b = xt.flatten(1).double(), x1.flatten(1).double()  # [B, D]
    s = t.double().clamp(max=1 - 1e-4)[:, None]  # [B, 1]: t = 1 exactly would divide by 0
    d2 = a.pow(2).sum(1, keepdim=True) - 2 * s * (a @ b.T) + s.pow(2) * b.pow(2).sum(1)[None, :]  # [B, B]
    logits = (-d2 / (2 * (1 - s) ** 2)).masked_fill(~refs.to(d2.device), float("-inf"))
    w = torch.softmax(logits, dim=1)
    return ((w @ b - b) / (1 - s)).to(x1.dtype).view_as(x1)

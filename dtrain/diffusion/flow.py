"""Rectified flow / flow matching objective (Liu et al. 2022, Lipman et al. 2023).

Convention used across dtrain: t = 0 is noise, t = 1 is data. The straight path
    x_t = t * x_1 + (1 - t) * x_0,   x_0 ~ N(0, I), x_1 ~ data          (Liu et al., Eq. 1)
has constant velocity v = x_1 - x_0, which the network regresses; sampling integrates
dx/dt = v(x_t, t) from t = 0 to 1.
"""
from __future__ import annotations

from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_time(n: int, how: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times t [n]: uniform, or logit-normal (SD3, Esser et al. 2024, Eq. 19), which
    weights the middle of the path where the velocity is hardest to predict."""
    if how == "uniform":
        return torch.rand(n, generator=generator)
    return torch.sigmoid(torch.randn(n, generator=generator))


class RectifiedFlowLoss:
    """loss(net, x1, cond) -> per-sample mean squared velocity error [B]."""

    def __init__(self, time_sampling: str = "logit_normal"):
        self.time_sampling = time_sampling

    def __call__(self, net: ModelFn, x1: torch.Tensor, cond: torch.Tensor,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = torch.randn(x1.shape, generator=generator).to(x1)
        t = sample_time(x1.shape[0], self.time_sampling, generator).to(x1)
        tb = t.view(-1, *([1] * (x1.ndim - 1)))
        xt = tb * x1 + (1 - tb) * x0
        v = net(xt, t, cond)
        return (v.float() - (x1 - x0).float()).pow(2).flatten(1).mean(1)

"""Gaussian probability paths x_t = alpha(t) x_data + sigma(t) eps, eps ~ N(0, I).

Convention used across dtrain: t = 0 is noise, t = 1 is data, so alpha rises 0 -> 1 and sigma falls
1 -> 0. Every function is elementwise on a float tensor t of any shape; derivatives are analytic.
`t_min` is the first time a sampler evaluates the net at: where alpha > 0, so x0 = (x - sigma eps) / alpha
(eps prediction) is defined. Samplers never evaluate at t = 1, where sigma = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LinearPath:
    """Rectified flow / conditional OT path (Liu et al. 2022, Eq. 1; Lipman et al. 2023, Eq. 20):
    alpha = t, sigma = 1 - t. Not variance preserving (alpha^2 + sigma^2 < 1 inside)."""

    name: str = "linear"
    t_min: float = 0.0  # velocity and x0 predictions need no division by alpha
    variance_preserving: bool = False

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - t

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -torch.ones_like(t)


@dataclass(frozen=True)
class CosinePath:
    """VP cosine schedule (Nichol & Dhariwal 2021, Eq. 17, offset s = 0): with tau = 1 - t,
    alpha_bar(tau) = cos^2(pi tau / 2), i.e. alpha = sin(pi t / 2), sigma = cos(pi t / 2), written
    sin(pi tau / 2) so that sigma(1) is exactly 0 in floating point (cos(pi / 2) is -4e-8 in fp32)."""

    name: str = "cosine"
    # alpha(0) = 0 exactly, so start where alpha(t_min) = sin(pi * 0.002) = 6.3e-3: the terminal alpha
    # of DDPM's T = 1000 linear schedule (sqrt(alpha_bar_T) = 6.4e-3, Ho et al. 2020), SNR 4e-5, so
    # x_{t_min} is noise for practical purposes while an eps -> x0 conversion divides by >= 6e-3.
    t_min: float = 0.004
    variance_preserving: bool = True

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(0.5 * math.pi * t)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sin(0.5 * math.pi * (1 - t))

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * math.pi * torch.sin(0.5 * math.pi * (1 - t))

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * t)


@dataclass(frozen=True)
class VPLinearPath:
    """Continuous DDPM linear-beta schedule (VP-SDE, Song et al. 2021, Eq. 11 and Appendix B): with
    tau = 1 - t and beta(tau) = beta_min + (beta_max - beta_min) tau,
        log alpha_bar = -(beta_min tau + (beta_max - beta_min) tau^2 / 2),
        alpha = sqrt(alpha_bar), sigma = sqrt(1 - alpha_bar),
        d_alpha = beta alpha / 2, d_sigma = -beta alpha_bar / (2 sigma)   (d tau / dt = -1).
    d_sigma is -inf at t = 1 (sigma ~ sqrt(beta_min tau)); samplers never evaluate there."""

    name: str = "vp_linear"
    # alpha(0) = exp(-(0.1 + 19.9 / 2) / 2) = 6.6e-3 > 0 already (DDPM's sqrt(alpha_bar_T) = 6.4e-3):
    # the schedule never reaches pure noise, so the whole [0, 1] is usable.
    t_min: float = 0.0
    variance_preserving: bool = True
    beta_min: float = 0.1
    beta_max: float = 20.0

    def _log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        tau = 1 - t
        return -(self.beta_min * tau + 0.5 * (self.beta_max - self.beta_min) * tau ** 2)

    def _beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + (self.beta_max - self.beta_min) * (1 - t)

    def alpha(self, t: torch.Tensor) -> torch.Tensor:
        return torch.exp(0.5 * self._log_alpha_bar(t))

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(-torch.expm1(self._log_alpha_bar(t)))  # expm1: exact near t = 1

    def d_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * self._beta(t) * self.alpha(t)

    def d_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * self._beta(t) * torch.exp(self._log_alpha_bar(t)) / self.sigma(t)


PATHS = {p.name: p for p in (LinearPath(), CosinePath(), VPLinearPath())}

"""What the net predicts, and the one conversion that gives solvers what they need (k-diffusion's
Denoiser idea, EDM2's Precond): a raw output `out` at (x, t) on a path x = alpha x_hat + sigma eps_hat
is turned into the data / noise estimates (x_hat, eps_hat) or the probability-flow ODE velocity
    dx/dt = d_alpha x_hat + d_sigma eps_hat,
the marginal velocity E[d_alpha x_1 + d_sigma eps | x_t = x] (Lipman et al. 2023, Sec. 4).

Predictions: "velocity" (flow matching), "eps" (Ho et al. 2020), "x0", and "v" = alpha eps - sigma x
(Salimans & Ho 2022, Sec. 4 and App. D; variance-preserving paths only). Every conversion is affine in
`out` and classifier-free guidance's weights (1 - s, s) sum to one, so guidance applied to the raw
outputs inside `fn` commutes with them.
"""
from __future__ import annotations

from typing import Callable

import torch

PREDICTIONS = ("velocity", "eps", "v", "x0")


def _check(prediction: str, path) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}: choose one of {', '.join(PREDICTIONS)}")
    if prediction == "v" and not path.variance_preserving:
        raise ValueError(f"v prediction needs a variance-preserving path, not {path.name!r}")


def _coefs(t: torch.Tensor, x: torch.Tensor, path) -> tuple[torch.Tensor, ...]:
    """alpha, sigma, d_alpha, d_sigma at t [B], each [B, 1, ...] to broadcast over x [B, ...]."""
    t = t.reshape(-1, *([1] * (x.ndim - 1))).to(x)
    return path.alpha(t), path.sigma(t), path.d_alpha(t), path.d_sigma(t)


def to_x_eps(prediction: str, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, eps_hat), each like x [B, ...], from the raw output `out` [B, ...] at x_t = x, t [B]."""
    _check(prediction, path)
    a, s, da, ds = _coefs(t, x, path)
    if prediction == "eps":
        return (x - s * out) / a, out
    if prediction == "x0":
        return out, (x - a * out) / s
    if prediction == "v":  # invert v = a eps - s x, x_t = a x + s eps with a^2 + s^2 = 1 (S&H 2022, App. D)
        return a * x - s * out, s * x + a * out
    # velocity: solve [x; u] = [[a, s], [da, ds]] [x_hat; eps_hat] (Cramer's rule, det = a ds - s da)
    det = a * ds - s * da  # -1 on the linear path, -pi/2 on cosine, never 0 while alpha > 0
    return (ds * x - s * out) / det, (a * out - da * x) / det


def from_x_eps(prediction: str, x_hat: torch.Tensor, eps_hat: torch.Tensor, t: torch.Tensor, path) -> torch.Tensor:
    """The raw output a net predicting `prediction` should give for (x_hat, eps_hat) at t [B]: the
    regression target when (x_hat, eps_hat) = (data, noise)."""
    _check(prediction, path)
    a, s, da, ds = _coefs(t, x_hat, path)
    if prediction == "velocity":
        return da * x_hat + ds * eps_hat
    if prediction == "eps":
        return eps_hat
    if prediction == "x0":
        return x_hat
    return a * eps_hat - s * x_hat  # v


def to_velocity(prediction: str, out: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path) -> torch.Tensor:
    """Probability-flow ODE velocity dx/dt [B, ...] = d_alpha x_hat + d_sigma eps_hat."""
    if prediction == "velocity":
        return out
    x_hat, eps_hat = to_x_eps(prediction, out, x, t, path)
    _, _, da, ds = _coefs(t, x, path)
    return da * x_hat + ds * eps_hat


class Denoiser:
    """A net's raw output fn(x, t) (conditioning and guidance already inside fn) seen as x_eps or
    velocity. `calls` counts calls to fn: each is one batched network evaluation."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], prediction: str, path):
        _check(prediction, path)
        self.fn, self.prediction, self.path, self.calls = fn, prediction, path, 0

    def _out(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fn(x, t)

    def velocity(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return to_velocity(self.prediction, self._out(x, t), x, t, self.path)

    def x_eps(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return to_x_eps(self.prediction, self._out(x, t), x, t, self.path)


def time_at_ratio(path, ratio: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """The time tau of `path` where alpha / sigma = ratio (>= 0), by bisection on [t_min, 1]: every path
    here has a signal-to-noise ratio rising with t. Clamped to t_min below the path's first ratio."""
    lo, hi = torch.full_like(ratio, path.t_min), torch.ones_like(ratio)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = path.alpha(mid) > ratio * path.sigma(mid)
        lo, hi = torch.where(above, lo, mid), torch.where(above, mid, hi)
    return 0.5 * (lo + hi)


def on_linear_path(fn: Callable, prediction: str, path) -> Callable:
    """A net trained on `path` with `prediction` (a DDPM eps / v / x0 teacher) as a velocity on the linear
    path: fn(x, t, cond) -> velocity at x = t x_1 + (1 - t) eps. The point of the same signal-to-noise
    ratio on `path` is x' = (sigma(tau) / (1 - t)) x at alpha(tau) / sigma(tau) = t / (1 - t); there the
    net's x_hat and eps_hat are the linear path's too, and its velocity is x_hat - eps_hat."""
    _check(prediction, path)
    if path.name == "linear":
        return lambda x, t, cond: to_velocity(prediction, fn(x, t, cond), x, t, path)

    def velocity(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        t = t.clamp(max=1 - 1e-6)  # the linear path's data end: where samplers never evaluate
        tau = time_at_ratio(path, t / (1 - t))
        shape = (-1, *[1] * (x.ndim - 1))
        x_path = (path.sigma(tau) / (1 - t)).view(shape) * x
        x_hat, eps_hat = to_x_eps(prediction, fn(x_path, tau, cond), x_path, tau, path)
        return x_hat - eps_hat

    return velocity

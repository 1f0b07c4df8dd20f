"""Samplers as pure functions (k-diffusion style): schedules, solvers and guidance are separate.

fn(x, t) -> velocity is all a solver sees; guidance and conditioning wrap the network into fn.
"""
from __future__ import annotations

from typing import Callable

import torch

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_times(steps: int, shift: float = 1.0) -> torch.Tensor:
    """steps+1 times from 0 (noise) to 1 (data). shift > 1 spends more steps near the noise end
    (the SD3 time shift, t' = t / (t + shift (1 - t)) in our t=0-is-noise convention)."""
    t = torch.linspace(0.0, 1.0, steps + 1)
    return t / (t + shift * (1 - t))


@torch.no_grad()
def sample_euler(fn: VelocityFn, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Euler integration of dx/dt = fn(x, t) over ts; len(ts) - 1 calls to fn."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * fn(x, t.expand(x.shape[0]).to(x))
    return x


def guided(net, cond: torch.Tensor, scale: float, null_label: int) -> VelocityFn:
    """Classifier-free guidance (Ho & Salimans 2022): v = v_uncond + s (v_cond - v_uncond).
    Conditional and unconditional halves run as one batch; scale 1 skips the unconditional pass."""
    if scale == 1.0:
        return lambda x, t: net(x, t, cond)
    null = torch.full_like(cond, null_label)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c, v_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])).chunk(2)
        return v_u + scale * (v_c - v_u)

    return fn


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One generator per image, so an image depends on its seed alone, not on how it was batched."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(net, cond: torch.Tensor, noise: torch.Tensor, steps: int, guidance: float,
             null_label: int, shift: float = 1.0) -> torch.Tensor:
    """Class-conditional samples [B, C, H, W] in about [-1, 1]: guided Euler from `noise`."""
    return sample_euler(guided(net, cond, guidance, null_label), noise, flow_times(steps, shift))

"""Samplers as pure functions (k-diffusion style): schedules, solvers and guidance are separate.

fn(x, t) -> velocity is all an ODE solver sees (Euler, Heun); DDIM sees a Denoiser's (x_hat, eps_hat).
Guidance and conditioning wrap the network into fn; dtrain.diffusion.parameterization.Denoiser turns
fn's raw output (velocity, eps, v or x0) into what the solver needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from dtrain.diffusion.parameterization import Denoiser

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_times(steps: int) -> torch.Tensor:
    """steps+1 evenly spaced times from 0 (noise) to 1 (data)."""
    return torch.linspace(0.0, 1.0, steps + 1)


@torch.no_grad()
def sample_euler(fn: VelocityFn, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Euler integration of dx/dt = fn(x, t) over ts; len(ts) - 1 calls to fn."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * fn(x, t.expand(x.shape[0]).to(x))
    return x


def sampling_times(path, steps: int) -> torch.Tensor:
    """steps+1 times from path.t_min to exactly 1: flow_times rescaled onto [t_min, 1]."""
    return 1 - (1 - path.t_min) * (1 - flow_times(steps))  # written so the last time is 1.0 exactly


@torch.no_grad()
def sample_heun(fn: VelocityFn, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1, deterministic) over ts. The corrector is
    skipped on the last interval, as Alg. 1 does when sigma_{i+1} = 0, so fn is never evaluated at
    t = 1: 2 (len(ts) - 1) - 1 calls to fn."""
    last = len(ts) - 2
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        h = t_next - t
        d = fn(x, t.expand(x.shape[0]).to(x))
        x_euler = x + h * d
        if i == last:
            return x_euler
        d_next = fn(x_euler, t_next.expand(x.shape[0]).to(x))
        x = x + h * 0.5 * (d + d_next)  # trapezoidal correction (Alg. 1, lines 7-8)
    return x


@torch.no_grad()
def sample_ddim(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (Song, Meng & Ermon 2021, Eq. 12 with eta = 0) over ts on denoiser.path:
        x_next = alpha(t_next) x_hat + sigma(t_next) eps_hat,
    one call per step. On the linear path this is Euler's step exactly."""
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = ddim_step(denoiser, x, t, t_next)
    return x


def ddim_step(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step of x [B, ...] from time t to t_next (scalars)."""
    x_hat, eps_hat = denoiser.x_eps(x, t.expand(x.shape[0]).to(x))  # each [B, ...]
    t_next = t_next.to(x)
    return denoiser.path.alpha(t_next) * x_hat + denoiser.path.sigma(t_next) * eps_hat


@torch.no_grad()
def sample_consistency(denoiser: Denoiser, x: torch.Tensor, ts: torch.Tensor,
                       renoise: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1): jump to data with the consistency
    function f(x, t) = x_hat, then re-noise to the next time with fresh noise `renoise(k)` [B, ...] and
    jump again; one network evaluation per step. One step is the same as one Euler or DDIM step."""
    path, last = denoiser.path, len(ts) - 2
    for k, t in enumerate(ts[:-1]):
        x0 = denoiser.x_eps(x, t.expand(x.shape[0]).to(x))[0]
        if k == last:
            return x0
        x = path.alpha(ts[k + 1]) * x0 + path.sigma(ts[k + 1]) * renoise(k + 1).to(x)
    return x


@torch.no_grad()
def invert(denoiser: Denoiser, x: torch.Tensor, steps: int, refine: int = 2) -> torch.Tensor:
    """The noise at path.t_min that `steps` deterministic DDIM steps (Euler's, on the linear path) carry
    to the data x [B, ...]. Each step back starts from plain DDIM inversion (the step taken with the
    noise estimate at its known, data-side end) and is refined `refine` times by the residual of the
    forward step, x <- x - (step(x) - x_known), so that it inverts the sampler's step rather than
    approximating it (converges while the step is close to the identity, as small steps are).
    (1 + refine) * steps calls."""
    ts = sampling_times(denoiser.path, steps).flip(0).to(x.device)  # 1 (data) down to t_min (noise)
    for t_data, t in zip(ts[:-1], ts[1:]):
        x = invert_step(denoiser, x, t_data, t, refine)
    return x


def invert_step(denoiser: Denoiser, x: torch.Tensor, t_data: torch.Tensor, t: torch.Tensor,
                refine: int = 2) -> torch.Tensor:
    """One step of `invert`: the x at time t (scalar, noise side) that ddim_step carries to the known x
    [B, ...] at t_data (scalar, data side); 1 + refine calls (refine 0: plain DDIM / Euler inversion)."""
    path, known = denoiser.path, x
    eps = denoiser.x_eps(known, t_data.expand(x.shape[0]))[1]
    x = path.alpha(t) * (known - path.sigma(t_data) * eps) / path.alpha(t_data) + path.sigma(t) * eps
    for _ in range(refine):
        x = x - (ddim_step(denoiser, x, t, t_data) - known)
    return x


def sample_flow_map(net, cond: torch.Tensor, guidance: float, null_label: int | torch.Tensor, x: torch.Tensor,
                    ts: torch.Tensor) -> torch.Tensor:
    """A flow map's jumps x_s = x_t + (s - t) u(x_t, t, s) between consecutive times (one step: x_1 =
    x_0 + u(x_0, 0, 1)). net(x, t, cond, s) -> u; guidance mixes the conditional and unconditional u."""
    for t, s in zip(ts[:-1], ts[1:]):
        u = guided(lambda x_, t_, c_, s=float(s): net(x_, t_, c_, torch.full_like(t_, s)), cond, guidance, null_label)
        x = x + (s - t) * u(x, t.expand(x.shape[0]).to(x))
    return x


def guided(net, cond: torch.Tensor, scale: float, null_label: int | torch.Tensor) -> VelocityFn:
    """Classifier-free guidance (Ho & Salimans 2022, Eq. 6) on the raw output, whatever the net predicts:
    out = out_uncond + s (out_cond - out_uncond). Conditional and unconditional halves run as one batch;
    scale 1 skips the unconditional pass. cond: class labels [B] or token ids [B, L]; null_label: the value
    the unconditional half is filled with, or that half itself (like cond: a negative prompt's ids)."""
    if scale == 1.0:
        return lambda x, t: net(x, t, cond)
    null = torch.full_like(cond, null_label) if isinstance(null_label, int) else null_label.to(cond)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c, v_u = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null])).chunk(2)
        return v_u + scale * (v_c - v_u)

    return fn


def dropped(cond: torch.Tensor, drop: torch.Tensor, null_label: int) -> torch.Tensor:
    """cond (labels [B] or token ids [B, L]) with the rows where drop [B] is true made null."""
    return torch.where(drop.view(-1, *[1] * (cond.ndim - 1)), torch.full_like(cond, null_label), cond)


def initial_noise(shape: tuple[int, ...], seeds: list[int]) -> torch.Tensor:
    """One generator per image, so an image depends on its seed alone, not on how it was batched."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


# ---- the registry: every sampler, what it costs and what it needs ----

@dataclass(frozen=True)
class Sampler:
    """run: an ODE sampler's (denoiser, x, ts, renoise) -> x, or a flow map's (net, cond, guidance, null_label,
    x, ts) -> x. calls: network evaluations per image for a step count, without guidance.
    needs_flow_map: runs only on a flow-map net (model.flow_map: the second time s)."""
    run: Callable
    calls: Callable[[int], int]
    needs_flow_map: bool = False


REGISTRY: dict[str, Sampler] = {
    "euler": Sampler(lambda d, x, ts, renoise: sample_euler(d.velocity, x, ts), lambda steps: steps),
    "heun": Sampler(lambda d, x, ts, renoise: sample_heun(d.velocity, x, ts), lambda steps: 2 * steps - 1),
    "ddim": Sampler(lambda d, x, ts, renoise: sample_ddim(d, x, ts), lambda steps: steps),
    "consistency": Sampler(sample_consistency, lambda steps: steps),
    "flow_map": Sampler(sample_flow_map, lambda steps: steps, needs_flow_map=True),
}
SAMPLERS = tuple(REGISTRY)  # the names, for CLI choices and request schemas


def get(name: str) -> Sampler:
    if name not in REGISTRY:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(SAMPLERS)}")
    return REGISTRY[name]


def nfe(sampler: str, steps: int, guidance: float) -> int:
    """Network evaluations per image for `steps` steps of `sampler`; guidance != 1 doubles them."""
    return get(sampler).calls(steps) * (1 if guidance == 1.0 else 2)


def misfit(sampler: str, flow_map: bool) -> str | None:
    """Why `sampler` cannot run on a model (flow_map: the model is a flow map), or None when it can. The
    one place that decides: the config, the HTTP app and generation.solve all ask here."""
    if get(sampler).needs_flow_map and not flow_map:
        return f"sampler {sampler} needs a flow map (model.flow_map=true): this model predicts a velocity only"
    return None


@torch.no_grad()
def sample(sampler: str, denoiser: Denoiser, x: torch.Tensor, steps: int,
           renoise: Callable[[int], torch.Tensor] | None = None) -> torch.Tensor:
    """Integrate from noise x [B, ...] at path.t_min to data at t = 1 in `steps` steps of an ODE `sampler`.
    renoise(k): the fresh noise [B, ...] the consistency sampler adds at its step k (default: random)."""
    if get(sampler).needs_flow_map:
        raise ValueError(f"the {sampler} sampler needs the net's second time: sample through generation.solve")
    ts = sampling_times(denoiser.path, steps).to(x.device)
    return get(sampler).run(denoiser, x, ts, renoise or (lambda k: torch.randn_like(x)))

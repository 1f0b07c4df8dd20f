"""Metrics that hold a model against a Gaussian mixture's exact ground truth (dtrain.data.mixture):
velocity error against the exact field, component shares, likelihood gap, ODE log-likelihood."""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from dtrain.data.mixture import GaussianMixture

NetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # net(x, t, cond) -> v


# ---- metrics ------------------------------------------------------------------------------------


@torch.no_grad()
def velocity_error(net: NetFn, gmm: GaussianMixture, ts: Sequence[float], n: int = 4096,
                   generator: torch.Generator | None = None, conditional: bool = False,
                   shape: tuple[int, ...] | None = None) -> dict[str, torch.Tensor]:
    """The net's velocity against the exact field at each t in `ts`, x_t drawn from the true path;
    every entry is a tensor [len(ts)]:

        mse(t)      = E ||net(x_t, t, y) - v(x_t, t, y)||^2
        relative(t) = mse(t) / E ||v(x_t, t, y)||^2   (0: exact; 1: as bad as predicting 0, which an
                                                      untrained, zero-initialised net does)
        floor(t)    = E ||x_1 - x_0 - v(x_t, t, y)||^2  (the lowest flow-matching loss at t)

    The flow-matching loss at t is floor(t) + mse(t), so mse is the part training can still remove.
    `relative` is large where the exact field is small on average: for a mixture centred at 0 the
    unconditional field nearly cancels at some middle t (around 0.3 for the default ring); read
    `mse` there. y is the sample's component if `conditional`, else the null label K. `shape` is the
    per-sample shape the net wants (default (D, 1, 1), the shards')."""
    shape = shape or (gmm.dim, 1, 1)
    out: dict[str, list] = {"relative": [], "mse": [], "floor": []}
    for t in ts:
        x1, y = gmm.sample(n, generator)
        x0 = torch.randn(x1.shape, generator=generator)
        xt = (t * x1 + (1 - t) * x0).view(n, *shape)
        tv = torch.full((n,), float(t))
        labels = y if conditional else torch.full((n,), gmm.num_components)
        ref = gmm.velocity(xt, tv, labels).reshape(n, -1).double()
        pred = net(xt, tv, labels).reshape(n, -1).double()
        mse = (pred - ref).pow(2).sum(1).mean()
        out["mse"].append(mse)
        out["relative"].append(mse / ref.pow(2).sum(1).mean())
        out["floor"].append((x1 - x0).double().sub(ref).pow(2).sum(1).mean())
    return {k: torch.stack(v) for k, v in out.items()}


def likelihood_gap(gmm: GaussianMixture, x: torch.Tensor, n_entropy: int = 200_000,
                   generator: torch.Generator | None = None) -> dict[str, float]:
    """Mean log-likelihood of samples x under the true mixture against its negative entropy.

    For samples from p_1 itself, E[log p_1(x)] = -H(p_1), so gap = mean_log_prob + entropy is ~0
    (within Monte-Carlo error). gap > 0: samples sit in denser places than the data does (too
    sharp, e.g. strong guidance, or mass moved onto the heavy modes); gap < 0: mass off the modes
    (blurry, or between modes). Not a divergence: a sampler can hit 0 and still be wrong; read it
    with `coverage`."""
    mean_lp = gmm.log_prob(x).mean().item()
    h = gmm.entropy_mc(n_entropy, generator)
    return {"mean_log_prob": mean_lp, "neg_entropy": -h, "gap": mean_lp + h}


def component_shares(gmm: GaussianMixture, x: torch.Tensor, hard: bool = True) -> torch.Tensor:
    """Share of samples per component [K]: assigned to the most responsible component (hard), or
    the mean responsibility (soft; for exact samples E[r_k(x)] = w_k exactly, even when components
    overlap, while hard shares of overlapping components differ from w a little)."""
    r = gmm.responsibilities(x)
    if not hard:
        return r.mean(0)
    return torch.bincount(r.argmax(1), minlength=gmm.num_components).double() / len(x)


def coverage(gmm: GaussianMixture, x: torch.Tensor, hard: bool = True) -> dict:
    """Component shares of samples x against the weights: total variation 0.5 sum_k |s_k - w_k| and
    the worst ratio min_k s_k / w_k with its component (near 0: that mode was dropped)."""
    s = component_shares(gmm, x, hard)
    ratio = s / gmm.weights
    return {"shares": s.tolist(), "weights": gmm.weights.tolist(), "tv": 0.5 * (s - gmm.weights).abs().sum().item(),
            "worst_ratio": ratio.min().item(), "worst_component": int(ratio.argmin())}


def ode_log_likelihood(net: NetFn, x: torch.Tensor, cond: torch.Tensor, steps: int = 100) -> torch.Tensor:
    """log p_1(x) [N] under the model's flow (continuous normalising flow, Chen et al. 2018, Thm. 1):

        d/dt log p_t(x_t) = -div v(x_t, t)  =>  log p_1(x_1) = log N(x_0; 0, I) - int_0^1 div v(x_t, t) dt,

    integrating x_t from t = 1 back to t = 0 with Heun's method on (x, int div v); the divergence is
    exact (one backward pass per dimension, fine for small D). x [N, ...] in the net's input shape,
    cond [N] labels (the null label for the unconditional model); x's dtype is the one the net is
    called with. Compare with gmm.log_prob(x)."""
    n = x.shape[0]
    h = 1.0 / steps

    def v_div(x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            v = net(x, torch.full((n,), t, dtype=x.dtype, device=x.device), cond)
            vf = v.reshape(n, -1)
            div = sum(torch.autograd.grad(vf[:, i].sum(), x, retain_graph=i < vf.shape[1] - 1)[0].reshape(n, -1)[:, i]
                      for i in range(vf.shape[1]))
        return v.detach(), div.detach()

    x = x.detach()
    integral = torch.zeros(n, dtype=torch.float64, device=x.device)
    for i in range(steps):  # t from 1 down to 0
        t = 1.0 - i * h
        v1, d1 = v_div(x, t)
        v2, d2 = v_div(x - h * v1, t - h)
        x = x - 0.5 * h * (v1 + v2)
        integral = integral + 0.5 * h * (d1 + d2).double()
    x0 = x.reshape(n, -1).double()
    log_p0 = -0.5 * (x0.shape[1] * math.log(2 * math.pi) + x0.pow(2).sum(1))
    return log_p0 - integral

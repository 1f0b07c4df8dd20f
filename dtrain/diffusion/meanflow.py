"""A one-step flow map trained from scratch: MeanFlow (Geng et al. 2025, "Mean Flows for One-step
Generative Modeling").

In dtrain's convention (t = 0 noise, t = 1 data, x_t = t x_1 + (1 - t) x_0, velocity v = x_1 - x_0) the
net is a flow map u(x_t, t, s): the average velocity from t to s, so x_s = x_t + (s - t) u(x_t, t, s)
and one step from noise is x_1 = x_0 + u(x_0, 0, 1). Differentiating (s - t) u = int_t^s v dtau in t
gives the MeanFlow identity (their Eq. 6, with time reversed)
    u(x_t, t, s) = v(x_t, t) + (s - t) d/dt u(x_t, t, s),   d/dt u = v . grad_x u + du/dt,
a total derivative along the path: one Jacobian-vector product with tangent (v, 1, 0) in (x, t, s).
The loss regresses u onto stopgrad(v + (s - t) d/dt u) with the conditional velocity v = x_1 - x_0.
At s = t it is flow matching, so u(x, t, t) is the velocity and every ODE sampler works on a flow map.

The JVP runs forward-mode (torch.func.jvp) or by the double-backward trick: J^T w by one backward with
create_graph, then J (v, 1) as the gradient of <J^T w, (v, 1)> with respect to w. Both run attention on
SDPA's math kernel: the flash and memory-efficient kernels have neither derivative. Under DeepSpeed
ZeRO-3 neither passes (its partitioned linear layers are an autograd Function without a jvp rule, and it
releases the weights the second backward needs), so there the JVP is a central difference in fp32.
"""
from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from dtrain.diffusion.flow import ModelFn, batch_noise, check_time_sampling, sample_time
from dtrain.diffusion.paths import PATHS
from dtrain.diffusion.samplers import dropped, guided

JVP_MODES = ("forward", "double_backward", "finite_difference")  # and "auto": the stage resolves it
FD_STEP = 1e-4  # the central difference's step: truncation (the time embedding's 1000 rad per unit t) vs fp32 rounding


def total_derivative(fn, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
                     mode: str = "forward") -> tuple[torch.Tensor, torch.Tensor]:
    """(u, d/dt u) for u = fn(x, t, s) along dx/dt = v: the JVP of fn at (x, t, s) with tangent (v, 1, 0).
    u keeps its graph to the parameters; d/dt u is detached (it feeds a stop-gradient target)."""
    if mode == "forward":
        with sdpa_kernel(SDPBackend.MATH):
            u, dudt = torch.func.jvp(fn, (x, t, s), (v, torch.ones_like(t), torch.zeros_like(s)))
        return u, dudt.detach()
    if mode == "finite_difference":
        return _central_difference(fn, x, t, s, v)
    if mode != "double_backward":
        raise ValueError(f"jvp mode {mode!r}: choose one of {', '.join(JVP_MODES)}")
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):  # gradients (also under no_grad), twice
        x, t = x.detach().requires_grad_(True), t.detach().requires_grad_(True)
        u = fn(x, t, s)
        w = torch.zeros_like(u, requires_grad=True)
        gx, gt = torch.autograd.grad(u, (x, t), grad_outputs=w, create_graph=True)  # J^T w, linear in w
        (dudt,) = torch.autograd.grad((gx, gt), w, grad_outputs=(v, torch.ones_like(t)))  # J (v, 1)
    return u, dudt.detach()


def _central_difference(fn, x, t, s, v):
    """(u, (u(x + h v, t + h) - u(x - h v, t - h)) / 2h): two more forward passes without a graph, for
    engines that neither forward-mode AD nor a second backward can pass (DeepSpeed ZeRO-3). Every call
    draws the same random numbers (the label dropout), so the difference sees one function."""
    cpu = torch.get_rng_state()
    gpu = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None

    def call(*args):
        torch.set_rng_state(cpu)
        if gpu is not None:
            torch.cuda.set_rng_state_all(gpu)
        return fn(*args)

    with torch.no_grad():
        plus, minus = call(x + FD_STEP * v, t + FD_STEP, s), call(x - FD_STEP * v, t - FD_STEP, s)
    return call(x, t, s), (plus - minus) / (2 * FD_STEP)


class MeanFlowLoss:
    """loss(model_fn, batch) -> per-sample adaptively weighted squared error [B] of the flow map against
    its MeanFlow target. model_fn(x, t, cond, s) -> u.

    Distillation (`distil_from`): the velocity in the target and the JVP's tangent is a frozen teacher's
    (guided) velocity at x_t instead of the conditional x_1 - x_0, so the flow map learns the teacher's
    ODE; labels are then dropped here (`cond_dropout`), the same for teacher and student."""

    prediction = "velocity"  # what u(x, t, t) is: the ODE samplers use it as is
    path = PATHS["linear"]

    def __init__(self, time_sampling: str = "logit_normal", jump_share: float = 0.25, jvp: str = "forward",
                 adaptive_p: float = 1.0):
        check_time_sampling(time_sampling)
        if jvp not in (*JVP_MODES, "auto"):
            raise ValueError(f"jvp mode {jvp!r}: choose one of {', '.join(JVP_MODES)}")
        self.time_sampling, self.jump_share, self.jvp, self.adaptive_p = time_sampling, jump_share, jvp, adaptive_p
        self.teacher = None

    def distil_from(self, teacher: ModelFn, guidance: float, null_label: int, cond_dropout: float) -> "MeanFlowLoss":
        """teacher(x, t, cond) -> velocity on the linear path (frozen; called under no_grad)."""
        self.teacher, self.guidance, self.null_label, self.cond_dropout = teacher, guidance, null_label, cond_dropout
        return self

    @classmethod
    def from_config(cls, o) -> "MeanFlowLoss":
        return cls(o.time_sampling, o.jump_share, o.jvp, o.adaptive_p)

    @classmethod
    def prediction_and_path(cls, objective_cfg) -> tuple:
        return cls.prediction, cls.path

    def times(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(t, s) [n] with t <= s: two draws sorted; a share 1 - jump_share of them with s = t."""
        a, b = sample_time(n, self.time_sampling, generator), sample_time(n, self.time_sampling, generator)
        t, s = torch.minimum(a, b), torch.maximum(a, b)
        jump = torch.rand(n, generator=generator) < self.jump_share
        return t, torch.where(jump, s, t)

    def __call__(self, model_fn: ModelFn, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x1, cond = batch["x"], batch["cond"]
        x0 = batch_noise(batch, generator)
        t, s = (z.to(x1) for z in self.times(x1.shape[0], generator))
        shape = (-1, *[1] * (x1.ndim - 1))
        xt = t.view(shape) * x1 + (1 - t.view(shape)) * x0
        if self.teacher is None:
            v = x1 - x0
        else:
            drop = torch.rand(x1.shape[0], generator=generator).to(cond.device) < self.cond_dropout
            cond = dropped(cond, drop, self.null_label)
            with torch.no_grad():
                v = guided(self.teacher, cond, self.guidance, self.null_label)(xt, t)
        u, dudt = total_derivative(lambda x, t_, s_: model_fn(x, t_, cond, s_), xt, t, s, v, self.jvp)
        target = v + (s - t).view(shape) * dudt
        err = (u.float() - target.float()).pow(2).flatten(1).mean(1)
        if not self.adaptive_p:
            return err
        # MeanFlow Sec. 4.3: weights 1 / (err + c)^p down-weight the samples with large errors;
        # normalised over the batch so the loss stays a (weighted) mean error, comparable across runs
        w = (err.detach() + 1e-3) ** -self.adaptive_p
        return err * (w / w.mean())

"""Consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2) with the improvements of
Song & Dhariwal 2023 ("Improved Techniques for Training Consistency Models"): the pseudo-Huber metric
(Sec. 3.3) and a discretisation curriculum that doubles the number of intervals (Sec. 3.4).

In dtrain's convention (t = 0 noise, t = 1 data, the linear path) the student is a velocity net whose
consistency function is its data estimate,
    f(x, t) = x + (1 - t) v(x, t)        (c_skip = 1, c_out = 1 - t: f(x, 1) = x by construction),
so a student initialised from its teacher starts as the teacher's one-step Euler map, and one step
of any sampler (Euler, DDIM, consistency) is f(noise, 0). With N intervals t_n = n / N, per sample
    x_n = t_n x_1 + (1 - t_n) z,   x_{n+1} = one teacher ODE step from x_n (Euler or Heun),
    loss = d(f_student(x_n, t_n), stopgrad f_target(x_{n+1}, t_{n+1})).
"""
from __future__ import annotations

import math
import torch

from dtrain.diffusion.flow import ModelFn, batch_noise
from dtrain.diffusion.paths import PATHS
from dtrain.diffusion.samplers import dropped, guided


def pseudo_huber(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sqrt(||a - b||^2 + c^2) - c per sample [B], c = 0.00054 sqrt(dim) (Song & Dhariwal 2023, Sec. 3.3):
    L2 near zero, L1 for outliers, so a few large target errors do not dominate."""
    c = 0.00054 * math.sqrt(a[0].numel())
    return torch.sqrt((a.float() - b.float()).pow(2).flatten(1).sum(1) + c * c) - c


def intervals_at(step: int, total_steps: int, start: int, end: int) -> int:
    """The curriculum's interval count N at `step`: start, doubled in equal stages up to end
    (Song & Dhariwal 2023, Eq. 5, with s0 = start, s1 = end)."""
    stages = int(math.log2(end / start)) + 1
    per_stage = max(1, total_steps // stages)
    return min(start * 2 ** (step // per_stage), end)


class ConsistencyDistillation:
    """loss(student, batch) -> per-sample pseudo-Huber distance [B] between the student's and the
    target's consistency functions on adjacent points of one teacher ODE trajectory.

    teacher, target: fn(x, t, cond) -> velocity, fp32 out (frozen; called under no_grad).
    solver: the teacher's step, euler | heun. guidance: the teacher's CFG scale. cond_dropout: the
    share of labels replaced by `null_label` (the same for teacher, target and student, so the
    student also learns the unconditional jump that guidance needs)."""

    prediction, path = "velocity", PATHS["linear"]

    def __init__(self, teacher: ModelFn, target: ModelFn, null_label: int, solver: str = "heun",
                 guidance: float = 1.0, cond_dropout: float = 0.1, intervals: int = 10):
        if solver not in ("euler", "heun"):
            raise ValueError(f"teacher solver {solver!r}: choose euler or heun")
        self.teacher, self.target, self.null_label = teacher, target, null_label
        self.solver, self.guidance, self.cond_dropout, self.intervals = solver, guidance, cond_dropout, intervals

    def __call__(self, student: ModelFn, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
        x1, cond = batch["x"], batch["cond"]
        n_batch = x1.shape[0]
        z = batch_noise(batch, generator)
        drop = torch.rand(n_batch, generator=generator).to(cond.device) < self.cond_dropout
        cond = dropped(cond, drop, self.null_label)
        n = torch.randint(0, self.intervals, (n_batch,), generator=generator)
        t, t_next = (n / self.intervals).to(x1), ((n + 1) / self.intervals).to(x1)
        shape = (-1, *[1] * (x1.ndim - 1))
        xt = t.view(shape) * x1 + (1 - t.view(shape)) * z
        with torch.no_grad():
            v = guided(self.teacher, cond, self.guidance, self.null_label)
            dt = (t_next - t).view(shape)
            v0 = v(xt, t)
            x_next = xt + dt * v0
            if self.solver == "heun":  # the trapezoid rule: a second-order teacher step
                x_next = xt + dt * 0.5 * (v0 + v(x_next, t_next))
            target = x_next + (1 - t_next.view(shape)) * self.target(x_next, t_next, cond)
        f = xt + (1 - t.view(shape)) * student(xt, t, cond)
        return pseudo_huber(f, target)


"""Consistency distillation: the loss of the exact field is zero, the curriculum doubles, the
multistep consistency sampler reaches the data with the NFE it reports."""
import pytest
import torch

from dtrain.diffusion.consistency import ConsistencyDistillation, intervals_at, pseudo_huber
from dtrain.diffusion.parameterization import Denoiser
from dtrain.diffusion.paths import PATHS
from dtrain.diffusion.samplers import nfe, sample

C = torch.full((1, 1, 3, 3), 0.7)  # a point mass: every path is straight, so f(x, t) = C exactly


def exact(x, t, cond):
    """The velocity field of the point mass, (C - x) / (1 - t); finite at t = 1, where (1 - t) v = 0."""
    return (C - x) / (1 - t.view(-1, 1, 1, 1)).clamp_min(1e-6)


def test_pseudo_huber_is_zero_at_equality_quadratic_near_and_linear_far():
    a = torch.zeros(2, 1, 3, 3)
    assert torch.equal(pseudo_huber(a, a), torch.zeros(2))
    near, far = pseudo_huber(a, a + 1e-4)[0], pseudo_huber(a, a + 10.0)[0]
    assert near < 1e-4 * 3  # ~ ||d||^2 / 2c: far below the L2 distance
    assert far == pytest.approx(30.0, rel=1e-3)  # ~ ||d|| = 10 * sqrt(9)


def test_curriculum_doubles_from_start_to_end():
    ns = [intervals_at(s, 400, 10, 80) for s in range(400)]
    assert ns[0] == 10 and ns[-1] == 80 and sorted(set(ns)) == [10, 20, 40, 80]


@pytest.mark.parametrize("solver", ["euler", "heun"])
def test_cd_loss_is_zero_for_the_exact_field_and_positive_for_a_wrong_student(solver):
    loss = ConsistencyDistillation(teacher=exact, target=exact, null_label=10, solver=solver, guidance=1.0,
                                   cond_dropout=0.5, intervals=8)
    batch = {"x": C.expand(16, -1, -1, -1).clone(), "cond": torch.zeros(16, dtype=torch.long)}
    g = torch.Generator().manual_seed(0)
    assert loss(exact, batch, generator=g).max() < 1e-4
    wrong = loss(lambda x, t, c: exact(x, t, c) + 0.5, batch, generator=g)
    assert wrong.shape == (16,) and wrong.min() > 0.1


def test_cd_loss_uses_a_seeded_generator_reproducibly():
    net = lambda x, t, c: 0.3 * x  # noqa: E731
    loss = ConsistencyDistillation(teacher=net, target=net, null_label=10, intervals=4)
    batch = {"x": torch.randn(8, 1, 3, 3), "cond": torch.arange(8)}
    a = loss(net, batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, loss(net, batch, generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_consistency_sampler_reaches_the_point_mass_at_any_step_count(steps):
    calls = []
    fn = lambda x, t: calls.append(1) or exact(x, t, None)  # noqa: E731
    noises = {}
    renoise = lambda k: noises.setdefault(k, torch.randn(5, 1, 3, 3))  # noqa: E731
    out = sample("consistency", Denoiser(fn, "velocity", PATHS["linear"]), torch.randn(5, 1, 3, 3), steps,
                 renoise=renoise)
    assert torch.allclose(out, C.expand(5, -1, -1, -1), atol=1e-5)
    assert len(calls) == nfe("consistency", steps, 1.0) == steps and sorted(noises) == list(range(1, steps))


def exact_on(path_name: str, prediction: str):
    """The point mass's exact net on a VP path, in its own parameterisation: x_hat = C, eps = (x - alpha C) / sigma."""
    from dtrain.diffusion.parameterization import from_x_eps

    path = PATHS[path_name]

    def net(x, tau, cond):
        shape = (-1, 1, 1, 1)
        a, s = path.alpha(tau).view(shape), path.sigma(tau).view(shape)
        x_hat = C.expand_as(x)
        return from_x_eps(prediction, x_hat, (x - a * x_hat) / s, tau.view(shape), path)
    return net


@pytest.mark.parametrize("path_name", ["cosine", "vp_linear"])
@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_a_ddpm_teacher_reads_as_the_linear_paths_velocity_and_distils_with_zero_loss(path_name, prediction):
    from dtrain.diffusion.parameterization import on_linear_path, time_at_ratio

    path = PATHS[path_name]
    tau = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(time_at_ratio(path, path.alpha(tau) / path.sigma(tau)), tau, atol=1e-5)
    teacher = on_linear_path(exact_on(path_name, prediction), prediction, path)
    x, t = torch.randn(3, 1, 3, 3), torch.tensor([0.05, 0.5, 0.95])
    assert torch.allclose(teacher(x, t, torch.zeros(3)), exact(x, t, None), atol=1e-4)
    loss = ConsistencyDistillation(teacher=teacher, target=exact, null_label=10, solver="heun", intervals=8)
    batch = {"x": C.expand(16, -1, -1, -1).clone(), "cond": torch.zeros(16, dtype=torch.long)}
    assert loss(exact, batch, generator=torch.Generator().manual_seed(0)).max() < 1e-3

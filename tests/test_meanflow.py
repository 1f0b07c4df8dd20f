"""MeanFlow, the one-step flow map: the total derivative both ways, the identity its loss rests on, a
zero loss for the exact field, the flow-map sampler on an exact map, and the two-time nets."""
from __future__ import annotations

import pytest
import torch

from dtrain.config import ConfigError, load_config
from dtrain.diffusion.meanflow import MeanFlowLoss, total_derivative
from dtrain.diffusion.samplers import nfe, sample_flow_map
from dtrain.models import build_model

MU, SIGMA = 1.5, 0.3  # data N(MU, SIGMA^2), noise N(0, 1), x_t = t x_1 + (1 - t) x_0


def mean(t):
    return t * MU


def std(t):
    return torch.sqrt((t * SIGMA) ** 2 + (1 - t) ** 2)


def exact_u(x, t, s):
    """The exact flow map of Gaussian data: x_s = m(s) + std(s) / std(t) (x_t - m(t)), as an average velocity."""
    shape = (-1, *[1] * (x.ndim - 1))
    t, s = t.view(shape), s.view(shape)
    x_s = mean(s) + std(s) / std(t) * (x - mean(t))
    gap = s - t
    # at s = t: the velocity m'(t) + std'(t) / std(t) (x - m(t)), by differentiating x_s in s
    dstd = (t * SIGMA ** 2 - (1 - t)) / std(t)
    velocity = MU + dstd / std(t) * (x - mean(t))
    return torch.where(gap.abs() > 1e-12, (x_s - x) / torch.where(gap.abs() > 1e-12, gap, 1.0), velocity)


@pytest.mark.parametrize("mode", ["forward", "double_backward", "finite_difference"])
def test_the_exact_flow_map_satisfies_the_meanflow_identity(mode):
    """u(x, t, s) = v(x, t) + (s - t) d/dt u along dx/dt = v: what the loss's target rests on."""
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=torch.float64)
    t = torch.rand(16, dtype=torch.float64) * 0.9
    s = t + (1 - t) * torch.rand(16, dtype=torch.float64)
    v = exact_u(x, t, t)
    u, dudt = total_derivative(exact_u, x, t, s, v, mode)
    assert torch.allclose(u, exact_u(x, t, s))
    assert torch.allclose(u, v + (s - t).view(-1, 1) * dudt, atol=1e-9 if mode != "finite_difference" else 1e-6)
    assert dudt.abs().max() > 1e-2  # curved in t: the term is really exercised
    # and with a wrong tangent (time backwards) it does not hold
    _, wrong = total_derivative(lambda x_, t_, s_: exact_u(x_, -t_, s_), x, -t, s, v, mode)
    assert not torch.allclose(u, v + (s - t).view(-1, 1) * wrong, atol=1e-3)


def test_the_finite_difference_sees_one_function_when_the_net_draws_random_numbers():
    noisy = lambda x, t, s: x * t.view(-1, 1) + torch.rand(x.shape[0], 1)  # noqa: E731  (like label dropout)
    x, t, s = torch.randn(4, 2), torch.rand(4), torch.ones(4)
    _, dudt = total_derivative(noisy, x, t, s, torch.ones_like(x), "finite_difference")
    assert torch.allclose(dudt, t.view(-1, 1) + x, atol=1e-2)  # d/dt [x t] along dx/dt = 1


def test_forward_and_double_backward_agree_on_a_net_with_attention():
    cfg = load_config(None, ["model.flow_map=true", "objective.name=mean_flow", "model.image_size=8",
                             "model.patch_size=4"])
    torch.manual_seed(0)
    net = build_model(cfg.model).double().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # off the zero init
    x, v = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.randn(3, 1, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64)
    s, c = torch.tensor([0.4, 0.9, 0.8], dtype=torch.float64), torch.tensor([1, 2, 3])
    fn = lambda x_, t_, s_: net(x_, t_, c, s_)  # noqa: E731
    _, a = total_derivative(fn, x, t, s, v, "forward")
    _, b = total_derivative(fn, x, t, s, v, "double_backward")
    eps = 1e-4  # the time embedding runs in float32: a finite difference in t is good to ~1e-3 only
    with torch.no_grad():
        fd = (fn(x + eps * v, t + eps, s) - fn(x - eps * v, t - eps, s)) / (2 * eps)
    assert torch.allclose(a, b, atol=1e-8) and (a - fd).abs().max() < 3e-3 * fd.abs().max()


def test_the_loss_is_zero_for_the_exact_field_of_a_point_mass_and_positive_for_a_wrong_one():
    """Data at one point mu: conditional and marginal velocity coincide, u(x, t, s) = (mu - x) / (1 - t)."""
    mu = torch.tensor([[0.5, -1.0]])
    batch = {"x": mu.repeat(32, 1), "cond": torch.zeros(32, dtype=torch.long)}
    loss = MeanFlowLoss(time_sampling="uniform", jump_share=0.5, adaptive_p=0.0)
    g = torch.Generator().manual_seed(0)
    exact = lambda x, t, c, s: (mu - x) / (1 - t.view(-1, 1))  # noqa: E731
    assert loss(exact, batch, generator=g).max() < 1e-8
    for wrong in (lambda x, t, c, s: (mu - x) / (1 - s.view(-1, 1) * 0.99),  # depends on s: not a flow map of it
                  lambda x, t, c, s: (mu - x)):
        assert loss(wrong, batch, generator=torch.Generator().manual_seed(0)).mean() > 1e-3


def test_times_are_ordered_with_a_share_of_jumps():
    t, s = MeanFlowLoss(jump_share=0.25).times(20_000, torch.Generator().manual_seed(0))
    assert (t <= s).all() and abs((s > t).float().mean() - 0.25) < 0.02


def test_one_flow_map_step_from_noise_lands_on_the_data_distribution_exactly():
    x0 = torch.randn(8, 3, dtype=torch.float64)
    net = lambda x, t, c, s: exact_u(x, t.double(), s.double())  # noqa: E731
    ts = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x1 = sample_flow_map(net, torch.zeros(8, dtype=torch.long), 1.0, 10, x0, ts)
    assert torch.allclose(x1, MU + SIGMA * x0)
    two = sample_flow_map(net, torch.zeros(8, dtype=torch.long), 1.0, 10, x0, torch.tensor([0.0, 0.5, 1.0]).double())
    assert torch.allclose(two, MU + SIGMA * x0)
    assert nfe("flow_map", 2, 1.0) == 2 and nfe("flow_map", 1, 2.0) == 2


@pytest.mark.parametrize("arch", ["dit", "ssm", "mlp"])
def test_a_flow_map_net_starts_as_its_velocity_parent(arch):
    extra = ["model.image_size=1", "model.patch_size=1", "model.in_channels=2"] if arch == "mlp" else \
        ["model.image_size=8", "model.patch_size=4"]
    velocity_cfg = load_config(None, [f"model.arch={arch}", *extra])
    flow_cfg = load_config(None, [f"model.arch={arch}", "model.flow_map=true", "objective.name=mean_flow", *extra])
    torch.manual_seed(0)
    parent = build_model(velocity_cfg.model).eval()
    with torch.no_grad():
        for p in parent.parameters():
            p.add_(0.05 * torch.randn_like(p))
    child = build_model(flow_cfg.model).eval()
    missing, unexpected = child.load_state_dict(parent.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("span_embed.") for k in missing)
    shape = (4, 2, 1, 1) if arch == "mlp" else (4, 1, 8, 8)
    x, t, c = torch.randn(shape), torch.rand(4), torch.tensor([0, 1, 2, 3])
    with torch.no_grad():
        v = parent(x, t, c)
        assert torch.allclose(child(x, t, c, torch.ones(4)), v, atol=1e-6)
        assert torch.allclose(child(x, t, c), v, atol=1e-6)
        with pytest.raises(ValueError, match="flow_map"):
            parent(x, t, c, torch.ones(4))


def test_configs_that_cannot_train_a_flow_map_are_refused():
    with pytest.raises(ConfigError, match="model.flow_map"):
        load_config(None, ["objective.name=mean_flow"])
    with pytest.raises(ConfigError, match="flow_map"):
        load_config(None, ["sample.sampler=flow_map"])
    with pytest.raises(ConfigError, match="objective.jvp"):
        load_config(None, ["model.flow_map=true", "objective.name=mean_flow", "objective.jvp=reverse"])
    for jvp in ("forward", "double_backward"):
        with pytest.raises(ConfigError, match="ZeRO-3"):
            load_config(None, ["model.flow_map=true", "objective.name=mean_flow", f"objective.jvp={jvp}",
                               "train.zero_stage=3"])


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_flow_map_sampler_spends_the_network_evaluations_nfe_counts(guidance):
    rows = []

    def net(x, t, c, s):
        rows.append(x.shape[0])
        return torch.zeros_like(x)

    sample_flow_map(net, torch.zeros(5, dtype=torch.long), guidance, 10, torch.randn(5, 2), torch.tensor([0.0, 0.5, 1.0]))
    assert sum(rows) / 5 == nfe("flow_map", 2, guidance)


def test_distilling_a_teachers_velocity_is_zero_loss_for_its_exact_flow_map_and_uses_the_teacher():
    mu = torch.tensor([[0.5, -1.0]])
    batch = {"x": torch.randn(32, 2), "cond": torch.zeros(32, dtype=torch.long)}  # the data no longer matters
    exact_v = lambda x, t, c: (mu - x) / (1 - t.view(-1, 1))  # noqa: E731  (a point mass's ODE)
    exact_u = lambda x, t, c, s: exact_v(x, t, c)  # noqa: E731  (straight paths: u = v)
    loss = MeanFlowLoss(time_sampling="uniform", jump_share=0.5, adaptive_p=0.0)
    loss.distil_from(exact_v, guidance=1.0, null_label=10, cond_dropout=0.5)
    assert loss(exact_u, batch, generator=torch.Generator().manual_seed(0)).max() < 1e-8
    loss.distil_from(lambda x, t, c: exact_v(x, t, c) + 1.0, guidance=1.0, null_label=10, cond_dropout=0.0)
    assert loss(exact_u, batch, generator=torch.Generator().manual_seed(0)).mean() > 0.3

from types import SimpleNamespace

import pytest
import torch

from dtrain.diffusion import build_objective, prediction_and_path
from dtrain.diffusion.ddpm import DDPMLoss
from dtrain.diffusion.flow import RectifiedFlowLoss, sample_time
from dtrain.diffusion.parameterization import PREDICTIONS, Denoiser, from_x_eps, to_velocity, to_x_eps
from dtrain.diffusion.paths import PATHS
from dtrain.diffusion.samplers import (REGISTRY, flow_times, guided, initial_noise, misfit, nfe, sample,
                                       sample_euler, sample_heun, sampling_times)

# (path, prediction) pairs a sampler can use from t_min: v needs a VP path; eps on the linear path
# would divide by alpha(0) = 0
PAIRS = [(p, q) for p in PATHS for q in PREDICTIONS
         if not (p == "linear" and q in ("v", "eps"))]
OBJECTIVES = [RectifiedFlowLoss("uniform")] + [DDPMLoss(q, s) for s in ("cosine", "vp_linear") for q in ("eps", "v", "x0")]


def _b(t, x):  # [B] -> [B, 1, ...]
    return t.reshape(-1, *([1] * (x.ndim - 1))).to(x)


def exact_point_mass(prediction, path, c):
    """The exact net's raw output fn(x, t) when all data equal c: E[x_data | x_t] = c exactly, so
    x_hat = c and eps_hat = (x - alpha c) / sigma."""
    def fn(x, t):
        tb = _b(t, x)
        a, s, da, ds = path.alpha(tb), path.sigma(tb), path.d_alpha(tb), path.d_sigma(tb)
        e = (x - a * c) / s
        return {"velocity": da * c + ds * e, "eps": e, "x0": c + 0 * x, "v": a * e - s * c}[prediction]
    return fn


@pytest.mark.parametrize("loss", OBJECTIVES, ids=lambda loss: f"{loss.prediction}-{loss.path.name}")
def test_objective_is_per_sample_and_zero_for_the_exact_net_of_a_point_mass(loss):
    x = torch.full((4, 1, 3, 3), 0.7, dtype=torch.float64)
    batch = {"x": x, "cond": torch.zeros(4, dtype=torch.long)}
    exact = exact_point_mass(loss.prediction, loss.path, 0.7)
    g = torch.Generator().manual_seed(0)
    right = loss(lambda xt, t, c: exact(xt, t), batch, generator=g)
    assert right.shape == (4,) and right.max() < 1e-10
    wrong = loss(lambda xt, t, c: exact(xt, t) + 0.5, batch, generator=g)
    assert torch.allclose(wrong, torch.full((4,), 0.25))


@pytest.mark.parametrize("loss", [RectifiedFlowLoss(), DDPMLoss("eps")], ids=["rectified_flow", "ddpm"])
def test_objective_uses_the_batch_noise_when_present(loss):
    x, noise = torch.randn(3, 2, 2), torch.randn(3, 2, 2)
    batch = {"x": x, "cond": torch.zeros(3, dtype=torch.long), "noise": noise}
    knows_noise = lambda xt, t, c: x - noise if loss.prediction == "velocity" else noise  # noqa: E731
    assert loss(knows_noise, batch).max() < 1e-10
    del batch["noise"]
    assert loss(knows_noise, batch).min() > 0.01


def test_objective_is_reproducible_with_a_generator():
    batch = {"x": torch.randn(3, 4), "cond": torch.zeros(3, dtype=torch.long)}
    net = lambda xt, t, c: xt * t.view(-1, 1)  # noqa: E731
    for loss in OBJECTIVES:
        a = loss(net, batch, torch.Generator().manual_seed(1))
        assert torch.equal(a, loss(net, batch, torch.Generator().manual_seed(1)))


def test_build_objective_and_prediction_and_path_from_config():
    rf = SimpleNamespace(name="rectified_flow", time_sampling="logit_normal", prediction="eps", schedule="cosine",
                         target="sample")
    assert isinstance(build_objective(rf), RectifiedFlowLoss)
    assert prediction_and_path(rf) == ("velocity", PATHS["linear"])
    dd = SimpleNamespace(name="ddpm", time_sampling="uniform", prediction="v", schedule="vp_linear")
    loss = build_objective(dd)
    assert (loss.prediction, loss.path, loss.time_sampling) == ("v", PATHS["vp_linear"], "uniform")
    assert prediction_and_path(dd) == ("v", PATHS["vp_linear"])
    for bad in (dict(name="edm"), dict(name="ddpm", schedule="sigmoid"), dict(name="ddpm", prediction="velocity"),
                dict(time_sampling="beta")):
        with pytest.raises(ValueError, match="choose one of"):
            build_objective(SimpleNamespace(**{**vars(dd), **bad}))
    with pytest.raises(ValueError, match="variance-preserving"):
        Denoiser(lambda x, t: x, "v", PATHS["linear"])


@pytest.mark.parametrize("name", list(PATHS))
def test_paths_have_analytic_derivatives_and_the_right_ends(name):
    path = PATHS[name]
    t = torch.linspace(0.05, 0.95, 7, dtype=torch.float64, requires_grad=True)
    for f, df in ((path.alpha, path.d_alpha), (path.sigma, path.d_sigma)):
        (grad,) = torch.autograd.grad(f(t).sum(), t)
        assert torch.allclose(df(t), grad)
    one = torch.tensor(1.0)
    assert path.alpha(one) == 1 and path.sigma(one) == 0
    a0 = path.alpha(torch.tensor(path.t_min, dtype=torch.float64))
    if path.variance_preserving:
        assert torch.allclose(path.alpha(t) ** 2 + path.sigma(t) ** 2, torch.ones_like(t))
        assert 1e-3 < a0 < 1e-2  # noise for practical purposes, yet eps -> x0 stays finite
    else:
        assert a0 == 0


@pytest.mark.parametrize("name,prediction", PAIRS + [("linear", "eps")])
def test_conversions_round_trip(name, prediction):
    path, g = PATHS[name], torch.Generator().manual_seed(0)
    x, out = torch.randn(5, 2, 3, generator=g, dtype=torch.float64), torch.randn(5, 2, 3, generator=g, dtype=torch.float64)
    t = torch.linspace(0.1, 0.9, 5, dtype=torch.float64)
    tb = _b(t, x)
    x_hat, eps_hat = to_x_eps(prediction, out, x, t, path)
    assert torch.allclose(path.alpha(tb) * x_hat + path.sigma(tb) * eps_hat, x)  # consistent with x_t
    assert torch.allclose(from_x_eps(prediction, x_hat, eps_hat, t, path), out)  # and with the raw output
    u = to_velocity(prediction, out, x, t, path)
    assert torch.allclose(u, path.d_alpha(tb) * x_hat + path.d_sigma(tb) * eps_hat)
    assert torch.allclose(torch.stack(to_x_eps("velocity", u, x, t, path)), torch.stack([x_hat, eps_hat]))


ODE_SAMPLERS = [name for name, s in REGISTRY.items() if not s.needs_flow_map]  # what `sample` runs


@pytest.mark.parametrize("sampler", ODE_SAMPLERS)
@pytest.mark.parametrize("name,prediction", PAIRS)
def test_samplers_reach_a_point_mass_from_the_exact_net(sampler, name, prediction):
    c = torch.randn(1, 1, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    den = Denoiser(exact_point_mass(prediction, PATHS[name], c), prediction, PATHS[name])
    noise = torch.randn(6, 1, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = sample(sampler, den, noise, steps=20)
    # DDIM, and Euler / Heun on the straight path, are exact. Otherwise the last (Euler) step leaves
    # x - alpha c times (sigma + h d_sigma) / sigma at t_{N-1}: (pi h / 2)^2 / 3 = 2e-3 on cosine, 1/2 on
    # vp_linear, whose sigma ~ sqrt(beta_min (1 - t)) near the data (measured max 5e-3 and 6e-2)
    tol = 1e-9 if sampler == "ddim" or name == "linear" else {"cosine": 1e-2, "vp_linear": 0.1}[name]
    assert (out - c).abs().max() < tol


def test_euler_reaches_a_point_mass_exactly_at_any_step_count():
    target = torch.randn(1, 1, 4, 4)
    fn = lambda x, t: (target - x) / (1 - t.view(-1, 1, 1, 1))  # noqa: E731
    for steps in (1, 3, 8):
        out = sample_euler(fn, torch.randn(5, 1, 4, 4), flow_times(steps))
        assert torch.allclose(out, target.expand(5, -1, -1, -1), atol=1e-5)


@pytest.mark.parametrize("prediction", ["velocity", "x0"])
def test_ddim_is_euler_on_the_linear_path(prediction):
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    fn = lambda x, t: torch.tanh(x @ w) * (1 + t.view(-1, 1))  # noqa: E731  some non-trivial net
    x = torch.randn(3, 4, dtype=torch.float64)
    den = lambda: Denoiser(fn, prediction, PATHS["linear"])  # noqa: E731
    assert torch.allclose(sample("ddim", den(), x, 7), sample("euler", den(), x, 7), atol=1e-12)


def test_heun_beats_euler_on_a_gaussian():
    # data N(m, s^2) on the linear path: x_t = mean_t + std_t z with mean_t = t m,
    # std_t = sqrt(t^2 s^2 + (1 - t)^2), so the exact velocity is m + std_t'/std_t (x - t m)
    # and noise z lands at m + s z.
    m, s = 1.5, 0.5
    std = lambda t: torch.sqrt(t ** 2 * s ** 2 + (1 - t) ** 2)  # noqa: E731
    fn = lambda x, t: m + (t * s ** 2 - (1 - t)) / std(t) ** 2 * (x - t * m)  # noqa: E731
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)
    err = {(f.__name__, n): (f(fn, z, flow_times(n)) - (m + s * z)).abs().max().item()
           for f in (sample_euler, sample_heun) for n in (8, 16)}
    assert err["sample_heun", 8] < err["sample_euler", 8] / 4, err  # measured 0.030 vs 0.170
    assert err["sample_heun", 16] < err["sample_heun", 8] / 3, err  # second order: halving h quarters it


@pytest.mark.parametrize("sampler", ODE_SAMPLERS)
@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_nfe_counts_network_evaluations(sampler, guidance):
    rows = []

    def net(x, t, c):
        rows.append(x.shape[0])
        return torch.zeros_like(x)

    den = Denoiser(guided(net, torch.tensor([1, 2]), guidance, 10), "x0", PATHS["cosine"])
    sample(sampler, den, torch.randn(2, 3), steps=5)
    assert sum(rows) / 2 == nfe(sampler, 5, guidance)
    assert den.calls * (1 if guidance == 1.0 else 2) == nfe(sampler, 5, guidance)


def test_unknown_sampler_names_the_choices():
    with pytest.raises(ValueError, match="euler, heun, ddim"):
        sample("dpm", Denoiser(lambda x, t: x, "velocity", PATHS["linear"]), torch.zeros(1, 1), 2)
    with pytest.raises(ValueError, match="euler, heun, ddim"):
        nfe("dpm", 2, 1.0)


def test_schedule_runs_from_noise_to_data():
    ts = flow_times(10)
    assert ts[0] == 0 and ts[-1] == 1 and torch.all(ts[1:] > ts[:-1])
    for path in PATHS.values():
        ts = sampling_times(path, 10)
        assert torch.isclose(ts[0], torch.tensor(path.t_min)) and ts[-1] == 1 and torch.all(ts[1:] > ts[:-1])


def test_guidance_combines_conditional_and_unconditional_predictions():
    net = lambda x, t, c: x + c.view(-1, 1).float()  # noqa: E731  label shifts the output
    x, t, c = torch.zeros(2, 1), torch.zeros(2), torch.tensor([3, 3])
    assert torch.equal(guided(net, c, 1.0, 10)(x, t), torch.full((2, 1), 3.0))
    # v_u + s (v_c - v_u) = 10 + 2 (3 - 10) = -4
    assert torch.equal(guided(net, c, 2.0, 10)(x, t), torch.full((2, 1), -4.0))


def test_noise_depends_on_seed_not_on_batch():
    a = initial_noise((1, 4, 4), [5, 6, 7])
    assert torch.equal(a[1], initial_noise((1, 4, 4), [6])[0])
    assert not torch.equal(a[0], a[1])


def test_the_registry_decides_which_samplers_fit_a_model():
    assert misfit("flow_map", flow_map=False) and "model.flow_map=true" in misfit("flow_map", flow_map=False)
    assert all(misfit(name, flow_map=False) is None for name in ODE_SAMPLERS)
    assert all(misfit(name, flow_map=True) is None for name in REGISTRY)
    with pytest.raises(ValueError, match="flow_map.*generation.solve"):
        sample("flow_map", Denoiser(lambda x, t: x, "velocity", PATHS["linear"]), torch.zeros(1, 1), 2)


def test_logit_normal_times_stay_inside_and_concentrate_mid_path():
    t = sample_time(20000, "logit_normal", torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert ((t > 0.25) & (t < 0.75)).float().mean() > 0.6

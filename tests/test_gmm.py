"""Gaussian-mixture ground truth: spec validation, vector shards, the MLP backbone, the exact
rectified-flow velocity, and the metrics built on it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from dtrain.config import ConfigError, ModelConfig, load_config
from dtrain.data.gmm import SPEC_FILE, load_spec, write_gmm
from dtrain.data.shards import DataError, load_images, train_batches
from dtrain.diffusion.parameterization import Denoiser
from dtrain.diffusion.paths import PATHS
from dtrain.diffusion.samplers import flow_times, sample, sample_euler
from dtrain.data.mixture import GaussianMixture
from dtrain.eval.gmm import component_shares, coverage, likelihood_gap, ode_log_likelihood, velocity_error
from dtrain.models import build_model

DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "configs" / "gmm" / "default.yaml"


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Many tiny tensor ops: one thread is several times faster than two on a busy 2-core machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def ring() -> GaussianMixture:
    return load_spec(DEFAULT_SPEC)


@pytest.fixture(scope="module")
def skewed() -> GaussianMixture:
    """Three broad components with full covariances: the Sigma algebra matters and kernel regression is easy."""
    return GaussianMixture(means=[[1.5, 0.0], [-1.0, 1.0], [0.0, -1.5]],
                           covs=[[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]], [[0.25, 0.0], [0.0, 0.25]]],
                           weights=[0.5, 0.3, 0.2])


# ---- spec ---------------------------------------------------------------------------------------

GOOD = {"means": [[0.0, 0.0], [1.0, 1.0]], "covs": [[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.1], [0.1, 0.5]]],
        "weights": [0.4, 0.6]}


@pytest.mark.parametrize("change, message", [
    ({"covs": [[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.9], [0.9, 0.5]]]}, "covariance 1 is not positive definite"),
    ({"covs": [[[1.0, 0.0], [0.0, 1.0]], [[0.5, 0.1], [0.2, 0.5]]]}, "covariance 1 is not symmetric"),
    ({"weights": [0.4, 0.5]}, "weights sum to 0.9, not 1"),
    ({"weights": [1.2, -0.2]}, "weight 1 is negative"),
    ({"weights": [1.0]}, "weights has shape [1], expected [2]"),
    ({"covs": [[[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]]] * 2}, "expected [2, 2, 2]"),
    ({"means": [[0.0, 0.0], [1.0]]}, "means is not a (rectangular) array"),
    ({"sigma": 1}, "unknown key(s) ['sigma']"),
])
def test_spec_errors_name_the_problem(tmp_path, change, message):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**GOOD, **change}))
    with pytest.raises(DataError) as e:
        load_spec(path)
    assert message in str(e.value) and str(path) in str(e.value)


def test_spec_missing_key_and_file(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"means": GOOD["means"], "weights": GOOD["weights"]}))
    with pytest.raises(DataError, match=r"missing key\(s\) \['covs'\]"):
        load_spec(path)
    with pytest.raises(DataError, match="not found"):
        load_spec(tmp_path / "nope.yaml")


def test_default_spec_has_a_light_component(ring):
    assert ring.dim == 2 and ring.num_components == 9
    assert ring.weights[8].item() == pytest.approx(0.03) and ring.weights.sum().item() == pytest.approx(1.0)


# ---- shards -------------------------------------------------------------------------------------


def test_shards_round_trip_through_the_reader(tmp_path, skewed):
    paths = write_gmm(skewed, tmp_path, n_train=40, n_val=10, train_shards=2, seed=3)
    assert [Path(p).name for p in paths["train"]] == ["train-000000.tar", "train-000001.tar"]
    assert [Path(p).name for p in paths["val"]] == ["val-000000.tar"]
    gen = g(3)  # train = the first 40 draws, val the next 10
    (x_ref, y_ref), (xv_ref, yv_ref) = skewed.sample(40, gen), skewed.sample(10, gen)

    x, y = load_images(f"{tmp_path}/train-{{000000..000001}}.tar")
    assert x.shape == (40, 2, 1, 1) and x.dtype == torch.float32  # a point = a 1x1 image with D channels
    assert torch.equal(x.view(40, 2), x_ref) and torch.equal(y, y_ref)
    xv, yv = load_images(f"{tmp_path}/val-000000.tar")
    assert torch.equal(xv.view(10, 2), xv_ref) and torch.equal(yv, yv_ref)

    xb, yb = next(train_batches(f"{tmp_path}/train-{{000000..000001}}.tar", rank=1, world=2, seed=0,
                                batch_size=8, shuffle_buffer=16))
    assert xb.shape == (8, 2, 1, 1) and yb.shape == (8,) and yb.max() < 3

    again = load_spec(tmp_path / SPEC_FILE)  # the ground truth travels with the shards
    assert torch.allclose(again.covs, skewed.covs) and torch.allclose(again.weights, skewed.weights)


def test_cli_writes_shards_and_reports_bad_specs(tmp_path):
    from dtrain.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**GOOD, "weights": [0.5, 0.6]}))
    r = CliRunner().invoke(main, ["data", "gmm", "--spec", str(bad), "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "weights sum to 1.1" in r.output
    r = CliRunner().invoke(main, ["data", "gmm", "--spec", str(DEFAULT_SPEC), "--out", str(tmp_path / "d"),
                                  "--n-train", "20", "--n-val", "5", "--shards", "2"])
    assert r.exit_code == 0, r.output
    assert "model.in_channels=2" in r.output and "model.num_classes=9" in r.output
    assert len(load_images(f"{tmp_path}/d/train-{{000000..000001}}.tar")[0]) == 20


# ---- MLP backbone -------------------------------------------------------------------------------


def mlp_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"arch": "mlp", "size": "tiny", "image_size": 1, "patch_size": 1, "in_channels": 2,
                          "num_classes": 9, **kw})


def test_mlp_is_zero_at_init_and_keeps_the_input_shape():
    net = build_model(mlp_cfg())
    for shape in [(3, 2, 1, 1), (3, 2)]:
        x = torch.randn(shape)
        out = net(x, torch.rand(3), torch.tensor([0, 4, 9]))  # 9 = the null label
        assert out.shape == x.shape and torch.count_nonzero(out) == 0
    with pytest.raises(ValueError, match="2 features per sample"):
        net(torch.randn(3, 3), torch.rand(3), torch.zeros(3, dtype=torch.long))


def test_mlp_depends_on_input_time_and_label_and_drops_labels_in_training():
    torch.manual_seed(0)
    net = build_model(mlp_cfg()).eval()
    for p in net.parameters():  # move off the zero init
        p.data.add_(0.05 * torch.randn_like(p))
    x, t, y = torch.randn(2, 2, 1, 1), torch.tensor([0.3, 0.3]), torch.tensor([1, 1])
    base = net(x, t, y)
    assert not torch.allclose(base, net(x, t + 0.2, y))
    assert not torch.allclose(base, net(x, t, y + 1))
    assert not torch.allclose(base, net(x + 0.1, t, y))
    emb = build_model(mlp_cfg(class_dropout=0.999)).y_embed.train()
    assert torch.allclose(emb(torch.arange(9)), emb.table.weight[9].expand(9, -1))


def test_config_accepts_the_mlp_on_points():
    cfg = load_config(None, ["model.arch=mlp", "model.size=S", "model.image_size=1", "model.patch_size=1",
                             "model.in_channels=2", "model.num_classes=9"])
    assert build_model(cfg.model).dim == 2
    with pytest.raises(ConfigError, match="model.size"):
        load_config(None, ["model.arch=mlp", "model.size=XL"])


def test_shipped_training_config_loads():
    cfg = load_config(DEFAULT_SPEC.parents[1] / "gmm.yaml")
    assert (cfg.model.arch, cfg.model.in_channels, cfg.model.num_classes) == ("mlp", 2, 9)


# ---- the exact field ----------------------------------------------------------------------------


def kernel_z(xt: torch.Tensor, residual: torch.Tensor, q: torch.Tensor, h: float) -> float:
    """Largest |z| over coordinates of the kernel-weighted mean of `residual` around query q, over its
    standard error. For the exact field the residual (x1 - x0) - v(x_t) has conditional mean 0 at
    every x_t, so its kernel average is 0 for any bandwidth (no smoothing bias) and z ~ N(0, 1);
    a wrong field leaves a mean."""
    w = torch.exp(-(xt - q).pow(2).sum(1).double() / (2 * h * h))
    mean = (w[:, None] * residual).sum(0) / w.sum()
    se = (w[:, None] * (residual - mean)).pow(2).sum(0).sqrt() / w.sum()
    assert se.max() < 0.05, "too few samples near the query for a meaningful check"
    return (mean.abs() / se).max().item()


@pytest.mark.parametrize("t", [0.25, 0.5, 0.8])
def test_velocity_is_the_conditional_mean_of_x1_minus_x0(skewed, t):
    """Monte Carlo: E[x1 - x0 | x_t near q] from 400k pairs against the analytic field, at 15 query
    points (each component's t mu_k and 4 points 0.5 away), mixture and per-component fields."""
    n, h = 400_000, 0.1
    x1, y = skewed.sample(n, g(1))
    x0 = torch.randn(x1.shape, generator=g(2))
    xt, target = t * x1 + (1 - t) * x0, (x1 - x0).double()
    wrong = GaussianMixture(skewed.means, 1.5 * skewed.covs, skewed.weights)  # learned too-wide components
    offsets = torch.tensor([[0.0, 0.0], [0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]])
    z_mix, z_cond, z_wrong = [], [], []
    for k in range(skewed.num_components):
        for offset in offsets:
            q = (t * skewed.means[k] + offset).float()
            near = (xt - q).pow(2).sum(1) < (4 * h) ** 2  # the kernel weight is < 4e-4 beyond 4h
            xn, tn, yn = xt[near], torch.full((int(near.sum()),), t), y[near]
            z_mix.append(kernel_z(xn, target[near] - skewed.velocity(xn, tn).double(), q, h))
            z_wrong.append(kernel_z(xn, target[near] - wrong.velocity(xn, tn).double(), q, h))
            # given the class: only that component's pairs, only its field
            sel = yn == k
            v_k = skewed.velocity(xn[sel], tn[sel], torch.full((int(sel.sum()),), k)).double()
            z_cond.append(kernel_z(xn[sel], target[near][sel] - v_k, q, h))
    assert max(z_mix) < 4.5 and max(z_cond) < 4.5, (z_mix, z_cond)
    if t >= 0.5:  # the covariances shape the field more as t grows; at t = 0.25 1.5x wider is within noise
        assert max(z_wrong) > 8, "the check cannot tell a wrong field apart"


def test_velocity_score_identity_and_endpoints(skewed):
    x = torch.randn(64, 2, generator=g(0), dtype=torch.float64) * 2
    for t in (0.3, 0.7):
        v, s = skewed.velocity(x, t), skewed.score(x, t)
        assert torch.allclose(v, (x + (1 - t) * s) / t, atol=1e-10)  # v = (x + (1 - t) score) / t
    mean = (skewed.weights[:, None] * skewed.means).sum(0)
    assert torch.allclose(skewed.velocity(x, 0.0), mean - x, atol=1e-12)  # t = 0: E[x1] - x0
    assert torch.allclose(skewed.score(x, 0.0), -x, atol=1e-12)  # p_0 = N(0, I)
    assert torch.allclose(skewed.velocity(x, 1.0), x, atol=1e-10)  # t = 1: x1 - E[x0 | x1] = x1
    near = skewed.velocity(x, 1 - 1e-9)
    assert torch.isfinite(near).all() and torch.allclose(near, x, atol=1e-6)
    # shape, dtype and per-sample times are kept
    xs = x.float().view(64, 2, 1, 1)
    ts = torch.rand(64, generator=g(1))
    out = skewed.velocity(xs, ts)
    assert out.shape == xs.shape and out.dtype == torch.float32
    assert torch.allclose(out[5].double().view(2), skewed.velocity(x[5:6].float(), ts[5:6]).double().view(2))


def test_log_prob_at_t0_is_standard_normal_and_entropy_estimate(skewed):
    x = torch.randn(10, 2, generator=g(0), dtype=torch.float64)
    assert torch.allclose(skewed.log_prob(x, 0.0), -0.5 * x.pow(2).sum(1) - torch.log(torch.tensor(2 * torch.pi)))
    one = GaussianMixture([[0.0, 0.0]], [[[0.5, 0.1], [0.1, 0.3]]], [1.0])  # a Gaussian: H = 0.5 log det(2 pi e Sigma)
    exact = 0.5 * torch.logdet(2 * torch.pi * torch.e * one.covs[0]).item()
    assert one.entropy_mc(100_000, g(1)) == pytest.approx(exact, abs=0.02)


# ---- metrics ------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler, steps", [("euler", 200), ("heun", 50), ("ddim", 200)])
def test_exact_field_through_every_sampler_reproduces_the_mixture(ring, sampler, steps):
    """The analytic field stands in for a trained net, so what is left is the sampler's own error."""
    field = Denoiser(lambda x, t: ring.velocity(x, t), "velocity", PATHS["linear"])
    x = sample(sampler, field, torch.randn(4000, 2, 1, 1, generator=g(0)), steps)
    cov = coverage(ring, x)  # sampling noise alone: E[tv] ~ 0.02 at 4000 samples, ratio s.d. ~0.09 for w = 0.03
    assert cov["tv"] < 0.04 and cov["worst_ratio"] > 0.75, cov
    gap = likelihood_gap(ring, x, n_entropy=100_000, generator=g(1))
    assert abs(gap["gap"]) < 0.06, gap  # s.e. ~0.015; Euler at 200 steps sharpens a little (gap ~ +0.01)
    # conditioned on a class, every sample lands in that component
    labels = torch.arange(9).repeat_interleave(50)
    xc = sample_euler(lambda x, t: ring.velocity(x, t, labels), torch.randn(450, 2, 1, 1, generator=g(2)),
                      flow_times(100))
    assert (ring.responsibilities(xc).argmax(1) == labels).float().mean() > 0.97


def test_coverage_detects_a_sampler_that_drops_the_light_component(ring):
    dropped = GaussianMixture(ring.means[:8], ring.covs[:8], ring.weights[:8] / ring.weights[:8].sum())
    x = sample_euler(lambda x, t: dropped.velocity(x, t), torch.randn(4000, 2, 1, 1, generator=g(0)), flow_times(100))
    cov = coverage(ring, x)
    assert cov["worst_component"] == 8 and cov["worst_ratio"] < 0.2, cov
    assert component_shares(ring, x)[8] < 0.01
    true_x, _ = ring.sample(4000, g(1))
    assert coverage(ring, true_x)["worst_ratio"] > 0.8
    soft = component_shares(ring, true_x, hard=False)  # E[r_k] = w_k for exact samples
    assert torch.allclose(soft, ring.weights, atol=0.015)


def test_velocity_error_is_zero_for_the_field_and_one_for_an_untrained_net(ring):
    ts = [0.1, 0.5, 0.9]
    exact = velocity_error(ring.velocity, ring, ts, n=512, generator=g(0), conditional=True)
    assert exact["relative"].shape == (3,) and exact["mse"].abs().max() < 1e-10
    assert (exact["floor"] > 0).all()
    net = build_model(mlp_cfg()).eval()  # zero output at init
    zero = velocity_error(net, ring, ts, n=512, generator=g(0))
    assert torch.allclose(zero["relative"], torch.ones(3, dtype=torch.float64))
    off = velocity_error(lambda x, t, c: 1.1 * ring.velocity(x, t, c), ring, ts, n=512, generator=g(0))
    assert torch.allclose(off["relative"], torch.full((3,), 0.01, dtype=torch.float64))  # ||0.1 v||^2 / ||v||^2


def test_loss_floor_is_the_least_flow_matching_loss(ring):
    """floor(t) = E||x1 - x0 - v||^2 is the loss of the exact field, and any other field does worse by its mse."""
    t = 0.6
    res = velocity_error(ring.velocity, ring, [t], n=20_000, generator=g(0))
    x1, _ = ring.sample(20_000, g(1))
    x0 = torch.randn(x1.shape, generator=g(2))
    xt = t * x1 + (1 - t) * x0
    loss = (x1 - x0 - ring.velocity(xt, t)).double().pow(2).sum(1).mean().item()
    assert res["floor"].item() == pytest.approx(loss, rel=0.03)
    other = velocity_error(lambda x, s, c: 0.9 * ring.velocity(x, s, c), ring, [t], n=20_000, generator=g(0))
    loss_other = (x1 - x0 - 0.9 * ring.velocity(xt, t)).double().pow(2).sum(1).mean().item()
    assert loss_other - loss == pytest.approx(other["mse"].item(), rel=0.05)


def test_ode_log_likelihood_of_the_exact_flow_matches_the_density(skewed):
    x, _ = skewed.sample(32, g(0))
    x = x.double().view(32, 2, 1, 1)
    null = torch.full((32,), skewed.num_components)
    ll = ode_log_likelihood(skewed.velocity, x, null, steps=100)
    assert torch.allclose(ll, skewed.log_prob(x), atol=0.02), (ll - skewed.log_prob(x)).abs().max()


def test_dtrain_eval_on_a_mixture_checkpoint_reports_exact_metrics(tmp_path, skewed):
    """Mechanics only (quality is measured, not asserted): an untrained MLP checkpoint on mixture shards.
    Zero-initialised, it predicts v = 0, so its velocity error is exactly 1 and all samples stay at 0."""
    from dtrain.checkpoint import write_inference_files
    from dtrain.cli import main
    from dtrain.eval.mixture import evaluate_mixture_checkpoint

    shards = write_gmm(skewed, tmp_path / "data", n_train=64, n_val=64, train_shards=1)
    cfg = load_config(None, ["model.arch=mlp", "model.size=tiny", "model.in_channels=2", "model.image_size=1",
                             "model.patch_size=1", f"model.num_classes={skewed.num_components}",
                             f"data.val_shards={shards['val'][0]}"])
    write_inference_files(tmp_path / "ckpt", build_model(cfg.model).state_dict(), cfg, {"step": 0})
    res = evaluate_mixture_checkpoint(tmp_path / "ckpt", steps_list=(1, 2), n=200, n_likelihood=16)
    assert [r["nfe"] for r in res["rows"]] == [1, 2] and all(r["n_samples"] == 200 for r in res["rows"])
    assert all(abs(e["relative_uncond"] - 1) < 1e-6 and abs(e["relative_cond"] - 1) < 1e-6
               for e in res["velocity_error"])
    assert res["n_val"] == 16 and res["val_log_lik_model"] < res["val_log_lik_true"]
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "ckpt"), "--in-process", "--steps", "1", "--json",
                                  "--plot", str(tmp_path / "verr.png")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["rows"][0]["steps"] == 1
    from PIL import Image

    assert Image.open(tmp_path / "verr.png").size == (640, 380)  # velocity error against t

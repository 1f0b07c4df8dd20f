"""Evaluation: Frechet distance against closed forms, the digits classifier's determinism, cache and
accuracy, and a digits checkpoint evaluation end to end on a tiny untrained model."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dtrain.eval import features as feat
from dtrain.eval.frechet import frechet_distance, frechet_distance_features, gaussian_stats

FAST = feat.TrainSpec(epochs=5)  # ~0.95 held-out accuracy in a few seconds at 8x8


# --- Frechet distance --------------------------------------------------------------------------

def test_fd_of_identical_sets_is_zero():
    f = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    assert frechet_distance_features(f, f) == pytest.approx(0.0, abs=1e-9)


def test_fd_of_shifted_gaussians_matches_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=8), rng.normal(size=8) + 1.0
    var1, var2 = rng.uniform(0.2, 2.0, 8), rng.uniform(0.2, 2.0, 8)
    # diagonal covariances commute, (S1 S2)^(1/2) = diag(sqrt(var1 var2)): d^2 = |mu1 - mu2|^2 + sum (sd1 - sd2)^2
    exact = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(var1) - np.sqrt(var2)) ** 2).sum())
    # the general (matrix) formula on the exact statistics
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(exact, rel=1e-10)
    # and on samples: the sample estimate approaches the closed form
    a = mu1 + np.sqrt(var1) * rng.normal(size=(100_000, 8))
    b = mu2 + np.sqrt(var2) * rng.normal(size=(100_000, 8))
    assert frechet_distance_features(a, b) == pytest.approx(exact, rel=0.02)


def test_fd_full_covariance_agrees_with_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2, mu1, mu2 = a @ a.T, b @ b.T + 0.1 * np.eye(6), rng.normal(size=6), rng.normal(size=6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy_linalg.sqrtm(s1 @ s2).real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-8)


def test_fd_with_singular_covariance_is_finite():
    f = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))  # N < F: rank-deficient covariance
    g = f + 0.5
    d = frechet_distance_features(f, g)
    assert np.isfinite(d) and d == pytest.approx(32 * 0.25, rel=1e-6)  # same covariance: only the mean moved
    with pytest.raises(ValueError, match="NaN"):
        gaussian_stats(torch.full((4, 3), float("nan")))


# --- the digits classifier ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return feat.digits_classifier(8, FAST, directory=tmp_path_factory.mktemp("cache"))


def test_classifier_is_accurate_on_held_out_digits(classifier):
    _, _, xv, yv = feat.digits_split(8)
    acc = feat.accuracy(classifier.logits(xv), yv)
    print(f"digits classifier ({FAST.epochs} epochs): held-out accuracy {acc:.4f} on {len(yv)} images, "
          f"trained in {classifier.train_seconds} s")
    assert acc == pytest.approx(classifier.val_acc) and acc > 0.9
    assert classifier.features(xv[:7]).shape == (7, FAST.feature_dim)


def test_classifier_is_cached_and_deterministic(classifier, tmp_path, monkeypatch):
    spec = feat.TrainSpec(epochs=1)
    a = feat.digits_classifier(8, spec, directory=tmp_path / "a")
    b = feat.digits_classifier(8, spec, directory=tmp_path / "b")  # from scratch again
    assert a.name == b.name and a.path.name == b.path.name
    for k, v in a.net.state_dict().items():
        assert torch.equal(v, b.net.state_dict()[k]), k  # bit-identical weights
    # the same hash reuses the file: training again would fail here
    monkeypatch.setattr(feat, "train_classifier", lambda *a, **k: pytest.fail("retrained despite the cache"))
    c = feat.digits_classifier(8, spec, directory=tmp_path / "a")
    assert c.path == a.path and torch.equal(c.net.embed.weight, a.net.embed.weight)
    # another image size or hyperparameter is another file
    assert feat._key(*feat.digits_split(8)[:2], 8, spec) != feat._key(*feat.digits_split(8)[:2], 8, FAST)


def test_inception_unavailable_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv(feat.INCEPTION_ENV, str(tmp_path / "missing.pth"))
    with pytest.raises(feat.FeatureNetUnavailable, match="nothing is downloaded"):
        feat.feature_net("inception", 8)
    with pytest.raises(ValueError, match="unknown feature net"):
        feat.feature_net("clip", 8)


# --- a checkpoint end to end -------------------------------------------------------------------

def test_generate_for_eval_is_batch_independent_and_measures_straightness(tiny_checkpoint):
    from dtrain.checkpoint import load_model, read_meta
    from dtrain.eval.digits import eval_batch, generate_for_eval
    from dtrain.generation import render

    net, cfg = load_model(tiny_checkpoint)
    meta = read_meta(tiny_checkpoint)
    labels, seeds = eval_batch(10, 1, seed=3)
    x, s = generate_for_eval(net, cfg, meta, labels, seeds, 3, 2.0)
    assert torch.equal(x, render(net, cfg, meta, labels, seeds, 3, 2.0))  # the probe changes nothing
    x1, s1 = generate_for_eval(net, cfg, meta, labels[:4], seeds[:4], 3, 2.0)
    x2, s2 = generate_for_eval(net, cfg, meta, labels[4:], seeds[4:], 3, 2.0)
    torch.testing.assert_close(torch.cat([x1, x2]), x)
    torch.testing.assert_close(torch.cat([s1, s2]), s)
    assert s.shape == (10,) and (s > 0).all()
    _, s_one = generate_for_eval(net, cfg, meta, labels, seeds, 1, 2.0)
    assert torch.equal(s_one, torch.zeros(10))  # one Euler step is a straight line


def test_straightness_of_known_paths():
    from dtrain.eval.digits import straightness

    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    line = torch.stack([torch.zeros(2, 3), torch.ones(2, 3) * 0.25, torch.ones(2, 3)])  # constant speed 1
    assert torch.equal(straightness(line, t), torch.zeros(2, dtype=line.dtype))
    # velocity 0 on [0, 1/2], 2 on [1/2, 1]: mean velocity 1, S = 1/2 * 1 + 1/2 * 1 = 1 per pixel
    bent = torch.stack([torch.zeros(1, 4), torch.zeros(1, 4), torch.ones(1, 4)])
    assert straightness(bent, torch.tensor([0.0, 0.5, 1.0])).item() == pytest.approx(1.0)


def test_evaluate_checkpoint_on_untrained_model(tiny_checkpoint, classifier, tmp_path):
    from dtrain.eval.digits import evaluate_checkpoint, format_table, plot_fd_vs_nfe

    res = evaluate_checkpoint(tiny_checkpoint, steps_list=(1, 2), classifier=classifier, seed=0)
    assert [r["steps"] for r in res["rows"]] == [1, 2]
    assert [r["nfe"] for r in res["rows"]] == [2, 4]  # guidance 2: two network calls per step
    assert res["n_samples"] == 50 and res["n_ref"] == 50 and res["n_floor"] == 50  # 10 per class, halved
    assert res["feature_net"] == classifier.name and res["real_seen_by_classifier"] == 0.0
    assert res["real_class_acc"] > 0.85
    for r in res["rows"]:
        assert set(r) >= {"nfe", "sampler", "fd", "class_acc", "straightness", "n_samples"}
        assert r["fd"] > 5 * res["noise_floor_fd"]  # an untrained model is far from real digits
        assert r["class_acc"] < 0.5
    assert res["rows"][0]["straightness"] == 0.0 and res["rows"][1]["straightness"] > 0
    again = evaluate_checkpoint(tiny_checkpoint, steps_list=(1,), classifier=classifier, seed=0, batch_size=7)
    assert again["rows"][0]["fd"] == pytest.approx(res["rows"][0]["fd"], rel=1e-6)  # reproducible, any batching
    assert "noise floor" in format_table(res)
    png = plot_fd_vs_nfe(res, tmp_path / "fd.png")
    from PIL import Image

    assert Image.open(png).size == (640, 420)


def test_cli_eval_prints_json_and_names_bad_input(tiny_checkpoint, monkeypatch, tmp_path):
    import json

    from click.testing import CliRunner

    from dtrain.cli import main

    monkeypatch.setenv("DTRAIN_CACHE", str(tmp_path / "cache"))  # the classifier trains once into it
    r = CliRunner().invoke(main, ["eval", str(tiny_checkpoint), "--in-process", "--steps", "1,2", "--json",
                                  "--plot", str(tmp_path / "fd.png")])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert [row["nfe"] for row in res["rows"]] == [2, 4] and res["noise_floor_fd"] > 0
    assert (tmp_path / "fd.png").is_file()
    for bad in (["--steps", "1,x"], ["--steps", "0"], ["--feature-net", "clip"]):
        r = CliRunner().invoke(main, ["eval", str(tiny_checkpoint), "--in-process", *bad])
        assert r.exit_code == 2 and "Traceback" not in r.output, (bad, r.output)


def test_audit_detects_a_skewed_sampler_and_passes_a_fair_one():
    import numpy as np

    from dtrain.eval.audit import audit_counts

    p = np.full(10, 0.1)
    fair = audit_counts(np.random.default_rng(0).multinomial(2000, p), p)
    skewed = audit_counts(np.random.default_rng(0).multinomial(2000, [0.3] + [0.7 / 9] * 9), p)
    dropped = audit_counts(np.array([0] + [200] * 9), np.full(10, 0.1))
    assert fair["p_value"] > 1e-3 and fair["kl_nats"] < 0.01
    assert skewed["p_value"] < 1e-12 and skewed["kl_nats"] > 0.05 and skewed["most_over"] == 0
    assert dropped["most_under"] == 0 and np.isfinite(dropped["kl_nats"])


def test_audit_of_a_checkpoint(tiny_checkpoint, classifier, tmp_path):
    from dtrain.eval.audit import audit_checkpoint, format_audit, plot_audit
    from dtrain.checkpoint import read_config

    shards = read_config(tiny_checkpoint).data.val_shards  # any labelled digits shards serve as reference
    res = audit_checkpoint(tiny_checkpoint, n=60, steps=2, train_shards=shards, classifier=classifier)
    assert res["n"] == 60 and abs(sum(res["shares"]) - 1) < 1e-3 and res["reference"] == [0.1] * 10
    assert "KL" in format_audit(res) and plot_audit(res, tmp_path / "audit.png").is_file()


def test_eval_sampling_as_ray_tasks_gives_the_in_process_figures(ray_cluster, tiny_checkpoint, classifier):
    from dtrain.eval.digits import evaluate_checkpoint

    kw = dict(steps_list=(1, 2), classifier=classifier, seed=0, batch_size=20, samplers=("euler", "heun"))
    tasks = evaluate_checkpoint(tiny_checkpoint, use_ray=True, **kw)  # 50 images: 3 chunks per row, 12 tasks
    local = evaluate_checkpoint(tiny_checkpoint, use_ray=False, **kw)
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in tasks["rows"]] == [
        ("euler", 1, 2), ("euler", 2, 4), ("heun", 1, 2), ("heun", 2, 6)]
    for a, b in zip(tasks["rows"], local["rows"]):
        assert a["fd"] == pytest.approx(b["fd"], rel=1e-9) and a["class_acc"] == b["class_acc"]
        assert a["straightness"] == b["straightness"]
    assert tasks["rows"][2]["straightness"] is None  # straightness is measured on Euler rows


def test_eval_logs_to_the_w_and_b_run_that_trained_the_checkpoint(tmp_path, monkeypatch):
    from dtrain.checkpoint import write_inference_files
    from dtrain.config import load_config
    from dtrain.models import build_model
    from dtrain.tracking import log_eval, stable_run_id

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    cfg = load_config(None, ["model.size=tiny", "model.image_size=8", "tracking.mode=offline"])
    write_inference_files(run / "checkpoint_00000003", build_model(cfg.model).state_dict(), cfg, {"step": 3})
    result = {"step": 3, "rows": [{"sampler": "euler", "steps": 1, "nfe": 2, "fd": 12.5, "class_acc": 0.5,
                                   "straightness": None}]}
    assert not log_eval(run / "checkpoint_00000003", cfg, result)  # the run never used W&B: nothing to log to
    run_id = stable_run_id(run)  # what the training run's tracker would have made
    assert log_eval(run / "checkpoint_00000003", cfg, result)
    assert stable_run_id(run) == run_id  # the id is kept, not made again
    written = list((run / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert written and written[0].stat().st_size > 0

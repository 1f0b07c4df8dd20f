"""The stable target field (objective.target=stable, dtrain.diffusion.flow): what it regresses, which rows
stand in for which, and that the loss, not the backbone, drops the conditions."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtrain.config import ConfigError, load_config
from dtrain.data.gmm import load_spec
from dtrain.diffusion.flow import RectifiedFlowLoss, same_condition, stable_correction

ROOT = Path(__file__).resolve().parent.parent


def empirical_field(points: torch.Tensor, xt: torch.Tensor, t: float) -> torch.Tensor:
    """E[x_1 - x_0 | x_t] when x_1 is uniform over `points` [N, D]: the exact field the target estimates."""
    logw = -(xt[:, None] - t * points[None]).pow(2).sum(-1) / (2 * (1 - t) ** 2)
    return (torch.softmax(logw, 1) @ points - xt) / (1 - t)


def test_with_the_whole_dataset_as_its_batch_the_target_is_the_exact_field():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(6, 2, generator=g, dtype=torch.float64) * 2
    for t in (0.1, 0.5, 0.9):
        x0 = torch.randn(6, 2, generator=g, dtype=torch.float64)
        xt = t * points + (1 - t) * x0
        target = points - x0 + stable_correction(points, xt, torch.full((6,), t), torch.ones(6, 6, dtype=torch.bool))
        assert torch.allclose(target, empirical_field(points, xt, t), atol=1e-9)
        # alone in its reference set, a row keeps its own pair's velocity
        alone = stable_correction(points, xt, torch.full((6,), t), torch.eye(6, dtype=torch.bool))
        assert alone.abs().max() == 0


def test_it_lowers_the_target_variance_about_the_unconditional_field_of_the_mixture():
    gmm = load_spec(ROOT / "configs" / "gmm" / "default.yaml")
    g = torch.Generator().manual_seed(1)
    x1, _ = gmm.sample(256, g)
    x0 = torch.randn(x1.shape, generator=g)
    for t, factor in ((0.3, 10.0), (0.7, 3.0)):
        xt = t * x1 + (1 - t) * x0
        field = gmm.velocity(xt, torch.full((256,), t), torch.full((256,), gmm.num_components))  # null: p_1 itself
        stable = x1 - x0 + stable_correction(x1, xt, torch.full((256,), t), torch.ones(256, 256, dtype=torch.bool))
        plain_err, stable_err = (x1 - x0 - field).pow(2).sum(1).mean(), (stable - field).pow(2).sum(1).mean()
        assert stable_err * factor < plain_err, (t, stable_err, plain_err)


def test_a_conditional_row_takes_references_of_its_own_condition_and_a_null_row_all():
    labels = torch.tensor([0, 1, 0, 1])
    refs = same_condition(labels, torch.tensor([False, False, False, True]))
    assert refs.tolist() == [[True, False, True, False], [False, True, False, True],
                             [True, False, True, False], [True, True, True, True]]
    ids = torch.tensor([[1, 2, 0], [1, 2, 0], [1, 3, 0]])  # token ids: equal captions are one condition
    assert same_condition(ids, torch.zeros(3, dtype=torch.bool)).tolist() == [
        [True, True, False], [True, True, False], [False, False, True]]
    # two far-apart clusters: a conditional row's target never leans on the other cluster's points
    x1 = torch.tensor([[5.0, 0.0], [-5.0, 0.0]])
    xt = torch.zeros(2, 2)  # equidistant at t = 0.5: unconditionally the posterior is half and half
    labelled = same_condition(torch.tensor([0, 1]), torch.zeros(2, dtype=torch.bool))
    cond = stable_correction(x1, xt, torch.full((2,), 0.5), labelled)
    assert cond.abs().max() == 0
    uncond = stable_correction(x1, xt, torch.full((2,), 0.5), torch.ones(2, 2, dtype=torch.bool))
    assert torch.allclose(uncond, torch.tensor([[-10.0, 0.0], [10.0, 0.0]]))


def test_the_loss_drops_conditions_itself_and_feeds_the_net_the_null_rows():
    loss = RectifiedFlowLoss("uniform", target="stable")
    loss.drop_conditions(null=9, rate=0.5)
    seen = []

    def net(x, t, c):
        seen.append(c.clone())
        return torch.zeros_like(x)

    batch = {"x": torch.randn(400, 2, 1, 1), "cond": torch.randint(0, 9, (400,))}
    out = loss(net, batch, torch.Generator().manual_seed(0))
    assert out.shape == (400,) and torch.isfinite(out).all()
    nulls = (seen[0] == 9).float().mean().item()
    assert 0.4 < nulls < 0.6 and ((seen[0] == 9) | (seen[0] == batch["cond"])).all()
    with pytest.raises(ValueError, match="independent noise"):
        loss(net, {**batch, "noise": torch.randn(400, 2, 1, 1)})


def test_pretraining_turns_the_backbones_own_dropout_off():
    from dtrain.models import build_model
    from dtrain.train.stages import Pretrain

    cfg = load_config(ROOT / "configs" / "gmm.yaml", ["objective.target=stable"])
    stage = Pretrain.build(cfg)
    net = build_model(cfg.model)
    stage.attach(type("Engine", (), {"module": net})(), cfg, 1, torch.float32, 0)
    assert net.y_embed.dropout == 0.0 and stage.objective.cond_dropout == cfg.model.class_dropout
    assert stage.objective.null == cfg.model.num_classes


def test_the_stable_target_is_refused_where_it_does_not_hold():
    with pytest.raises(ConfigError, match="objective.target"):
        load_config(None, ["objective.target=stable", "stage.name=reflow"])
    with pytest.raises(ConfigError, match="objective.target"):
        load_config(None, ["objective.target=stable", "objective.name=ddpm"])

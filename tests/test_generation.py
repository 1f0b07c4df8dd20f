"""The one sampling entry point on a pixel-space checkpoint (latent ones: tests/test_latents.py)."""
import numpy as np
import pytest
import torch

from dtrain.checkpoint import load_model, read_meta, write_inference_files
from dtrain.config import load_config
from dtrain.diffusion.samplers import nfe
from dtrain.generation import grid_from_weights, image_shape, render
from dtrain.models import build_model


@pytest.fixture
def ckpt(tmp_path):
    cfg = load_config(None, ["model.size=tiny", "model.image_size=8", "model.patch_size=2", "sample.steps=3"])
    torch.manual_seed(0)
    net = build_model(cfg.model)
    for p in net.parameters():  # random weights: the zero-initialised output layer would give plain noise
        p.data.add_(0.1 * torch.randn_like(p))
    write_inference_files(tmp_path / "c", net.state_dict(), cfg, {"step": 1})
    return tmp_path / "c"


def test_an_image_depends_on_its_seed_not_on_its_batch(ckpt):
    net, cfg = load_model(ckpt)
    meta = read_meta(ckpt)
    labels, seeds = torch.tensor([1, 4, 4, 9]), [10, 11, 12, 13]
    together = render(net, cfg, meta, labels, seeds, steps=3, guidance=2.0)
    assert together.shape == (4, *image_shape(cfg, meta)) == (4, 1, 8, 8)
    alone = torch.cat([render(net, cfg, meta, labels[i:i + 1], seeds[i:i + 1], 3, 2.0) for i in range(4)])
    reordered = render(net, cfg, meta, labels.flip(0), seeds[::-1], 3, 2.0).flip(0)
    assert torch.allclose(together, alone, atol=1e-5) and torch.allclose(together, reordered, atol=1e-5)
    assert not torch.allclose(together[1], together[2], atol=1e-2)  # same label, other seed: another image
    with pytest.raises(ValueError, match="one seed per image"):
        render(net, cfg, meta, labels, seeds[:2], 3, 2.0)


def test_bf16_render_agrees_with_fp32_and_leaves_the_net_alone(ckpt):
    net, cfg = load_model(ckpt)
    labels, seeds = torch.arange(10), list(range(10))
    fp32 = render(net, cfg, {}, labels, seeds, steps=3, guidance=2.0, precision="fp32")
    bf16 = render(net, cfg, {}, labels, seeds, steps=3, guidance=2.0, precision="bf16")
    assert bf16.dtype == torch.float32 and next(net.parameters()).dtype == torch.float32  # a cast copy ran
    err = (bf16 - fp32).abs()
    scale = fp32.abs().max()
    # measured over 8 random tiny nets: max 0.7-1.2%, mean 0.2-0.3% of the scale
    assert err.max() < 0.04 * scale and err.mean() < 0.008 * scale


def test_a_net_in_train_mode_samples_as_in_eval_mode_and_keeps_its_mode(ckpt):
    net, cfg = load_model(ckpt)  # eval mode
    labels, seeds = torch.arange(10), list(range(10))
    ref = render(net, cfg, {}, labels, seeds, steps=3, guidance=2.0)
    net.train()  # as the training loop hands it over: labels would be dropped at random (CFG training)
    assert torch.allclose(render(net, cfg, {}, labels, seeds, steps=3, guidance=2.0), ref, atol=1e-6)
    assert net.training


def test_nfe_and_grid_from_weights(ckpt):
    net, cfg = load_model(ckpt)
    assert nfe("euler", 8, 1.0) == 8 and nfe("euler", 8, 2.0) == 16
    g = grid_from_weights(net.state_dict(), cfg, {}, per_class=3)
    assert g.dtype == np.uint8 and g.shape == (10 * 9 + 1, 3 * 9 + 1)  # rows = classes, 8 px cells, 1 px pad


class _Counting(torch.nn.Module):
    """Counts the images the net is evaluated on (a CFG call evaluates each image twice)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.rows = net, 0

    def forward(self, x, t, c):
        self.rows += x.shape[0]
        return self.net(x, t, c)


@pytest.mark.parametrize("objective", [["objective.name=rectified_flow"],
                                       ["objective.name=ddpm", "objective.prediction=eps", "objective.schedule=cosine"],
                                       ["objective.name=ddpm", "objective.prediction=v", "objective.schedule=vp_linear"]])
def test_every_sampler_renders_every_parameterisation_at_the_nfe_it_reports(objective):
    cfg = load_config(None, ["model.size=tiny", "model.image_size=8", "model.patch_size=2", *objective])
    torch.manual_seed(0)
    net = build_model(cfg.model).eval()
    for sampler in ("euler", "heun", "ddim"):
        counting = _Counting(net)
        x = render(counting, cfg, {}, torch.tensor([1, 2, 3]), [0, 1, 2], steps=3, guidance=2.0, sampler=sampler)
        assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
        assert counting.rows == 3 * nfe(sampler, 3, 2.0)  # heun: 2 * 3 - 1 evaluations, x2 with guidance

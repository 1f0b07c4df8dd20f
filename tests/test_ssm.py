import pytest
import torch
import torch.nn.functional as F

from dtrain.config import ModelConfig
from dtrain.models import count_params, dit, ssm
from dtrain.models.dit import DiTBlock
from dtrain.models.scan import ssd_scan, ssd_scan_reference


def tiny(**kw):
    return ModelConfig(**{"arch": "ssm", "size": "tiny", "image_size": 8, "patch_size": 2, **kw})


def scan_inputs(L, H=4, G=2, P=8, N=16, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, H, P, generator=g)
    dt = F.softplus(torch.randn(B, L, H, generator=g) - 1)
    A = -(0.5 + 8 * torch.rand(H, generator=g))  # decays from mild to fast
    return x, dt, A, torch.randn(B, L, G, N, generator=g), torch.randn(B, L, G, N, generator=g)


@pytest.mark.parametrize("L", [1, 7, 64, 100, 257])  # < chunk, = chunk, not a multiple, several chunks
@pytest.mark.parametrize("G", [1, 2, 4])  # B, C shared by all heads, by pairs, one per head
def test_chunked_scan_matches_sequential_float64(L, G):
    args = scan_inputs(L, G=G)
    y, ref = ssd_scan(*args), ssd_scan_reference(*args)
    assert y.shape == ref.shape and y.dtype == torch.float32
    # relative to the output's size: float32 is ~1e-7 per op, the sequential loop itself ~1e-5 off
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_scan_keeps_float32_state_for_bf16_inputs():
    args = scan_inputs(130)
    y = ssd_scan(*(a.bfloat16() for a in args))
    ref = ssd_scan_reference(*(a.bfloat16() for a in args))
    assert y.dtype == torch.bfloat16
    assert (y.double() - ref).abs().max() <= 1e-2 * ref.abs().max()  # bf16 output rounding only


@pytest.mark.parametrize("name", list(ssm.SCAN_ORDERS))
def test_scan_orders_are_permutations_with_inverse(name):
    grid = 5
    perm = ssm.scan_order(name, grid)
    assert torch.equal(perm.sort().values, torch.arange(grid * grid))
    x = torch.randn(2, grid * grid, 3)
    assert torch.equal(x[:, perm][:, torch.argsort(perm)], x)


def test_scan_orders_walk_the_grid():
    assert ssm.scan_order("row", 3).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert ssm.scan_order("col", 3).tolist() == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    assert ssm.scan_order("zigzag", 3).tolist() == [0, 1, 2, 5, 4, 3, 6, 7, 8]


def test_untrained_ssm_outputs_zeros_of_input_shape():
    net = ssm.build(tiny(in_channels=3))
    x = torch.randn(3, 3, 8, 8)
    out = net(x, torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def perturbed(net, scale=0.02):
    torch.manual_seed(0)
    for p in net.parameters():  # move off the zero init
        p.data.add_(scale * torch.randn_like(p))
    return net


def test_gradients_reach_every_parameter():
    net = perturbed(ssm.build(tiny()))
    x, t, y = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 10])
    net(x, t, y).square().sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_output_depends_on_input_time_and_label():
    net = perturbed(ssm.build(tiny())).eval()
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.3]), torch.tensor([1, 1])
    base = net(x, t, y)
    assert not torch.allclose(base, net(x, t + 0.2, y))
    assert not torch.allclose(base, net(x, t, y + 1))
    assert not torch.allclose(base, net(x + 0.1, t, y))


def test_mixer_sees_both_directions():
    torch.manual_seed(0)
    mixer = ssm.MambaMixer(16, d_state=8, head_dim=8)
    u = torch.randn(1, 20, 16)
    v = u.clone()
    v[:, 10] += 1.0  # changes the token in the middle
    changed = (mixer(u) - mixer(v)).abs().amax(-1)[0] > 1e-6
    assert changed[:10].all() and changed[10:].all()  # tokens before and after it see it


@pytest.mark.parametrize("attn_every,depth,n_attn", [(0, 4, 0), (2, 4, 2), (3, 7, 2), (4, 8, 2)])
def test_attention_block_count(attn_every, depth, n_attn):
    net = ssm.SSMHybrid(8, 1, 2, 32, depth, 2, 10, attn_every=attn_every, d_state=8, head_dim=16)
    kinds = [type(b) for b in net.blocks]
    assert kinds.count(DiTBlock) == n_attn and kinds.count(ssm.SSMBlock) == depth - n_attn
    assert all(isinstance(b, DiTBlock) == ((i + 1) % attn_every == 0 if attn_every else False)
               for i, b in enumerate(net.blocks))
    orders = [b.order for b in net.blocks if isinstance(b, ssm.SSMBlock)]
    assert orders == [("row", "col", "zigzag")[i % 3] for i in range(len(orders))]


@pytest.mark.parametrize("name", list(ssm.SIZES))
def test_sizes_match_dit_parameter_counts(name):
    cfg = ModelConfig(size=name, image_size=32, in_channels=4, patch_size=2, num_classes=1000)
    with torch.device("meta"):  # no memory for XL's weights
        ratio = count_params(ssm.build(cfg)) / count_params(dit.build(cfg))
    assert abs(ratio - 1) < 0.15


def test_ssm_is_a_registered_backbone_with_configurable_attention_period():
    from dtrain.config import ConfigError, ModelConfig, load_config
    from dtrain.models import build_model

    cfg = load_config(None, ["model.arch=ssm", "model.size=tiny", "model.image_size=8", "model.attn_every=0"])
    net = build_model(cfg.model)
    assert not any(type(b).__name__ == "DiTBlock" for b in net.blocks)
    net = build_model(ModelConfig(arch="ssm", size="mini", image_size=8, attn_every=2))
    assert [type(b).__name__ for b in net.blocks].count("DiTBlock") == 3
    with pytest.raises(ConfigError, match="model.attn_every"):
        load_config(None, ["model.arch=ssm", "model.attn_every=-3"])


def test_bench_scaling_fits_exponents_on_a_small_sweep():
    from dtrain.bench.scaling import fitted_exponent, run

    assert abs(fitted_exponent([1, 2, 4], [3.0, 12.0, 48.0]) - 2.0) < 1e-9
    rows, summary = run(width=32, depth=2, grids=(4, 8), repeats=1, attn_every=2)
    assert [r["tokens"] for r in rows] == [16, 64] and all(r["dit_s"] > 0 and r["ssm_s"] > 0 for r in rows)
    assert {"dit_exponent", "ssm_exponent"} <= summary.keys()

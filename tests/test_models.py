import pytest
import torch
import torch.nn.functional as F

from dtrain.config import ModelConfig
from dtrain.models import BACKBONES, build_model, count_params
from dtrain.models.layers import Attention, unpatchify, PatchEmbed


def tiny(**kw):
    return ModelConfig(**{"size": "tiny", "image_size": 8, "patch_size": 2, **kw})


def test_untrained_dit_outputs_zeros_of_input_shape():
    net = build_model(tiny(in_channels=3))
    x = torch.randn(3, 3, 8, 8)
    out = net(x, torch.rand(3), torch.tensor([0, 5, 10]))
    assert out.shape == x.shape and torch.count_nonzero(out) == 0


def test_dit_depends_on_input_time_and_label_after_training_starts():
    torch.manual_seed(0)
    net = build_model(tiny()).eval()
    for p in net.parameters():  # move off the zero init
        p.data.add_(0.02 * torch.randn_like(p))
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([0.3, 0.3]), torch.tensor([1, 1])
    base = net(x, t, y)
    assert not torch.allclose(base, net(x, t + 0.2, y))
    assert not torch.allclose(base, net(x, t, y + 1))
    assert not torch.allclose(base, net(x + 0.1, t, y))


@pytest.mark.parametrize("arch", ["dit", "ssm"])
def test_label_dropout_only_in_training(arch):
    emb = build_model(tiny(arch=arch, class_dropout=0.999)).y_embed
    labels = torch.arange(10)
    emb.train()
    assert torch.allclose(emb(labels), emb.table.weight[10].expand(10, -1))  # the null label
    emb.eval()
    assert torch.allclose(emb(labels), emb.table.weight[:10])


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = Attention(16, 4)
    x = torch.randn(2, 5, 16)
    q, k, v = attn.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)
    w = F.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 5, 16))
    assert torch.allclose(attn(x), ref, atol=1e-6)


def test_unpatchify_inverts_patch_order():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    pe = PatchEmbed(3, 2, 12)
    torch.nn.init.eye_(pe.proj.weight.view(12, 12))  # identity: token = the patch's pixels (c, p, q)
    torch.nn.init.zeros_(pe.proj.bias)
    tokens = pe(x)  # [B, 16, 12] ordered (c, p, q)
    tokens = tokens.view(2, 16, 3, 2, 2).permute(0, 1, 3, 4, 2).reshape(2, 16, 12)  # -> (p, q, c)
    assert torch.equal(unpatchify(tokens, 2, 3, 4), x)


def perturbed_net_and_inputs(arch: str):
    """A tiny backbone moved off its zero init (so gradients flow everywhere), without label dropout."""
    torch.manual_seed(0)
    net = build_model(tiny(arch=arch))
    for p in net.parameters():
        p.data.add_(0.02 * torch.randn_like(p))
    net.y_embed.dropout = 0.0
    return net, (torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([1, 2]))


def loss_and_grads(net, inputs):
    net.zero_grad()
    out = net(*inputs)
    out.square().sum().backward()
    return out.detach(), [p.grad.clone() for p in net.parameters()]


@pytest.mark.parametrize("arch", ["dit", "ssm"])
def test_gradient_checkpointing_gives_same_gradients(arch):
    net, inputs = perturbed_net_and_inputs(arch)
    _, ref = loss_and_grads(net, inputs)
    net.grad_checkpointing = True
    _, got = loss_and_grads(net, inputs)
    for a, b in zip(ref, got):
        assert torch.allclose(a, b, atol=1e-6)


def test_sizes_registry_names_the_paper_sizes():
    sizes = BACKBONES["dit"].SIZES
    assert {"tiny", "S", "B", "L", "XL"} <= set(sizes)
    # DiT-XL/2 has 675M parameters (DiT paper, Table 1) at 256px latents (32x32x4), 1000 classes
    net = build_model(ModelConfig(size="XL", image_size=32, in_channels=4, patch_size=2, num_classes=1000))
    assert abs(count_params(net) / 675e6 - 1) < 0.01


def test_flops_counter_reproduces_the_dit_paper_table():
    from dtrain.bench.flops import run

    rows = run("dit")
    assert len(rows) == 12
    for row in rows:  # DiT paper, Table 4, 256px latents; the paper rounds to 2 decimals
        assert abs(row["gmacs"] - row["paper_gmacs"]) <= max(0.01 * row["paper_gmacs"], 0.005), row
    assert all(abs(r["rel_diff"]) < 0.01 for r in rows if r["model"].endswith("/2"))


@pytest.mark.slow
@pytest.mark.parametrize("arch, backend", [("dit", "aot_eager"), ("ssm", "inductor")])
def test_backbones_work_under_torch_compile(arch, backend):
    """Both backbones trace whole (dynamo + AOT autograd) and keep their checkpoint keys. Inductor's C++
    code generation costs ~100 s per model on 2 cores, so only the SSM, whose chunked scan is the
    unusual code to lower, goes through it; DiT is plain attention and MLPs."""
    net, inputs = perturbed_net_and_inputs(arch)
    ref_out, ref_grads = loss_and_grads(net, inputs)
    net.compile(backend=backend)
    out, grads = loss_and_grads(net, inputs)
    assert torch.allclose(out, ref_out, atol=1e-5)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4)
    assert "_orig_mod" not in "".join(net.state_dict())  # in-place compile keeps checkpoint keys


def test_fourier_features_of_the_mlp_keep_x_and_add_its_octaves():
    from dtrain.models.mlp import FourierFeatures

    x = torch.tensor([[0.25, -1.0]])
    f = FourierFeatures(3)(x)  # [x, sin(2^k pi x), cos(2^k pi x)], k = 0, 1, 2, per coordinate
    assert f.shape == (1, 2 * (1 + 2 * 3))
    assert torch.equal(f[0, :2], x[0])
    angles = torch.tensor([0.25, 0.5, 1.0, -1.0, -2.0, -4.0]) * torch.pi
    assert torch.allclose(f[0, 2:8], angles.sin(), atol=1e-6) and torch.allclose(f[0, 8:], angles.cos(), atol=1e-6)
    plain = build_model(ModelConfig(arch="mlp", size="tiny", image_size=1, patch_size=1, in_channels=2))
    with_ff = build_model(ModelConfig(arch="mlp", size="tiny", image_size=1, patch_size=1, in_channels=2,
                                      fourier_octaves=3))
    assert with_ff.x_embed.in_features == 14 and plain.x_embed.in_features == 2  # old checkpoints keep loading
    assert with_ff(torch.randn(3, 2, 1, 1), torch.rand(3), torch.tensor([0, 1, 10])).shape == (3, 2, 1, 1)

import torch

from dtrain.diffusion.flow import RectifiedFlowLoss, sample_time
from dtrain.diffusion.samplers import flow_times, generate, guided, initial_noise, sample_euler


def test_loss_is_per_sample_and_zero_for_the_true_velocity_of_a_point_mass():
    # For data concentrated at a point x1, the velocity along x_t's path is (x1 - x_t) / (1 - t).
    x1 = torch.full((4, 1, 3, 3), 0.7)
    exact = lambda x, t, c: (x1 - x) / (1 - t.view(-1, 1, 1, 1))
    loss = RectifiedFlowLoss("uniform")(exact, x1, torch.zeros(4, dtype=torch.long))
    assert loss.shape == (4,) and loss.max() < 1e-8
    wrong = RectifiedFlowLoss("uniform")(lambda x, t, c: torch.zeros_like(x), x1, torch.zeros(4, dtype=torch.long))
    assert wrong.min() > 0.1


def test_euler_reaches_a_point_mass_exactly_at_any_step_count():
    target = torch.randn(1, 1, 4, 4)
    fn = lambda x, t: (target - x) / (1 - t.view(-1, 1, 1, 1))
    for steps in (1, 3, 8):
        out = sample_euler(fn, torch.randn(5, 1, 4, 4), flow_times(steps))
        assert torch.allclose(out, target.expand(5, -1, -1, -1), atol=1e-5)


def test_schedule_runs_from_noise_to_data_and_shift_moves_steps_to_noise():
    ts = flow_times(10)
    assert ts[0] == 0 and ts[-1] == 1 and torch.all(ts[1:] > ts[:-1])
    assert flow_times(10, shift=3.0)[5] < ts[5]


def test_guidance_combines_conditional_and_unconditional_predictions():
    net = lambda x, t, c: x + c.view(-1, 1).float()  # label shifts the output
    x, t, c = torch.zeros(2, 1), torch.zeros(2), torch.tensor([3, 3])
    assert torch.equal(guided(net, c, 1.0, 10)(x, t), torch.full((2, 1), 3.0))
    # v_u + s (v_c - v_u) = 10 + 2 (3 - 10) = -4
    assert torch.equal(guided(net, c, 2.0, 10)(x, t), torch.full((2, 1), -4.0))


def test_noise_depends_on_seed_not_on_batch():
    a = initial_noise((1, 4, 4), [5, 6, 7])
    assert torch.equal(a[1], initial_noise((1, 4, 4), [6])[0])
    assert not torch.equal(a[0], a[1])


def test_generate_counts_network_evaluations():
    calls = []

    def net(x, t, c):
        calls.append(x.shape[0])
        return torch.zeros_like(x)

    generate(net, torch.tensor([1, 2]), torch.randn(2, 1, 2, 2), steps=5, guidance=2.0, null_label=10)
    assert calls == [4] * 5  # one batched (cond + uncond) call per step


def test_logit_normal_times_stay_inside_and_concentrate_mid_path():
    t = sample_time(20000, "logit_normal", torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert ((t > 0.25) & (t < 0.75)).float().mean() > 0.6

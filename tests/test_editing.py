"""Inversion editing (dtrain.editing): inversion returns a sample's noise (fixed point far better than plain
Euler), strength 0 is the input, a mask keeps what is outside it exactly, prompt-to-prompt attention
replacement with the source prompt is the plain edit, `dtrain edit`. Tiny random nets moved off their init."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dtrain.checkpoint import write_inference_files
from dtrain.config import load_config
from dtrain.data.captions import encode, train_tokenizer
from dtrain.diffusion import prediction_and_path
from dtrain.diffusion.parameterization import Denoiser
from dtrain.diffusion.samplers import guided, invert, sampling_times
from dtrain.editing import EditError, edit, edit_times, invert_image, round_trip_error
from dtrain.models import build_model, null_condition
from dtrain.models.layers import CrossAttention

CAPTIONS = ["a red circle", "a blue circle", "two green squares", "a yellow cross at the top"]
FLOW = ["objective.name=rectified_flow"]
VP = ["objective.name=ddpm", "objective.prediction=v", "objective.schedule=vp_linear"]


def tiny(*over, text=False):
    text_over = ["model.conditioning=text", "model.max_tokens=8", "model.vocab_size=64"] if text else []
    cfg = load_config(None, ["model.size=tiny", "model.image_size=8", "model.patch_size=2", *text_over, *over])
    torch.manual_seed(0)
    net = build_model(cfg.model)
    for p in net.parameters():  # off the zero init, so the field is not trivial and follows its condition
        p.data.add_(0.1 * torch.randn_like(p))
    return net.eval(), cfg


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny nets on one thread: a second only adds synchronisation, which cost 10-100x here with other jobs
    on the two cores (measured: the module took 90 s on two threads, 5 s on one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CAPTIONS, 64)


def image(seed=0, batch=2):
    return torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("objective", [FLOW, VP], ids=["flow", "ddpm_v"])
@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_inversion_returns_a_samples_noise_and_fixed_point_beats_plain_euler(objective, guidance):
    net, cfg = tiny(*objective)
    rows = round_trip_error(net, cfg, torch.tensor([1, 2, 3]), [0, 1, 2], steps=8, guidance=guidance, refines=(0, 3, 5))
    euler, fp3, fp5 = rows
    per = 2 if guidance != 1.0 else 1
    assert [r["nfe"] for r in rows] == [per * 16, per * 40, per * 56]  # (1 + refine) steps back, steps forward
    assert euler["scheme"] == "euler" and fp3["scheme"] == fp5["scheme"] == "fixed_point"
    # measured: euler 0.15 (flow) / 0.44 (ddpm v) noise rms; refine 3: 2.5e-4 / 4.4e-3; refine 5: 8e-6 / 1.9e-4
    assert euler["noise_rms"] > 0.05
    assert fp3["noise_rms"] < 1e-2 and fp3["noise_rms"] < euler["noise_rms"] / 30
    assert fp5["noise_rms"] < 1e-3 and fp5["noise_rms"] < fp3["noise_rms"]
    assert fp5["image_rms"] < 1e-3 < euler["image_rms"]


def test_invert_image_is_samplers_invert_and_the_full_strength_grid_is_the_samplers():
    net, cfg = tiny(*FLOW)
    x, cond = image(), torch.tensor([3, 4])
    prediction, path = prediction_and_path(cfg.objective)
    assert torch.equal(edit_times(path, 6, 1.0), sampling_times(path, 6))
    ref = invert(Denoiser(guided(net, cond, 2.0, null_condition(cfg.model)), prediction, path), x, 6, refine=2)
    inv = invert_image(net, cfg, x, cond, 6, 2.0, "fixed_point", refine=2)
    assert torch.equal(inv.noise, ref) and inv.nfe == 2 * 3 * 6
    assert torch.equal(inv.trajectory[-1], x) and len(inv.trajectory) == len(inv.times) == 7
    half = invert_image(net, cfg, x, cond, 6, 2.0, "euler", strength=0.5)
    assert half.nfe == 2 * 3 and float(half.times[0]) == 0.5  # 3 of the 6 steps, back to t0 = 0.5


def test_strength_0_returns_the_input_and_strength_1_round_trips_it():
    net, cfg = tiny(*FLOW)
    x, src = image(), torch.tensor([3, 4])
    same = edit(net, cfg, x, src, torch.tensor([7, 7]), strength=0.0, steps=8, guidance=2.0)
    assert torch.equal(same.image, x) and same.nfe == 0
    back = edit(net, cfg, x, src, src, strength=1.0, steps=8, guidance=2.0, refine=5)  # the same condition
    assert (back.image - x).pow(2).mean().sqrt() < 1e-3 and back.nfe == 2 * (6 * 8 + 8)
    changed = edit(net, cfg, x, src, torch.tensor([7, 7]), strength=0.6, steps=8, guidance=2.0)
    assert (changed.image - x).abs().max() > 1e-2  # another class: another image


def test_a_local_edit_leaves_pixels_outside_the_mask_unchanged():
    net, cfg = tiny(*VP)
    x, src, tgt = image(1), torch.tensor([3, 4]), torch.tensor([7, 1])
    mask = torch.zeros(8, 8)
    mask[2:6, 1:5] = 1.0
    mask[6, 1:5] = 0.5  # a soft edge
    out = edit(net, cfg, x, src, tgt, strength=0.8, steps=8, guidance=2.0, mask=mask).image
    keep = (mask == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])  # exactly, not approximately
    assert (out - x)[(mask == 1).expand_as(x)].abs().max() > 1e-2  # inside, the edit happened
    plain = edit(net, cfg, x, src, tgt, strength=0.8, steps=8, guidance=2.0).image
    assert torch.equal(edit(net, cfg, x, src, tgt, strength=0.8, steps=8, guidance=2.0, mask=torch.ones(8, 8)).image,
                       plain)  # a mask of the whole image is the plain edit


def test_attention_replacement_with_the_source_prompt_is_the_plain_edit(tok):
    net, cfg = tiny(*FLOW, text=True)
    x = image(2)
    src, tgt = encode(tok, ["a red circle"] * 2, 8), encode(tok, ["a blue circle"] * 2, 8)
    plain = edit(net, cfg, x, src, src, strength=0.7, steps=6, guidance=2.0).image
    p2p = edit(net, cfg, x, src, src, strength=0.7, steps=6, guidance=2.0, attention_replace=True)
    assert torch.allclose(p2p.image, plain, atol=1e-5)
    # 4 steps back (1 + 3 refinements) and forward, plus a source-branch call in round(0.8 * 4) = 3 of them
    assert p2p.nfe == 2 * (4 * 4 + 4 + 3)
    swapped = edit(net, cfg, x, src, tgt, strength=0.7, steps=6, guidance=2.0, attention_replace=True).image
    assert not torch.allclose(swapped, edit(net, cfg, x, src, tgt, strength=0.7, steps=6, guidance=2.0).image, atol=1e-4)
    assert all(m.probs_hook is None for m in net.modules() if isinstance(m, CrossAttention))  # hooks removed
    class_net, class_cfg = tiny(*FLOW)
    with pytest.raises(EditError, match="cross-attention"):
        edit(class_net, class_cfg, x, torch.tensor([1, 2]), torch.tensor([1, 2]), 0.5, 4, attention_replace=True)


def test_the_cross_attention_hook_sees_the_same_attention_and_is_off_by_default(tok):
    net, cfg = tiny(*FLOW, text=True)
    x, t, ids = image(3), torch.full((2,), 0.4), encode(tok, ["a red circle", "two green squares"], 8)
    layers = [m for m in net.modules() if isinstance(m, CrossAttention)]
    assert layers and all(m.probs_hook is None for m in layers)
    ref = net(x, t, ids)
    seen = []
    for m in layers:
        m.probs_hook = lambda probs, allowed: seen.append(probs) or probs
    try:
        assert torch.allclose(net(x, t, ids), ref, atol=1e-5)
    finally:
        for m in layers:
            m.probs_hook = None
    assert len(seen) == len(layers) and torch.allclose(seen[0].sum(-1), torch.ones(()))  # rows of probabilities


def test_bad_edits_are_refused_naming_the_problem():
    net, cfg = tiny(*FLOW)
    x, c = image(), torch.tensor([1, 2])
    for kwargs, match in [({"strength": 1.5}, "strength"), ({"scheme": "edict"}, "scheme"),
                          ({"scheme": "euler", "refine": 2}, "euler"), ({"mask": torch.ones(4, 4)}, "mask"),
                          ({"mask": torch.full((8, 8), 2.0)}, r"\[0, 1\]")]:
        with pytest.raises(EditError, match=match):
            edit(net, cfg, x, c, c, **{"strength": 0.5, "steps": 4, **kwargs})
    with pytest.raises(EditError, match="shape"):
        edit(net, cfg, torch.zeros(2, 3, 8, 8), c, c, 0.5, 4)
    x0_net, x0_cfg = tiny("objective.name=ddpm", "objective.prediction=x0", "objective.schedule=cosine")
    with pytest.raises(EditError, match="x0"):
        edit(x0_net, x0_cfg, x, c, c, 0.5, 4)


def test_the_cli_edits_an_image_and_refuses_a_bad_one(tmp_path, tok):
    from dtrain.cli import main

    net, cfg = tiny(*FLOW, text=True)
    write_inference_files(tmp_path / "c", net.state_dict(), cfg, {"step": 1}, tokenizer=tok.to_str())
    pixels = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    run = lambda *args: CliRunner().invoke(main, ["edit", str(tmp_path / "c"), *args, "--steps", "4", "--strength", "0.5",
                                                  "--out", str(tmp_path / "out.png")])
    done = run(str(tmp_path / "in.png"), "--prompt", "a blue circle", "--source-prompt", "a red circle",
               "--mask", str(tmp_path / "mask.png"), "--attention-replace")
    assert done.exit_code == 0, done.output
    assert "network evaluations" in done.output and " s)" in done.output
    out = np.asarray(Image.open(tmp_path / "out.png"))
    assert out.shape == (8, 8) and np.array_equal(out[4:], pixels[4:])  # black in the mask: kept exactly
    (tmp_path / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
    for name, words in [("text.png", "not a readable image"), ("big.png", "16x16")]:
        bad = run(str(tmp_path / name), "--prompt", "a blue circle")
        assert bad.exit_code == 2 and name in bad.output and words in bad.output, bad.output
    wrong = run(str(tmp_path / "in.png"), "--class-label", "1")
    assert wrong.exit_code == 2 and "--prompt" in wrong.output


def test_an_image_file_too_large_is_refused_before_it_is_read(tmp_path, monkeypatch):
    import dtrain.editing as editing

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setattr(editing, "MAX_IMAGE_BYTES", 10)
    with pytest.raises(EditError, match="a.png.*bytes"):
        editing.read_image(tmp_path / "a.png", (1, 8, 8))

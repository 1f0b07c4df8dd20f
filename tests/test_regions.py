"""Region control (dtrain.regions): the spec's validation, the mask composition (multidiffusion) and
regional cross-attention, against plain sampling. Tiny random nets, a few steps, CPU."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dtrain.checkpoint import write_inference_files
from dtrain.config import load_config
from dtrain.data.captions import train_tokenizer
from dtrain.diffusion.samplers import nfe
from dtrain.generation import conditions, solve
from dtrain.models import build_model
from dtrain.models.layers import Context
from dtrain.regions import (MAX_OBJECTS, RegionError, RegionNet, region_conditions, region_nfe, region_weights,
                            regional_context, solve_regions, validate_regions)
from tests.test_text_conditioning import perturbed

CAPTIONS = ["a red circle", "two blue squares at the top", "a green triangle", "three yellow crosses", "a blue circle"]
COMMON = ["model.size=tiny", "model.image_size=8", "model.patch_size=2"]


def text_cfg(*over, arch="dit"):
    return load_config(None, [f"model.arch={arch}", *COMMON, "model.conditioning=text", "model.max_tokens=8",
                              "model.vocab_size=64", *over])


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CAPTIONS, 64).to_str()


def close(a, b):
    """Equal up to float32 rounding on outputs of any size (a batch of another shape rounds otherwise)."""
    return bool((a - b).abs().max() <= 1e-5 * b.abs().max())


def spec(background="a blue circle", *objects):
    return validate_regions({"background": {"prompt": background},
                             "objects": [{"prompt": p, "box": list(b)} for p, b in objects]})


# ---- (a) a region of the whole image is plain sampling ----

def test_a_spec_of_one_region_or_a_whole_image_object_is_plain_sampling(tok):
    cfg = text_cfg()
    net, seeds = perturbed(build_model(cfg.model)), [3, 4]
    ids = conditions(cfg, tok, ["a red circle"] * 2)
    plain = solve(net, cfg, ids, seeds, 2, 2.0)
    alone = solve_regions(net, cfg, spec("a red circle"), seeds, 2, 2.0, tokenizer=tok)
    assert torch.equal(alone, plain)  # one region: a single plain evaluation per call, bit for bit
    for method in ("multidiffusion", "attention"):
        whole = solve_regions(net, cfg, spec("two blue squares at the top", ("a red circle", (0, 0, 1, 1))),
                              seeds, 2, 2.0, method=method, tokenizer=tok)
        assert not torch.allclose(whole, solve(net, cfg, conditions(cfg, tok, ["two blue squares at the top"] * 2),
                                               seeds, 2, 2.0), atol=1e-3)
        if method == "multidiffusion":  # the object owns its box, the whole image: its prompt alone
            assert close(whole, plain)
    # a class model the same way (labels, not prompts)
    ccfg = load_config(None, COMMON)
    cnet = perturbed(build_model(ccfg.model))
    cspec = validate_regions({"background": {"class_label": 2}, "objects": [{"class_label": 7, "box": [0, 0, 1, 1]}]})
    assert close(solve_regions(cnet, ccfg, cspec, seeds, 2, 2.0), solve(cnet, ccfg, torch.tensor([7, 7]), seeds, 2, 2.0))


# ---- (b) a region's prediction is used only inside its box ----

def test_an_object_changes_the_blended_prediction_only_inside_its_box(tok):
    cfg = text_cfg()
    net = perturbed(build_model(cfg.model))
    box = (0.25, 0.5, 0.75, 1.0)  # pixels 2..5 across, 4..7 down of 8
    wrapped = RegionNet(net, [(0, 0, 1, 1), box], smoothing=0)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.4)
    bg = conditions(cfg, tok, ["a blue circle"] * 2)
    with torch.no_grad():
        out = {p: wrapped(x, t, torch.stack([bg, conditions(cfg, tok, [p] * 2)], 1))
               for p in ("a red circle", "three yellow crosses")}
        inside = torch.zeros(8, 8, dtype=torch.bool)
        inside[4:, 2:6] = True
        changed = (out["a red circle"] - out["three yellow crosses"]).abs().amax((0, 1)) > 0
        assert torch.equal(changed, inside)
        # inside: the object's own prediction; outside: the background's
        own, background = net(x, t, conditions(cfg, tok, ["a red circle"] * 2)), net(x, t, bg)
        ref = torch.where(inside, own, background)
        assert close(out["a red circle"], ref)
    w = region_weights([(0, 0, 1, 1), box, (0.5, 0.5, 1, 1)], 8, 8)  # feathered, overlapping
    assert torch.allclose(w.sum(0), torch.ones(8, 8, dtype=torch.float64)) and (w >= 0).all()
    assert w[1, 6, 3] > 0.9 and w[0, 1, 1] > 0.99 and w[1, 1, 1] < 1e-3  # an object dominates its box only


# ---- (c) regional attention ----

def test_regional_attention_masks_an_object_to_its_patches(tok):
    cfg = text_cfg()
    net = perturbed(build_model(cfg.model))
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.6)
    cond = region_conditions(cfg, spec("a blue circle", ("a red circle", (0, 0, 1, 1))), tok).unsqueeze(0).expand(2, -1, -1)
    with torch.no_grad():
        # every box the whole image: ordinary cross-attention on the concatenated (separately encoded) prompts
        y, ctx = regional_context(net, cond, [(0, 0, 1, 1)] * 2)
        plain = net.forward_conditioned(x, t, y, Context(ctx.tokens, ctx.mask))
        assert close(RegionNet(net, [(0, 0, 1, 1)] * 2, "attention")(x, t, cond), plain)

        # a box on the left half (columns 0..1 of the 4 x 4 patches): every cross-attention layer's output
        # at the patches outside it ignores the object's tokens
        boxes = [(0, 0, 1, 1), (0, 0, 0.5, 1)]
        inputs = []
        hooks = [b.cross.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0]))) for b in net.blocks]
        RegionNet(net, boxes, "attention")(x, t, cond)
        for h in hooks:
            h.remove()
        other = cond.clone()
        other[:, 1] = conditions(cfg, tok, ["three yellow crosses"])[0]
        outside = torch.ones(4, 4, dtype=torch.bool)
        outside[:, :2] = False
        outside = outside.flatten()
        assert len(inputs) == len(net.blocks)
        for cross, h in inputs:
            a, b = (cross(h, regional_context(net, c, boxes)[1]) for c in (cond, other))
            assert torch.equal(a[:, outside], b[:, outside])
            assert not torch.allclose(a[:, ~outside], b[:, ~outside], atol=1e-4)


def test_regional_attention_runs_on_the_ssm_hybrid_and_is_refused_on_class_models(tok):
    cfg = text_cfg("model.attn_every=2", "model.depth=2", arch="ssm")
    net = perturbed(build_model(cfg.model))
    s = spec("a blue circle", ("a red circle", (0, 0, 0.5, 0.5)), ("a green triangle", (0.5, 0.5, 1, 1)))
    out = solve_regions(net, cfg, s, [0], 2, 2.0, method="attention", tokenizer=tok)
    assert out.shape == (1, 1, 8, 8) and torch.isfinite(out).all()
    ccfg = load_config(None, COMMON)
    with pytest.raises(RegionError, match="text model"):
        solve_regions(build_model(ccfg.model), ccfg, validate_regions({"background": {"class_label": 1}}), [0], 2, 2.0,
                      method="attention")


# ---- (d) validation names the field ----

@pytest.mark.parametrize("data, field", [
    ({"background": {"prompt": "a"}, "objects": [{"prompt": "b", "box": [0, 0, 1, 1]}] * (MAX_OBJECTS + 1)},
     "regions.objects: 9 objects"),
    ({"background": {"prompt": "a"}, "objects": [{"prompt": "b", "box": [0, 0, 1, 1.5]}]}, r"regions.objects\[0\].box"),
    ({"background": {"prompt": "a"}, "objects": [{"prompt": "b", "box": [-0.1, 0, 1, 1]}]}, r"regions.objects\[0\].box"),
    ({"background": {"prompt": "a"}, "objects": [{"prompt": "b", "box": [0.5, 0, 0.5, 1]}]},
     r"regions.objects\[0\].box: .* no area"),
    ({"background": {"prompt": "a"}, "objects": [{"prompt": "b", "box": [0, 0, 1]}]}, r"regions.objects\[0\].box"),
    ({"background": {"prompt": "a"}, "objects": [{"prompt": "b"}]}, r"regions.objects\[0\].box: missing"),
    ({"background": {"prompt": "a"}, "objects": [{"box": [0, 0, 1, 1]}]}, r"regions.objects\[0\].prompt: missing"),
    ({"background": {"prompt": "a"}, "objects": [{"prompt": "b", "class_label": 1, "box": [0, 0, 1, 1]}]},
     r"regions.objects\[0\].prompt"),
    ({"background": {"class_label": -1}}, "regions.background.class_label"),
    ({"background": {}}, "regions.background.prompt: missing"),
    ({"objects": []}, "regions.background: missing"),
    ({"background": {"prompt": "a", "box": [0, 0, 1, 1]}}, "regions.background.box: unknown"),
    ({"background": {"prompt": "a"}, "object": []}, "regions.object: unknown"),
])
def test_a_bad_spec_is_refused_naming_its_field(data, field):
    with pytest.raises(RegionError, match=field):
        validate_regions(data)


def test_a_spec_that_does_not_fit_the_model_is_refused_naming_its_field(tok):
    ccfg = load_config(None, COMMON)
    with pytest.raises(RegionError, match=r"regions.objects\[0\].class_label: 10 outside 0..9"):
        solve_regions(build_model(ccfg.model), ccfg, validate_regions(
            {"background": {"class_label": 1}, "objects": [{"class_label": 10, "box": [0, 0, 1, 1]}]}), [0], 1, 1.0)
    with pytest.raises(RegionError, match="regions.background.prompt: missing"):
        solve_regions(build_model(text_cfg().model), text_cfg(), validate_regions({"background": {"class_label": 1}}),
                      [0], 1, 1.0, tokenizer=tok)


# ---- (e) every sampler, honest NFE ----

def counted(net):
    """A count of the images the net evaluates (batch rows through its output layer, which every forward
    pass, plain or regional, ends with), to check region_nfe against what ran."""
    calls = [0]

    def hook(module, args):
        calls[0] += len(args[0])
    return calls, net.final.register_forward_pre_hook(hook)


@pytest.mark.parametrize("sampler, flow_map", [("euler", False), ("heun", False), ("consistency", False),
                                               ("flow_map", True)])
def test_every_sampler_runs_regions_and_the_nfe_is_what_ran(tok, sampler, flow_map):
    over = ["model.flow_map=true", "objective.name=mean_flow"] if flow_map else []
    cfg = text_cfg(*over)
    net = perturbed(build_model(cfg.model))
    s = spec("a blue circle", ("a red circle", (0, 0, 0.5, 0.5)), ("a green triangle", (0.4, 0.4, 1, 1)))
    for method, guidance in (("multidiffusion", 2.0), ("multidiffusion", 1.0), ("attention", 2.0)):
        calls, hook = counted(net)
        out = solve_regions(net, cfg, s, [0, 1], 2, guidance, sampler=sampler, method=method, tokenizer=tok,
                            negative="two blue squares at the top" if guidance != 1.0 else None)
        assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
        hook.remove()
        assert calls[0] == 2 * region_nfe(s, sampler, 2, guidance, method), (method, guidance)
    assert region_nfe(s, sampler, 3, 2.0) == nfe(sampler, 3, 1.0) * 3 + nfe(sampler, 3, 1.0)
    assert region_nfe(s, sampler, 3, 2.0, "attention") == nfe(sampler, 3, 2.0)


# ---- (f) the CLI ----

def test_cli_sample_regions_writes_images_and_prints_the_nfe(tmp_path, tok):
    from dtrain.cli import main

    cfg = text_cfg()
    write_inference_files(tmp_path / "c", perturbed(build_model(cfg.model)).state_dict(), cfg, {"step": 1},
                          tokenizer=tok)
    good = tmp_path / "r.yaml"
    good.write_text("background: {prompt: a blue circle}\nobjects:\n  - {prompt: a red circle, box: [0, 0, 0.5, 0.5]}\n")
    args = ["sample", str(tmp_path / "c"), "--per-class", "2", "--steps", "2", "--guidance", "2", "--precision", "fp32"]
    r = CliRunner().invoke(main, [*args, "--regions", str(good), "--out", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    # 2 steps x 2 regions on the conditional side + 2 unconditional
    assert "6 network evaluations per image" in r.output and (tmp_path / "g.png").stat().st_size > 0
    r = CliRunner().invoke(main, [*args, "--regions", str(good), "--region-method", "attention",
                                  "--out", str(tmp_path / "a.png")])
    assert r.exit_code == 0 and "4 network evaluations per image" in r.output, r.output  # 2 steps x 2 (guidance)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"background": {"prompt": "a"}, "objects": [{"prompt": "b", "box": [0, 0, 2, 1]}]}))
    r = CliRunner().invoke(main, [*args, "--regions", str(bad)])
    assert r.exit_code == 2 and "regions.objects[0].box" in r.output


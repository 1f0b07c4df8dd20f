"""The region-control and editing measurements (dtrain.eval.regions, dtrain.eval.edits): scenes to region
specs, scoring per object count, the edit figures (a real render of the target scene is a perfect edit; a
masked edit leaves everything outside the box exactly), tables, plots and the two commands. Tiny random
text models at 16 pixels, a reader that is the scenes' ground truth (or reads nothing), one thread."""
from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from dtrain.checkpoint import write_inference_files
from dtrain.config import load_config
from dtrain.data.captions import train_tokenizer
from dtrain.data.shapes import HELD_OUT, Seen, Wanted, caption, parse_caption, render
from dtrain.diffusion.samplers import nfe
from dtrain.eval.edits import (VARIANTS, box_mask, edit_cases, edit_figures, evaluate_edits, plot_edits, psnr)
from dtrain.eval.edits import format_table as edits_table
from dtrain.eval.regions import (evaluate_regions, fraction_box, gains, object_prompt, scene_regions,
                                 scenes_by_count, score_counts)
from dtrain.eval.regions import format_table as regions_table
from dtrain.eval.shapes import as_tensor
from dtrain.models import build_model
from dtrain.regions import region_nfe

SIZE = 16


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def truth(scene) -> list[Seen]:
    return sorted((Seen(t.shape, t.colour, t.cell) for t in scene.things), key=lambda s: s.cell)


@pytest.fixture(scope="module")
def model():
    """A tiny text DiT at 16 pixels moved off its zero init, its tokenizer trained on the captions it is asked."""
    scenes = [s for k in scenes_by_count(3, (1, 2, 3, 4), SIZE).values() for s in k]
    corpus = [caption(s) for s in scenes] + [object_prompt(t) for s in scenes for t in s.things]
    corpus += [caption(c.target) for c in edit_cases(4, 2, SIZE)] + [caption(c.scene) for c in edit_cases(4, 2, SIZE)]
    tok = train_tokenizer(corpus, 128).to_str()
    cfg = load_config(None, ["model.arch=dit", "model.size=tiny", f"model.image_size={SIZE}", "model.patch_size=4",
                             "model.in_channels=3", "model.conditioning=text", "model.max_tokens=24",
                             "model.vocab_size=128",
                             "objective.name=rectified_flow"])
    torch.manual_seed(0)
    net = build_model(cfg.model)
    for p in net.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return net.eval(), cfg, tok


# ---- scenes -> region specs ----

def test_scenes_by_count_are_fixed_and_have_exactly_k_objects():
    a, b = scenes_by_count(6, (2, 3, 4), 32), scenes_by_count(6, (2, 3, 4), 32)
    assert a == b and all(len(s.things) == k for k, v in a.items() for s in v) and [len(v) for v in a.values()] == [6] * 3
    assert not set(map(caption, a[2])) & set(map(caption, scenes_by_count(6, (2,), 32, seed=1)[2]))
    with pytest.raises(ValueError, match="object counts"):
        scenes_by_count(1, (5,))


@pytest.mark.parametrize("size", [16, 32, 64])
def test_region_specs_hold_one_object_per_region_in_a_box_inside_the_image(size):
    for k, scenes in scenes_by_count(8, (2, 3, 4), size).items():
        for scene in scenes:
            spec = scene_regions(scene, size)
            assert spec.background.prompt == "" and len(spec.objects) == len(scene.things) == k
            for region, thing in zip(spec.objects, scene.things):
                x0, y0, x1, y1 = region.box
                assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
                bx0, by0, bx1, by1 = (v / size for v in thing.box)  # the padded box holds the object's own
                assert x0 <= bx0 and y0 <= by0 and x1 >= bx1 and y1 >= by1 and x1 - x0 <= (bx1 - bx0) + 2 / size + 1e-9
                assert parse_caption(region.prompt) == [Wanted(thing.shape, thing.colour, (thing.cell,))]  # in its cell
            bare = scene_regions(scene, size, background="caption", place=False)
            assert bare.background.prompt == caption(scene)
            assert [(w.shape, w.colour, w.cells) for o in bare.objects for w in parse_caption(o.prompt)] == \
                [(t.shape, t.colour, None) for t in scene.things]
    edge = scenes_by_count(40, (4,), size)[4]
    assert any(min(fraction_box(t, size)) == 0.0 or max(fraction_box(t, size)) == 1.0 for s in edge for t in s.things)
    with pytest.raises(ValueError, match="background"):
        scene_regions(edge[0], size, background="grey")


# ---- scoring per object count ----

def test_scoring_per_count_and_the_gains_over_the_plain_prompt():
    scenes = scenes_by_count(10, (2, 3), 32)
    for k, v in scenes.items():
        perfect = score_counts([caption(s) for s in v], [truth(s) for s in v])
        assert perfect["binding_acc"] == perfect["count_acc"] == perfect["number_acc"] == perfect["place_acc"] == 1.0
        assert perfect["n"] == 10 and perfect["asked_objects"] == 10 * k
        missing = [truth(s)[1:] if i < 4 else truth(s) for i, s in enumerate(v)]  # 4 of 10 lose an object
        fig = score_counts([caption(s) for s in v], missing)
        assert fig["number_acc"] == fig["binding_acc"] == fig["count_acc"] == pytest.approx(0.6)
        assert fig["shape_acc"] == pytest.approx((10 * k - 4) / (10 * k))
    row = lambda k, m, b, c, p: {"objects": k, "method": m, "binding_acc": b, "count_acc": c,  # noqa: E731
                                 "place_acc": p, "number_acc": c}
    g = gains([row(2, "plain", 0.1, 0.2, 0.5), row(2, "multidiffusion", 0.4, 0.1, None), row(3, "attention", 1, 1, 1)])
    assert g == {"2": {"multidiffusion": {"binding": pytest.approx(0.3), "count": pytest.approx(-0.1), "place": None,
                                          "number": pytest.approx(-0.1)}}}  # no plain row for 3 objects: no gain


def test_evaluate_regions_samples_every_method_and_reports_nfe_and_tables(model):
    net, cfg, tok = model
    reads = []
    known = {as_tensor([render(sc, SIZE)])[0].numpy().tobytes(): truth(sc)
             for v in scenes_by_count(2, (2, 3), SIZE).values() for sc in v}

    def reader(x):  # reads the real renders of the scenes exactly, a sample as nothing; records what it was shown
        reads.append(x.shape)
        return [known.get(im.numpy().tobytes(), []) for im in x]

    r = evaluate_regions(net, cfg, {}, reader, tok, n=2, counts=(2, 3), steps=2, guidance=2.0, keep_images=1)
    assert [(row["objects"], row["method"]) for row in r["rows"]] == \
        [(k, m) for k in (2, 3) for m in ("plain", "multidiffusion", "attention")]
    assert reads == [(2, 3, SIZE, SIZE)] * 8  # three methods and the real renders, per count
    assert r["met"] == [] and {k: v["binding_acc"] for k, v in r["real"].items()} == {"2": 1.0, "3": 1.0}
    for row in r["rows"]:
        spec = scene_regions(scenes_by_count(2, (2, 3), SIZE)[row["objects"]][0], SIZE)
        want = nfe("euler", 2, 2.0) if row["method"] == "plain" else region_nfe(spec, "euler", 2, 2.0, row["method"])
        assert row["nfe"] == want and row["seconds_per_image"] > 0
        assert row["binding_acc"] == row["number_acc"] == 0.0 and row["shape_acc"] == 0.0
    assert r["rows"][1]["nfe"] == 2 * 3 + 2  # multidiffusion, 2 objects: 2 steps x 3 regions + 2 unconditional
    assert set(r["gain"]) == {"2", "3"} and r["gain"]["2"]["attention"]["binding"] == 0.0
    assert r["captions_over_max_tokens"] == {"2": 0, "3": 0}
    assert set(r["images"][2]) == {"captions", "real", "plain", "multidiffusion", "attention"}
    assert not torch.equal(r["images"][2]["plain"], r["images"][2]["multidiffusion"])
    table = regions_table(r)
    assert table.count("\n| 2 | ") == 3 and "| 3 | multidiffusion | 10 |" in table and "binding gain" in table
    assert "region control: nowhere" in table and "Real renders" in table
    with pytest.raises(ValueError, match="methods"):
        evaluate_regions(net, cfg, {}, reader, tok, n=1, methods=("plain", "crop"))


# ---- editing ----

def test_edit_cases_swap_one_colour_word_to_a_pair_seen_in_training_and_free():
    cases = edit_cases(30, 2, 32)
    assert cases == edit_cases(30, 2, 32)
    for c in cases:
        t, new = c.thing, c.target.things[c.index]
        assert new.colour == c.colour != t.colour and (new.shape, new.cell, new.box) == (t.shape, t.cell, t.box)
        assert (c.colour, t.shape) not in set(HELD_OUT["pairs"])
        assert len({(o.colour, o.shape) for o in c.target.things}) == 2
        src, tgt = caption(c.scene).split(), caption(c.target).split()
        changed = [(a, b) for a, b in zip(src, tgt) if a != b]  # the colour word, and "a" <-> "an" before it
        assert len(src) == len(tgt) and changed[-1] == (t.colour, c.colour) and set(changed[:-1]) <= {("a", "an"), ("an", "a")}
    assert len({c.index for c in cases}) == 2  # either object may be the edited one


def test_a_render_of_the_target_is_a_perfect_edit_and_changes_nothing_outside_the_box():
    for size in (16, 32):
        cases = edit_cases(12, 2, size)
        src = as_tensor([render(c.scene, size) for c in cases])
        tgt = as_tensor([render(c.target, size) for c in cases])
        masks = torch.stack([box_mask(c.thing, size) for c in cases])
        perfect = edit_figures(cases, src, tgt, [truth(c.target) for c in cases], masks)
        assert perfect == {"success": 1.0, "others_kept": 1.0, "edited_shape_kept": 1.0, "target_binding": 1.0,
                           "success_and_kept": 1.0, "psnr_outside": math.inf}
        unedited = edit_figures(cases, src, src, [truth(c.scene) for c in cases], masks)
        assert unedited["success"] == unedited["target_binding"] == 0.0 and unedited["others_kept"] == 1.0
        lost = edit_figures(cases, src, -src, [truth(c.target)[:0] for c in cases], masks)
        assert lost["others_kept"] == lost["success"] == 0.0 and lost["psnr_outside"] < 10
    assert psnr(4.0) == 0.0 and psnr(0.04) == pytest.approx(20.0) and psnr(0.0) == math.inf


def test_evaluate_edits_strength_zero_is_the_input_and_a_mask_keeps_the_outside(model, tmp_path):
    net, cfg, tok = model
    cases = edit_cases(3, 2, SIZE)
    known = {as_tensor([render(c.scene, SIZE)])[0].numpy().tobytes(): truth(c.scene) for c in cases}
    reader = lambda x: [known.get(im.numpy().tobytes(), []) for im in x]  # noqa: E731  the sources, else nothing
    r = evaluate_edits(net, cfg, reader, tok, n=3, strengths=(0.0, 0.5), steps=2, guidance=2.0, refines=(0, 1),
                       round_trip_n=2)
    assert r["source_read_exact"] == 1.0 and len(r["rows"]) == 2 * len(VARIANTS)
    for row in r["rows"]:
        if row["strength"] == 0.0:
            assert row["nfe"] == 0 and row["psnr_outside"] == math.inf and row["others_kept"] == 1.0
            assert row["success"] == 0.0  # the input: the source colour
        else:
            assert row["nfe"] > 0 and row["others_kept"] == 0.0  # an edited image is read as nothing
            assert (row["psnr_outside"] == math.inf) == row["mask"]  # outside the mask: the input, exactly
    assert r["met"] == []
    rt = r["round_trip"]
    assert [(x["scheme"], x["refine"]) for x in rt] == [("euler", 0), ("fixed_point", 1)]
    assert [x["nfe"] for x in rt] == [x["real_nfe"] for x in rt] == [2 * (2 + 2), 2 * (4 + 2)]
    assert all(x["real_image_rms"] >= 0 for x in rt)
    table = edits_table(r)
    assert "| mask + attention replace | 0.5 |" in table and "| fixed_point | 1 |" in table and "nowhere" in table
    paths = plot_edits(r, tmp_path / "curve.png", tmp_path / "strength.png")
    assert all(p.stat().st_size > 1000 for p in paths) and len(paths) == 2


# ---- the commands ----

def test_the_commands_print_tables_and_write_json_and_plots(model, tmp_path, monkeypatch):
    from dtrain.cli import main
    from dtrain.eval import recogniser

    net, cfg, tok = model
    write_inference_files(tmp_path / "c", net.state_dict(), cfg, {"step": 1}, tokenizer=tok)

    class Blind:
        name = "blind"

        def read(self, x):
            return [[] for _ in x]

    monkeypatch.setattr(recogniser, "shapes_recogniser", lambda size: Blind())
    ck = str(tmp_path / "c")
    r = CliRunner().invoke(main, ["eval-regions", ck, "--n", "1", "--counts", "2", "--steps", "1", "--guidance", "2",
                                  "--out", str(tmp_path / "r.json"), "--grid", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    assert "| 2 | attention | 2 |" in r.output and (tmp_path / "g.png").stat().st_size > 0
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["recogniser"] == "blind" and len(saved["rows"]) == 3 and "images" not in saved and saved["machine"]
    r = CliRunner().invoke(main, ["eval-edits", ck, "--n", "2", "--strengths", "0,1", "--steps", "1", "--round-trip", "0",
                                  "--out", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png")])
    assert r.exit_code == 0, r.output
    assert "| plain | 1.0 |" in r.output and (tmp_path / "e.png").stat().st_size > 0
    assert json.loads((tmp_path / "e.json").read_text())["rows"][0]["psnr_outside"] == math.inf
    r = CliRunner().invoke(main, ["eval-edits", ck, "--strengths", "0,2"])
    assert r.exit_code == 2 and "--strengths" in r.output

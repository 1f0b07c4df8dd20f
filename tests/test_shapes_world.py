"""The shapes world: deterministic scenes, captions that parse back into their objects, held-out
compositions kept out of training, shards in img2dataset's layout written by Ray tasks."""
from __future__ import annotations

import json
import tarfile
from collections import Counter

import numpy as np
import pytest

from dtrain.data import shapes
from dtrain.data.shapes import (CELLS, HELD_OUT, CaptionError, Scene, ShapesSpec, Thing, caption, groups,
                                make_sample, parse_caption, render, scene_rng, split_scene)
from dtrain.data.shards import DataError


def _scenes(split: str, n: int, size: int = 32, max_objects: int = 4):
    return [split_scene(scene_rng(0, split, 0, i), split, size, max_objects) for i in range(n)]


def test_the_generator_is_deterministic_by_seed():
    a, b = make_sample(3, "train", 2, 17, 32), make_sample(3, "train", 2, 17, 32)
    assert a == b
    c = make_sample(4, "train", 2, 17, 32)
    assert c["png"] != a["png"] and c["__key__"] == a["__key__"]


def test_scenes_have_1_to_4_objects_in_distinct_cells_inside_them():
    for scene in _scenes("train", 300):
        cells = [t.cell for t in scene.things]
        assert 1 <= len(cells) <= 4 and len(set(cells)) == len(cells)
        for t in scene.things:
            r, c = divmod(t.cell, 3)
            x0, y0, x1, y1 = t.box
            side = 32 / 3
            assert c * side <= x0 < x1 <= (c + 1) * side + 1e-6 and r * side <= y0 < y1 <= (r + 1) * side + 1e-6


def test_every_caption_parses_back_into_its_objects():
    seen_places = set()
    for split in ("train", "heldout"):
        for scene in _scenes(split, 400):
            text = caption(scene)
            wanted = parse_caption(text)
            assert Counter((w.colour, w.shape) for w in wanted) == Counter((t.colour, t.shape) for t in scene.things)
            for g in groups(scene.things):  # every object's cell is one its phrase allows
                asked = [w for w in wanted if (w.colour, w.shape) == (g[0].colour, g[0].shape)]
                for t in g:
                    assert asked[0].cells is None or t.cell in asked[0].cells, text
                seen_places.add(asked[0].cells is None)
    assert seen_places == {True, False}  # both placed and unplaced groups occur


def test_a_caption_outside_the_grammar_is_refused_naming_the_part():
    assert parse_caption("two blue squares on the right and a red circle at the top left") == [
        shapes.Wanted("square", "blue", (2, 5, 8))] * 2 + [shapes.Wanted("circle", "red", (0,))]
    for bad, part in [("a purple circle", "a purple circle"), ("two red circle", "count and noun"),
                      ("a red circle and a blue blob", "a blue blob"), ("four red squares at the center", "one cell")]:
        with pytest.raises(CaptionError, match=part):
            parse_caption(bad)


def test_held_out_compositions_never_reach_train_or_val_and_always_reach_heldout():
    pairs, counts = set(HELD_OUT["pairs"]), set(HELD_OUT["counts"])

    def held(scene):
        return bool({(t.colour, t.shape) for t in scene.things} & pairs) or \
            any(len(g) in counts for g in groups(scene.things))

    assert not any(held(s) for split in ("train", "val") for s in _scenes(split, 500))
    heldout = _scenes("heldout", 200)
    assert all(held(s) for s in heldout)
    assert any(len(s.things) == 4 and len(groups(s.things)) == 1 for s in heldout)  # the held-out count shows
    train_pairs = {(t.colour, t.shape) for s in _scenes("train", 2000) for t in s.things}
    assert len(train_pairs) == len(shapes.COLOURS) * len(shapes.SHAPES) - len(pairs)  # all the others do


def test_render_draws_each_object_in_its_colour_at_its_place():
    scene = Scene((Thing("square", "red", 0, (1.0, 1.0, 9.0, 9.0)), Thing("circle", "blue", 8, (23.0, 23.0, 31.0, 31.0))),
                  {"kind": "plain", "level": 40, "contrast": 0, "period": 2, "seed": 0})
    img = render(scene, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[5, 5]) == shapes.COLOURS["red"] and tuple(img[27, 27]) == shapes.COLOURS["blue"]
    assert tuple(img[16, 16]) == (40, 40, 40)
    with pytest.raises(ValueError, match="outside the supported"):
        render(scene, 8)


def test_spec_refuses_what_the_world_cannot_draw():
    for spec, msg in [(ShapesSpec(image_size=100), "16 to 64"), (ShapesSpec(max_objects=10), "one object per grid cell"),
                      (ShapesSpec(train_shards=0), ">= 1")]:
        with pytest.raises(DataError, match=msg):
            spec.check()
    assert len(CELLS) == 9


def test_shards_are_written_by_ray_tasks_in_img2dataset_layout(ray_cluster, tmp_path):
    spec = ShapesSpec(image_size=24, train_shards=2, per_shard=6, val=8, heldout=3, seed=5)
    out = shapes.write_shapes(tmp_path / "w", spec)
    assert [len(out[k]) for k in ("train", "val", "heldout")] == [2, 2, 1]
    meta = shapes.read_meta(tmp_path / "w")
    assert meta["held_out"]["pairs"] == [list(p) for p in HELD_OUT["pairs"]] and meta["num_classes"] == 40
    assert meta["splits"]["val"] == ["val-000000.tar", "val-000001.tar"]
    with tarfile.open(out["train"][1]) as tar:
        names = tar.getnames()
        assert len(names) == 6 * 4 and {n.split(".", 1)[1] for n in names} == {"png", "txt", "json", "cls"}
        key = names[0].split(".")[0]
        text = tar.extractfile(f"{key}.txt").read().decode()
        info = json.loads(tar.extractfile(f"{key}.json").read())
        png = tar.extractfile(f"{key}.png").read()
    assert info["caption"] == text and info["status"] == "success" and info["width"] == 24
    scene = shapes.scene_from_json(info)
    assert caption(scene) == text and parse_caption(text)
    assert np.array_equal(shapes.image_of(png), render(scene, 24))  # the json holds the whole scene
    local = shapes.write_shapes(tmp_path / "local", spec, use_ray=False)  # same bytes without Ray
    assert all(open(a, "rb").read() == open(b, "rb").read() for a, b in zip(out["train"], local["train"]))
    with pytest.raises(DataError, match="not a shapes world"):
        shapes.read_meta(tmp_path)

"""The shapes world's metrics: exact on real scenes read by their ground truth, and each kind of
mistake (a wrong colour, swapped attributes, a missing or an extra object, a wrong place) caught."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dtrain.data.shapes import Seen, caption, scene_rng, split_scene
from dtrain.eval.shapes import class_captions, fd_figures, reference_scenes, score, score_image
from dtrain.data.shapes import parse_caption


def truth(scene) -> list[Seen]:
    return [Seen(t.shape, t.colour, t.cell) for t in scene.things]


def test_real_scenes_read_by_their_truth_score_one_everywhere():
    scenes = [split_scene(scene_rng(0, "train", 0, i), "train", 32) for i in range(300)]
    r = score([caption(s) for s in scenes], [truth(s) for s in scenes])
    assert r["n"] == 300 and r["objects"] == sum(len(s.things) for s in scenes)
    assert r["shape_acc"] == r["colour_acc"] == r["place_acc"] == r["count_acc"] == r["binding_acc"] == 1.0


def test_a_wrong_colour_is_caught_and_only_it():
    scenes = [split_scene(scene_rng(1, "val", 0, i), "val", 32) for i in range(100)]
    seen = [truth(s) for s in scenes]
    first = seen[7][0]
    seen[7][0] = Seen(first.shape, "white" if first.colour != "white" else "red", first.cell)
    r = score([caption(s) for s in scenes], seen)
    objects = sum(len(s.things) for s in scenes)
    assert r["colour_acc"] == pytest.approx((objects - 1) / objects) and r["binding_acc"] == pytest.approx(0.99)
    assert r["shape_acc"] == r["place_acc"] == r["count_acc"] == 1.0


def test_swapped_attributes_missing_extra_and_misplaced_objects():
    asked = parse_caption("a red circle at the top left and a blue square at the bottom right")
    swapped = score_image(asked, [Seen("circle", "blue", 0), Seen("square", "red", 8)])
    assert (swapped["shape"], swapped["colour"], swapped["place"], swapped["count"], swapped["binding"]) == \
        (2, 0, 2, True, False)  # each object is half right: binding is what catches it
    missing = score_image(asked, [Seen("circle", "red", 0)])
    assert (missing["shape"], missing["colour"], missing["count"], missing["binding"]) == (1, 1, False, False)
    extra = score_image(asked, [Seen("circle", "red", 0), Seen("square", "blue", 8), Seen("cross", "red", 4)])
    assert (extra["shape"], extra["colour"], extra["place"], extra["count"], extra["binding"]) == (2, 2, 2, False, False)
    moved = score_image(asked, [Seen("circle", "red", 1), Seen("square", "blue", 8)])
    assert (moved["place"], moved["binding"], moved["count"]) == (1, False, True)
    group = score_image(parse_caption("three green crosses on the left"),
                        [Seen("cross", "green", 0), Seen("cross", "green", 3), Seen("cross", "green", 5)])
    assert (group["place"], group["count"], group["binding"]) == (2, True, False)
    anywhere = score([class_captions([0])[0]], [[Seen("circle", "red", 4)]])  # class 0 asks a red circle anywhere
    assert class_captions([0, 39]) == ["a red circle", "an orange diamond"]
    assert anywhere["binding_acc"] == 1.0 and anywhere["place_acc"] is None
    with pytest.raises(ValueError, match="2 captions for 1 images"):
        score(["a red circle", "a red circle"], [[]])


def test_fd_sits_at_its_floor_for_real_data_and_above_it_for_shifted_data():
    rng = np.random.default_rng(0)
    real = torch.from_numpy(rng.normal(size=(3000, 8))).float()
    fake_ok = torch.from_numpy(rng.normal(size=(1000, 8))).float()
    fig = fd_figures(fake_ok, real[:2000], real[2000:])
    assert fig["fd_ci"][0] <= fig["fd"] < fig["fd_ci"][1]
    few = fd_figures(fake_ok[:250], real[:2000], real[2000:])  # fewer samples: a wider interval
    assert few["fd_ci"][1] - few["fd_ci"][0] > 2 * (fig["fd_ci"][1] - fig["fd_ci"][0])
    assert fig["fd"] < 3 * fig["noise_floor_fd"] + 0.05
    shifted = fd_figures(fake_ok + 1.0, real[:2000], real[2000:])
    assert shifted["fd"] > 7 and shifted["fd_ci"][0] > 10 * fig["noise_floor_fd"]


def test_reference_scenes_are_disjoint_from_each_other_and_from_written_val():
    a, b = reference_scenes(50, 32, offset=0), reference_scenes(50, 32, offset=1)
    written = [split_scene(scene_rng(0, "val", 0, i), "val", 32) for i in range(50)]
    assert not ({caption(s) + str(s.things) for s in a} & {caption(s) + str(s.things) for s in b + written})

"""The shapes world's first user: a class-conditional DiT (configs/shapes.yaml) trained on the real
stack on one-object scenes, then `dtrain eval` reading its samples back with the recogniser."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dtrain.config import load_config
from dtrain.data.shapes import NUM_CLASSES, ShapesSpec, write_shapes

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_class_conditional_model_of_the_world_trains_and_is_evaluated(ray_cluster, tmp_path, shapes_recogniser,
                                                                        monkeypatch):
    from dtrain.cli import main
    from dtrain.train.driver import fit

    write_shapes(tmp_path / "w", ShapesSpec(image_size=32, train_shards=2, per_shard=64, val=64, heldout=0,
                                            max_objects=1))
    cfg = load_config(ROOT / "configs" / "shapes.yaml", [
        f"data.train_shards={tmp_path}/w/train-{{000000..000001}}.tar", f"data.val_shards={tmp_path}/w/val-000000.tar",
        "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=8", "data.batch_size=16",
        "data.shuffle_buffer=32", "train.steps=4", "train.warmup_steps=1", "train.log_every=2", "train.ckpt_every=4",
        f"train.storage_path={tmp_path}/runs", "tracking.wandb=false"])
    ckpt = fit(cfg)
    monkeypatch.setenv("DTRAIN_CACHE", str(shapes_recogniser.path.parent))  # the session's recogniser
    out = CliRunner().invoke(main, ["eval", str(ckpt), "--steps", "1,2", "--samples-per-class", "1", "--in-process",
                                    "--json"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert r["recogniser"] == shapes_recogniser.name
    assert (r["n_samples"], r["n_heldout"]) == (NUM_CLASSES - 5, 5)
    assert r["real"]["binding_acc"] >= 0.99  # the recogniser reads the world's own renders
    assert [row["steps"] for row in r["rows"]] == [1, 2]
    for row in r["rows"]:
        for key in ("shape_acc", "colour_acc", "count_acc", "binding_acc"):
            assert 0.0 <= row[key] <= 1.0 and 0.0 <= row["heldout"][key] <= 1.0
        assert row["place_acc"] is None  # a class asks for no place
        assert row["fd"] > row["noise_floor_fd"] > 0 and row["fd_ci"][0] <= row["fd_ci"][1]  # 4 steps: far off


@pytest.mark.slow
def test_dtrain_score_reads_real_renders_right_and_catches_a_recoloured_object(tmp_path, shapes_recogniser,
                                                                             monkeypatch):
    """Real renders with their own captions score binding 1 and FD at its floor; re-rendering one scene
    with an object's colour changed (caption kept) costs exactly that scene's binding."""
    import dataclasses

    import webdataset as wds

    from dtrain.cli import main
    from dtrain.data.shapes import COLOUR_NAMES, caption, render, scene_rng, split_scene
    from dtrain.data.shards import encode_png

    scenes = [split_scene(scene_rng(3, "heldout", 0, i), "heldout", 32) for i in range(200)]
    wrong = scenes[11].things[0]
    recoloured = dataclasses.replace(scenes[11], things=(dataclasses.replace(
        wrong, colour=COLOUR_NAMES[(COLOUR_NAMES.index(wrong.colour) + 1) % len(COLOUR_NAMES)]),) + scenes[11].things[1:])
    for name, drawn in (("real", scenes), ("wrong", scenes[:11] + [recoloured] + scenes[12:])):
        with wds.TarWriter(str(tmp_path / f"{name}.tar")) as sink:
            for i, (scene, asked) in enumerate(zip(drawn, scenes)):
                sink.write({"__key__": f"{i:05d}", "png": encode_png(render(scene, 32)), "txt": caption(asked).encode()})
    monkeypatch.setenv("DTRAIN_CACHE", str(shapes_recogniser.path.parent))
    real, wrong_r = (json.loads(CliRunner().invoke(main, ["score", str(tmp_path / f"{n}.tar"), "--json"]).output)
                     for n in ("real", "wrong"))
    assert real["n"] == 200 and real["binding_acc"] >= 0.99 and real["colour_acc"] >= 0.995
    assert real["fd"] < 3 * real["noise_floor_fd"]  # held-out scenes against the val distribution: close, not equal
    assert wrong_r["binding_acc"] == pytest.approx(real["binding_acc"] - 1 / 200)
    assert wrong_r["colour_acc"] < real["colour_acc"]
    out = CliRunner().invoke(main, ["score", str(tmp_path / "real.tar")])
    assert "binding" in out.output and "real vs real" in out.output, out.output

"""The shapes world's first user: a text-to-image DiT (configs/shapes.yaml) trained on the real stack
(Ray Train + DeepSpeed) on captioned one-object scenes, then `dtrain eval` reading its samples back with
the recogniser against the prompts they were asked for."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from dtrain.config import load_config
from dtrain.data.shapes import COLOUR_NAMES, ShapesSpec, write_shapes

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_text_model_of_the_world_trains_and_its_samples_follow_prompts(ray_cluster, tmp_path, shapes_recogniser,
                                                                         monkeypatch):
    from dtrain.checkpoint import TOKENIZER_FILE
    from dtrain.cli import main
    from dtrain.train.driver import fit

    write_shapes(tmp_path / "w", ShapesSpec(image_size=32, train_shards=2, per_shard=256, val=64, heldout=32,
                                            max_objects=1))
    cfg = load_config(ROOT / "configs" / "shapes.yaml", [
        f"data.train_shards={tmp_path}/w/train-{{000000..000001}}.tar", f"data.val_shards={tmp_path}/w/val-000000.tar",
        "model.hidden_size=64", "model.depth=2", "model.num_heads=2", "model.patch_size=8", "model.text_depth=1",
        "model.max_tokens=8", "data.batch_size=32", "data.shuffle_buffer=64", "train.steps=300",
        "train.warmup_steps=10", "train.log_every=50", "train.ckpt_every=300", "train.val_every=0",
        "train.ema_decay=0.95", f"train.storage_path={tmp_path}/runs", "tracking.wandb=false"])
    ckpt = fit(cfg)
    assert (Path(ckpt) / TOKENIZER_FILE).is_file()
    monkeypatch.setenv("DTRAIN_CACHE", str(shapes_recogniser.path.parent))  # the session's recogniser
    out = CliRunner().invoke(main, ["eval", str(ckpt), "--steps", "8", "--prompts", "200", "--in-process", "--json"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.output)
    assert r["recogniser"] == shapes_recogniser.name and r["conditioning"] == "text"
    assert (r["n_samples"], r["n_heldout"]) == (200, 50)
    assert r["real"]["binding_acc"] >= 0.99  # the recogniser reads the world's own renders
    (row,) = r["rows"]
    print("E2E", {k: row[k] for k in ("shape_acc", "colour_acc", "binding_acc", "fd", "noise_floor_fd")})
    assert row["steps"] == 8 and row["sampler"] == "euler" and set(row["by_objects"]) == {"1"}
    assert row["colour_acc"] > 1.6 / len(COLOUR_NAMES), row  # the colour asked for, above chance (1/8)
    assert row["place_acc"] is None or 0.0 <= row["place_acc"] <= 1.0
    assert row["fd"] > row["noise_floor_fd"] > 0 and row["fd_ci"][0] <= row["fd"] <= row["fd_ci"][1]


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

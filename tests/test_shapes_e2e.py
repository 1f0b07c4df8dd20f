"""`dtrain score` on the real stack: captioned renders read back by the session's recogniser. A text model of
the world trained through Ray Train + DeepSpeed is tested in test_text_stages.py (its pipeline's first stage)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner


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

"""The shapes recogniser (dtrain.eval.recogniser): the degradation, the analytic parser, the accuracy
measures and the input checks fast; the trained recogniser's accuracy on fresh held-out renders,
clean and degraded, its agreement with the analytic parser and its cache marked slow (it trains once,
about a minute and a half on one thread)."""
from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dtrain.data.shapes import Scene, Seen, Thing, render
from dtrain.eval import recogniser as R
from dtrain.eval.features import FEATURE_NETS, feature_net


def _scene(kind: str) -> Scene:
    """Three objects of known colour and cell on a background of `kind` (32 pixels: cells of 10.67)."""
    things = (Thing("circle", "red", 0, (1.0, 1.5, 9.0, 9.5)),
              Thing("square", "white", 4, (12.0, 12.0, 20.0, 20.0)),
              Thing("triangle", "blue", 8, (22.5, 22.0, 31.5, 31.0)),
              Thing("cross", "orange", 5, (22.0, 11.0, 31.0, 20.0)))
    return Scene(things, {"kind": kind, "level": 60, "contrast": 16, "period": 2, "seed": 3})


# --- fast -------------------------------------------------------------------------------------

def test_degrade_is_deterministic_per_seed_and_changes_the_image():
    _, x = R.scenes_and_images(32, 16, seed=5, stream=R.EVAL_STREAM)
    a, b, c = R.degrade(x, 3), R.degrade(x, 3), R.degrade(x, 4)
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b)  # the same seed: the same images
    assert not torch.equal(a, c)  # another seed: other degradations
    assert (a - x).abs().mean() > 0.01 and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(R.degrade(x, 3, strength=0.0), x, atol=1e-6)  # nothing to degrade
    jpeg = R.degrade(x, 3, jpeg=1.0)
    assert torch.equal(jpeg, R.degrade(x, 3, jpeg=1.0)) and not torch.equal(jpeg, a)
    with pytest.raises(ValueError, match=r"\[N, 3, H, W\]"):
        R.degrade(x[:, :1], 3)


@pytest.mark.parametrize("kind", ["plain", "stripes", "checker", "noise"])
def test_analytic_read_reads_a_hand_built_scene(kind):
    scene = _scene(kind)
    x = R.to_tensor(render(scene, 32)[None])
    want = [[Seen(None, t.colour, t.cell) for t in sorted(scene.things, key=lambda t: t.cell)]]
    assert R.analytic_read(x) == want
    assert R.analytic_read(R.degrade(x, 0)) == want  # blur, noise and a colour shift leave the reading
    assert R.measure(want, [scene]) == {"colour": 1.0, "place": 1.0, "count": 1.0}


def test_measure_and_agreement_count_what_they_say():
    scene = _scene("plain")
    truth = [Seen(t.shape, t.colour, t.cell) for t in sorted(scene.things, key=lambda t: t.cell)]
    assert R.measure([truth], [scene]) == {"shape": 1.0, "colour": 1.0, "place": 1.0, "count": 1.0}
    wrong = [Seen("square", "red", 0), truth[1], Seen(truth[2].shape, "green", truth[2].cell), Seen("circle", "red", 7)]
    got = R.measure([wrong], [scene])  # cell 0 wrong shape, cell 5 wrong colour, cell 8 missed, cell 7 extra
    assert got == {"shape": 0.5, "colour": 0.5, "place": 0.0, "count": 1.0}
    agree = R.agreement([truth], [wrong])  # 5 cells read by either, 3 by both, 2 of them the same colour
    assert agree == {"colour": 2 / 5, "place": 3 / 5, "count": 1.0}


def test_recogniser_refuses_a_wrong_input_shape_and_reads_per_cell():
    torch.manual_seed(0)
    net = R.make_net(32, R.RecogniserSpec()).eval()
    rec = R.Recogniser(net, "untrained", 32, {}, 0.0, Path("none"))
    x = torch.zeros(3, 3, 32, 32)
    assert rec.features(x).shape == (3, 9 * R.RecogniserSpec().embed) and rec.features(x).dtype == torch.float32
    reads = rec.read(x)
    assert len(reads) == 3 and all([o.cell for o in r] == sorted(o.cell for o in r) for r in reads)
    for bad in (torch.zeros(3, 3, 16, 16), torch.zeros(3, 1, 32, 32), torch.zeros(3, 32, 32)):
        for fn in (rec.read, rec.features):
            with pytest.raises(ValueError, match=re.escape("[N, 3, 32, 32]") + ".*" + re.escape(str(list(bad.shape)))):
                fn(bad)
    with pytest.raises(ValueError, match="16 to 64"):
        R.shapes_recogniser(8)
    assert "shapes" in FEATURE_NETS


def test_table_formats_every_row():
    row = {"shape": 0.995, "colour": 1.0, "place": 0.9995, "count": 1.0}
    table = {"recogniser": {"clean": row, "degraded": row},
             "analytic": {k: {c: v for c, v in row.items() if c != "shape"} for k in ("clean", "degraded")},
             "agreement": {k: {"colour": 1.0, "place": 1.0, "count": 1.0} for k in ("clean", "degraded")},
             "n_scenes": 2000, "n_objects": 6000}
    text = R.recogniser_table(table)
    for name in ("recogniser", "analytic", "agreement"):
        assert sum(line.startswith(name) for line in text.splitlines()) == 2
    assert "0.9950" in text and "2000 held-out scenes" in text


def test_the_package_ships_the_recogniser_this_code_trains(tmp_path, monkeypatch):
    """The shipped weights carry the key of the code as it is: a change to what decides the weights
    (the net, the world, the training stream) must ship them again, or every fresh machine trains them."""
    key = R._key(32, R.RecogniserSpec())
    assert (R.BUNDLED / f"recogniser-{key}.safetensors").is_file(), (
        f"no shipped recogniser for key {key}: run `DTRAIN_CACHE=/tmp/r dtrain recogniser --retrain` and copy "
        f"/tmp/r/recogniser-{key}.safetensors into {R.BUNDLED} (removing the old one)")
    assert len(list(R.BUNDLED.glob("recogniser-*.safetensors"))) == 1  # no stale copies in the package
    # an empty cache loads the shipped file and writes nothing; an explicit directory never reads it
    monkeypatch.setenv("DTRAIN_CACHE", str(tmp_path / "cache"))
    def train(*a, **k):
        raise RuntimeError("trained")

    monkeypatch.setattr(R, "train_recogniser", train)
    rec = R.shapes_recogniser(32)
    assert rec.path.parent == R.BUNDLED and not (tmp_path / "cache").exists()
    with pytest.raises(RuntimeError, match="trained"):
        R.shapes_recogniser(32, directory=tmp_path / "mine")


# --- slow: the trained recogniser ---------------------------------------------------------------

@pytest.mark.slow
def test_recogniser_reads_fresh_held_out_renders(shapes_recogniser, monkeypatch):
    rec, directory = shapes_recogniser, shapes_recogniser.path.parent
    print(f"\n{R.recogniser_table(rec)}")
    # fresh scenes (a seed neither the training stream nor the table's uses) with held-out pairs,
    # groups of four and up to nine objects, clean and degraded at a seed training never used
    scenes, x = R.scenes_and_images(32, 2000, seed=12345, stream=R.EVAL_STREAM)
    for kind, images in (("clean", x), ("degraded", R.degrade(x, 424242))):
        ours = rec.read(images)
        acc, agree = R.measure(ours, scenes), R.agreement(ours, R.analytic_read(images))
        print(kind, "recogniser", acc, "agreement with the analytic parser", agree)
        assert min(acc.values()) >= 0.99, (kind, acc)
        assert agree["colour"] >= 0.98 and agree["place"] >= 0.98, (kind, agree)
    for kind in ("clean", "degraded"):  # the table it was saved with
        assert min(rec.table["recogniser"][kind].values()) >= 0.99, rec.table

    feats = rec.features(x[:256])
    assert feats.shape == (256, 144) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    assert (feats.std(0) > 1e-4).all()  # taken before the ReLU: no unit stuck

    # a second call loads the file: training again would fail here
    monkeypatch.setattr(R, "train_recogniser", lambda *a, **k: pytest.fail("retrained despite the cache"))
    start = time.perf_counter()
    again = R.shapes_recogniser(32, directory=directory)
    assert time.perf_counter() - start < 10
    assert again.path == rec.path and again.name == rec.name and again.table == rec.table
    for k, v in rec.net.state_dict().items():
        assert torch.equal(v, again.net.state_dict()[k]), k
    assert again.train_seconds == rec.train_seconds
    # and the feature-net registry finds it through $DTRAIN_CACHE
    monkeypatch.setenv("DTRAIN_CACHE", str(directory))
    net = feature_net("shapes", 32)
    assert net.name == rec.name
    assert np.allclose(net.features(x[:8]).numpy(), feats[:8].numpy())

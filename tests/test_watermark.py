"""The watermark: keys, the keyed noise, ODE inversion, detection on a checkpoint's images, `dtrain detect`."""
from __future__ import annotations

import io
import json
import stat

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from dtrain.cli import main
from dtrain.watermark import WatermarkKey, WatermarkKeyError, decode_for_model, detect, recover_noise

KEY = WatermarkKey(bytes(range(32)))  # fixed: the tests' seeds and key give the same images every run
OTHER = WatermarkKey(bytes(range(32, 64)))  # fixed too: 1% of plain images match a random key by chance


def test_keys_are_owner_only_files_with_a_public_id(tmp_path):
    path = KEY.save(tmp_path / "k" / "watermark.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert WatermarkKey.load(path) == KEY and KEY.secret.hex() not in repr(KEY)
    assert KEY.key_id.startswith("wm-") and KEY.key_id != WatermarkKey.generate().key_id
    with pytest.raises(FileExistsError):
        KEY.save(path)  # never overwrites a key images were marked with
    (tmp_path / "bad").write_text("not hex\n")
    with pytest.raises(WatermarkKeyError, match="bad: not a watermark key"):
        WatermarkKey.load(tmp_path / "bad")
    with pytest.raises(WatermarkKeyError, match="32 bytes, not 3"):
        WatermarkKey(b"abc")


def test_serving_creates_its_default_key_once(tmp_path, monkeypatch):
    from dtrain.watermark import key_for_serving

    monkeypatch.setenv("DTRAIN_WATERMARK_KEY_FILE", str(tmp_path / "cfg" / "watermark.key"))
    first = key_for_serving(None)
    assert key_for_serving(None) == first and (tmp_path / "cfg" / "watermark.key").exists()
    assert key_for_serving(KEY.save(tmp_path / "given.key")) == KEY


def test_the_keyed_noise_keeps_the_seeds_magnitudes_and_takes_the_keys_signs():
    signs = KEY.signs((1, 8, 8))
    assert torch.equal(signs, KEY.signs((1, 8, 8))) and set(signs.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(signs.flatten(), KEY.signs((4, 4, 4)).flatten())  # another shape, other bits
    assert not torch.equal(signs, WatermarkKey.generate().signs((1, 8, 8)))
    g = torch.randn(1000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    z = KEY.shade(g)
    assert torch.equal(z.abs(), g.abs()) and bool((torch.sign(z) == signs).all())
    # over keys each element is still N(0, 1): shaded with many keys, one element's values look Gaussian
    one = torch.stack([WatermarkKey.generate().shade(g[i:i + 1])[0, 0, 0, 0] for i in range(400)])
    assert abs(float(one.mean())) < 0.2 and abs(float(one.std()) - 1) < 0.15


def test_inversion_recovers_the_noise_the_sampler_started_from(tiny_checkpoint):
    from dtrain.checkpoint import load_model
    from dtrain.diffusion import prediction_and_path
    from dtrain.diffusion.parameterization import Denoiser
    from dtrain.diffusion.samplers import guided, initial_noise, invert, sample

    net, cfg = load_model(tiny_checkpoint)
    net.eval()
    prediction, path = prediction_and_path(cfg.objective)
    labels = torch.arange(8) % 10
    den = Denoiser(guided(net, labels, 2.0, cfg.model.num_classes), prediction, path)
    with torch.no_grad():
        noise = initial_noise((1, 8, 8), list(range(8)))
        x = sample("euler", den, noise, 4)
        errors = [float((invert(den, x, 4, refine=r) - noise).abs().max()) for r in (0, 1, 3, 6)]
    # plain DDIM inversion is off by a large part of the noise; each refinement brings it closer
    assert errors[0] > 0.1 and errors == sorted(errors, reverse=True) and errors[-1] < 1e-3, errors


def _render(ckpt, seeds, key):
    from dtrain.checkpoint import load_model, read_meta
    from dtrain.generation import render
    from dtrain.images import to_uint8

    net, cfg = load_model(ckpt)
    labels = torch.tensor(seeds) % cfg.model.num_classes
    return to_uint8(render(net, cfg, read_meta(ckpt), labels, seeds, cfg.sample.steps, cfg.sample.guidance,
                           "fp32", cfg.sample.sampler, key))


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_watermarked_images_are_detected_and_plain_ones_are_not(tiny_checkpoint):
    from dtrain.checkpoint import load_model

    net, cfg = load_model(tiny_checkpoint)
    seeds = list(range(100, 124))
    found = {}
    for name, key in (("marked", KEY), ("plain", None)):
        x = torch.stack([decode_for_model(_png(i), (1, 8, 8)) for i in _render(tiny_checkpoint, seeds, key)])
        found[name] = detect(recover_noise(net, cfg, x), [OTHER, KEY])
    assert all(d["watermarked"] and d["key_id"] == KEY.key_id and d["p_value"] < 1e-4 for d in found["marked"])
    assert not any(d["watermarked"] for d in found["plain"])
    assert np.mean([d["score"] for d in found["plain"]]) < 0.7 < min(d["score"] for d in found["marked"])


def test_detection_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="not a readable image"):
        decode_for_model(b"GIF89a-not-really", (1, 8, 8))
    with pytest.raises(ValueError, match="the image is 16x16, the model makes 8x8 images"):
        decode_for_model(_png(np.zeros((16, 16), np.uint8)), (1, 8, 8))
    rgb = decode_for_model(_png(np.full((8, 8, 3), 255, np.uint8)), (1, 8, 8))  # colour read as grayscale
    assert rgb.shape == (1, 8, 8) and bool((rgb == 1).all())
    with pytest.raises(WatermarkKeyError):
        detect(torch.zeros(1, 1, 1, 8, 8), [])


def test_dtrain_detect_prints_a_line_per_image(tiny_checkpoint, tmp_path):
    key_file = KEY.save(tmp_path / "key")
    (marked,), (plain,) = _render(tiny_checkpoint, [7], KEY), _render(tiny_checkpoint, [7], None)
    (tmp_path / "marked.png").write_bytes(_png(marked))
    (tmp_path / "plain.png").write_bytes(_png(plain))
    (tmp_path / "big.png").write_bytes(_png(np.zeros((9, 9), np.uint8)))
    r = CliRunner().invoke(main, ["detect", str(tmp_path / "marked.png"), str(tmp_path / "plain.png"),
                                  "--checkpoint", str(tiny_checkpoint), "--key-file", str(key_file)])
    assert r.exit_code == 0, r.output
    lines = [json.loads(line) for line in r.output.splitlines()]
    assert [(d["image"].rsplit("/", 1)[1], d["watermarked"]) for d in lines] == [("marked.png", True), ("plain.png", False)]
    r = CliRunner().invoke(main, ["detect", str(tmp_path / "big.png"), "--checkpoint", str(tiny_checkpoint),
                                  "--key-file", str(key_file)])
    assert r.exit_code != 0 and "big.png: the image is 9x9, the model makes 8x8 images" in r.output


def test_the_symmetries_of_the_square_are_undone_and_a_flipped_or_turned_mark_is_found_again(tiny_checkpoint):
    from dtrain.bench.watermark import symmetry
    from dtrain.checkpoint import load_model
    from dtrain.watermark import dihedral, undo_dihedral

    x = torch.arange(2 * 3 * 4 * 4.0).view(2, 3, 4, 4)
    images = {dihedral(x, k).flatten().tolist().__repr__() for k in range(8)}
    assert len(images) == 8 and all(torch.equal(undo_dihedral(dihedral(x, k), k), x) for k in range(8))
    net, cfg = load_model(tiny_checkpoint)
    marked = _render(tiny_checkpoint, list(range(200, 204)), KEY)
    rng = np.random.default_rng(0)
    for k in (4, 1):  # a left-right flip, a quarter turn: the attack the bench names flip and rotate_90deg
        attacked = torch.stack([decode_for_model(_png(symmetry(k)(i, rng)), (1, 8, 8)) for i in marked])
        assert not any(d["watermarked"] for d in detect(recover_noise(net, cfg, attacked), [KEY]))
        found = detect(recover_noise(net, cfg, attacked, sync="dihedral"), [KEY])
        assert all(d["watermarked"] for d in found), found
    # 8x the candidates, 8x the Bonferroni factor: plain images stay at the 1% false-positive bound
    plain = _render(tiny_checkpoint, list(range(300, 316)), None)
    others = torch.stack([decode_for_model(_png(symmetry(4)(i, rng)), (1, 8, 8)) for i in plain])
    flagged = [d["watermarked"] for d in detect(recover_noise(net, cfg, others, sync="dihedral"), [KEY])]
    assert sum(flagged) <= 1, flagged
    with pytest.raises(ValueError, match="unknown sync"):
        recover_noise(net, cfg, attacked, sync="affine")

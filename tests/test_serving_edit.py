"""Editing over HTTP (POST /v1/edit; dtrain.editing does the work): an image in, a signed and watermarked
image out whose C2PA manifest records the edit and names the image sent as its parent ingredient; bad
images (not base64, not a PNG or JPEG, another size or channels, too long, a header declaring a huge
image) a 422 naming the field, never a 5xx; the deny lists on the target and source conditions; the NFE
that quota and admission count. The app runs in this process (the fixture of tests/test_serving_prompts.py:
real ingress, planning, policy, cache, signer and the replica's own model call; only the Serve handles are
in-process stand-ins); the edit on Ray Serve over HTTP is tested beside the prompts' deployment, in
test_serving_prompts.py, so that the suite starts no other."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from dtrain.images import png_bytes
from dtrain.provenance import verify_png
from dtrain.serving.planning import EditSpec, Job, edit_nfe
from tests import test_serving_prompts as prompts
from tests.test_serving_prompts import loaded, pixels

# the prompts' fixtures, made again for this module: a tiny text checkpoint ("words", 8x8 greyscale, the
# default model), renders on one thread, and the app in this process (also "tiny", a class model)
text_checkpoint, one_thread, app_client = prompts.text_checkpoint, prompts.one_thread, prompts.app_client


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def picture(side: int = 8, seed: int = 0, channels: int = 1) -> np.ndarray:
    shape = (side, side) if channels == 1 else (side, side, channels)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def encoded(img: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def declared(side: int) -> bytes:
    """A PNG of a few dozen bytes whose header declares a side x side greyscale image (a decompression bomb)."""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


SOURCE = png_bytes(picture())
BODY = {"image": b64(SOURCE), "source_prompt": "a red circle", "prompt": "a blue circle", "strength": 0.5, "steps": 3}


def edited(m, x: np.ndarray, source: str, target: str, strength: float, steps: int = 3, guidance: float = 2.0,
           **kw):
    """dtrain.editing.edit in this process on uint8 pixels [H, W]: (image [1, 1, H, W], nfe)."""
    from dtrain.editing import edit
    from dtrain.generation import conditions

    src, tgt = conditions(m.cfg, m.tokenizer, [source, target]).chunk(2)
    out = edit(m.net, m.cfg, torch.from_numpy(x).float()[None, None] / 127.5 - 1, src, tgt, strength, steps, guidance,
               **kw)
    return out.image, out.nfe


def test_an_edit_is_a_signed_watermarked_image_whose_manifest_records_the_edit_and_its_source(
        app_client, text_checkpoint, watermark_key):
    r = app_client.post("/v1/edit", json=BODY)
    assert r.status_code == 200 and r.headers["x-cache"] == "miss", r.text
    got = r.json()
    assert (got["model"], got["prompt"], got["source_prompt"], got["class_label"], got["source_class"]) == (
        "words", "a blue circle", "a red circle", None, None)
    assert (got["strength"], got["steps"], got["guidance"], got["scheme"], got["mask"], got["attention_replace"]) == (
        0.5, 3, 2.0, "fixed_point", False, False)
    assert got["watermark_key_id"] == watermark_key.key_id
    # the pixels of dtrain.editing.edit with the deployment's key, and the NFE it counts
    want, nfe = edited(loaded(text_checkpoint), picture(), "a red circle", "a blue circle", 0.5,
                       watermark=watermark_key)
    from dtrain.images import to_uint8

    assert np.abs(pixels(got["image"]).astype(int) - to_uint8(want)[0].astype(int)).max() <= 1
    assert got["nfe"] == nfe == edit_nfe(0.5, 3, 2.0, watermark=True) == 2 * (2 * 4 + 2 + 1)
    # the manifest: valid, opened from its parent (the file sent, by hash), then edited; the edit's parameters
    v = verify_png(base64.b64decode(got["image"]))
    assert v["valid"] and v["actions"] == ["c2pa.opened", "c2pa.edited"], v
    assert v["ingredients"] == [{"title": "source image", "format": "image/png", "relationship": "parentOf",
                                 "description": None, "has_manifest": False}]
    record = v["generation"]
    assert (record["model"], record["prompt"], record["sampler"], record["steps"], record["nfe"],
            record["watermark_key_id"]) == ("words", "a blue circle", "ddim", 3, nfe, watermark_key.key_id)
    assert record["edit"] == {"strength": 0.5, "scheme": "fixed_point", "source_prompt": "a red circle", "mask": False,
                              "attention_replace": False,
                              "source": {"sha256": hashlib.sha256(SOURCE).hexdigest(), "format": "image/png",
                                         "bytes": len(SOURCE)}}
    # the same request: the cache's bytes; another strength, prompt or scheme: computed again
    again = app_client.post("/v1/edit", json=BODY)
    assert again.headers["x-cache"] == "hit" and again.content == r.content
    for change in ({"strength": 0.9}, {"prompt": "two blue squares"}, {"scheme": "euler"}):
        other = app_client.post("/v1/edit", json={**BODY, **change})
        assert other.status_code == 200 and other.headers["x-cache"] == "miss", (change, other.text)
        assert not np.array_equal(pixels(other.json()["image"]), pixels(got["image"])), change


def test_editing_a_served_image_keeps_its_manifest_inside_the_new_one_and_a_class_model_edits_by_class(app_client):
    made = app_client.post("/v1/generate", json={"prompt": "a red circle", "steps": 2}).json()["images"][0]
    r = app_client.post("/v1/edit", json={**BODY, "image": made, "attention_replace": True, "strength": 1.0})
    assert r.status_code == 200, r.text
    v = verify_png(base64.b64decode(r.json()["image"]))
    assert v["valid"] and v["ingredients"][0]["has_manifest"], v  # the served image's own record travels with it
    assert v["generation"]["edit"]["attention_replace"] is True and r.json()["nfe"] == edit_nfe(
        1.0, 3, 2.0, attention_replace=True, watermark=True)
    # a class model: class_label and source_class (default: the null class); a JPEG is read too
    jpeg = encoded(picture(seed=3), "JPEG")
    r = app_client.post("/v1/edit", json={"model": "tiny", "image": b64(jpeg), "class_label": 3, "strength": 0.6,
                                          "steps": 2, "guidance": 1.0, "scheme": "euler"})
    assert r.status_code == 200, r.text
    got = r.json()
    assert (got["class_label"], got["source_class"], got["prompt"], got["nfe"]) == (3, None, None, 1 + 1 + 1)
    v = verify_png(base64.b64decode(got["image"]))
    assert v["ingredients"][0]["format"] == "image/jpeg" and v["generation"]["class_label"] == 3
    assert v["generation"]["edit"]["source_class"] is None and "source_prompt" not in v["generation"]["edit"]
    r = app_client.post("/v1/edit", json={"model": "tiny", "image": b64(jpeg), "class_label": 3, "source_class": 7,
                                          "strength": 0.6, "steps": 2})
    assert r.status_code == 200 and r.json()["source_class"] == 7, r.text


def test_strength_zero_returns_the_input_and_a_mask_keeps_what_is_black(app_client):
    r = app_client.post("/v1/edit", json={**BODY, "strength": 0.0})
    assert r.status_code == 200, r.text
    got = r.json()
    assert np.array_equal(pixels(got["image"]), picture())
    assert (got["nfe"], got["watermark_key_id"]) == (0, None)  # the input, not regenerated: nothing to mark
    v = verify_png(base64.b64decode(got["image"]))
    assert v["valid"] and v["ingredients"][0]["relationship"] == "parentOf" and v["generation"]["nfe"] == 0
    # a local edit: white may change, black is the input's exactly
    keep = np.zeros((8, 8), np.uint8)
    keep[2:6, 2:6] = 255
    r = app_client.post("/v1/edit", json={**BODY, "strength": 1.0, "mask": b64(png_bytes(keep))})
    assert r.status_code == 200 and r.json()["mask"] is True, r.text
    out = pixels(r.json()["image"])
    assert np.array_equal(out[keep == 0], picture()[keep == 0]) and not np.array_equal(out, picture())
    assert verify_png(base64.b64decode(r.json()["image"]))["generation"]["edit"]["mask"] is True


def test_a_source_with_damaged_c2pa_data_is_still_edited_and_signed(app_client):
    """A PNG whose C2PA chunk is not JUMBF: c2pa cannot read it as an ingredient, so its pixels are."""
    damaged = SOURCE[:-12] + chunk(b"caBX", b"\x00\x00\x00\x10jumbnot really" * 2) + SOURCE[-12:]
    r = app_client.post("/v1/edit", json={**BODY, "image": b64(damaged)})
    assert r.status_code == 200, r.text
    v = verify_png(base64.b64decode(r.json()["image"]))
    assert v["valid"] and "re-encoded" in v["ingredients"][0]["description"], v
    assert v["generation"]["edit"]["source"]["sha256"] == hashlib.sha256(damaged).hexdigest()  # the file sent


def bad_images() -> list[tuple[str, str]]:
    """(base64, what the 422's message says) of images /v1/edit refuses on an 8x8 greyscale model."""
    truncated = SOURCE[:40]
    return [("not base64!", "not base64"), ("QUJD\u00e9", "not base64"), (b64(b"hello, world"), "not a readable"),
            (b64(truncated), "not a readable"), (b64(encoded(picture(), "GIF")), "not a readable PNG or JPEG"),
            (b64(encoded(picture(), "BMP")), "not a readable PNG or JPEG"),
            (b64(png_bytes(picture(9))), "the image is 9x9, the model makes 8x8"),
            (b64(declared(9000)), "the image is 9000x9000"),  # refused on the header: never decoded
            (b64(declared(100_000)), "declares too many pixels"),
            (b64(png_bytes(picture(channels=3))), "of mode RGB: the model takes 8-bit greyscale"),
            (b64(encoded(picture(channels=4), "PNG")), "of mode RGBA"),
            (b64(encoded(picture().astype(np.uint16) * 200, "PNG")), "image"),  # 16-bit greyscale
            ("A" * ((1 << 20) + 4), "more than the 1048576")]


def test_bad_images_and_masks_are_a_422_naming_the_field_never_a_server_error(app_client):
    refusals = app_client.replica.metrics.refusals.tags
    seen = len(refusals)
    for field in ("image", "mask"):
        for bad, words in bad_images():
            body = {**BODY, field: bad}
            r = app_client.post("/v1/edit", json=body)
            assert r.status_code == 422, (field, words, r.text)
            (err,) = r.json()["detail"]
            assert err["loc"] == ["body", field] and (words in err["msg"] or words == "image"), (field, words, err)
    assert refusals[seen:] == [{"reason": "invalid"}] * 2 * len(bad_images())
    # the schema's own bound, whatever the deployment allows
    r = app_client.post("/v1/edit", json={**BODY, "image": "A" * ((8 << 20) + 4)})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"], r.text[:300]
    # a colour mask, or a mask of another size
    for mask, words in ((png_bytes(picture(channels=3)), "of mode RGB"), (png_bytes(picture(4)), "4x4")):
        r = app_client.post("/v1/edit", json={**BODY, "mask": b64(mask)})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "mask"], r.text
        assert words in r.json()["detail"][0]["msg"]
    # detection reads the header first too: a declared bomb is a 422, not a server error
    r = app_client.post("/v1/detect", json={"image": b64(declared(100_000))})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "image"], r.text


def test_misfits_are_a_422_naming_the_field(app_client):
    tiny = {"model": "tiny", "image": BODY["image"], "class_label": 3, "strength": 0.5, "steps": 2}
    for body, field in (({**BODY, "class_label": 1}, "class_label"), ({**BODY, "source_class": 1}, "source_class"),
                        ({k: v for k, v in BODY.items() if k != "prompt"}, "prompt"),
                        ({k: v for k, v in BODY.items() if k != "strength"}, "strength"),
                        ({k: v for k, v in BODY.items() if k != "image"}, "image"),
                        ({**BODY, "strength": 1.5}, "strength"), ({**BODY, "strength": -0.1}, "strength"),
                        ({**BODY, "steps": 4}, "steps"), ({**BODY, "steps": 0}, "steps"),
                        ({**BODY, "guidance": 21}, "guidance"), ({**BODY, "scheme": "edict"}, "scheme"),
                        ({**BODY, "seed": 1}, "seed"), ({**BODY, "model": "nope"}, "model"),
                        ({**BODY, "version": "v9"}, "version"), ({**BODY, "prompt": "tab\there"}, "prompt"),
                        ({**BODY, "source_prompt": "\u202e"}, "source_prompt"),
                        ({**tiny, "prompt": "a"}, "prompt"), ({**tiny, "source_prompt": ""}, "source_prompt"),
                        ({**tiny, "class_label": None}, "class_label"), ({**tiny, "class_label": 10}, "class_label"),
                        ({**tiny, "source_class": 10}, "source_class"),
                        ({**tiny, "attention_replace": True}, "attention_replace"),
                        ({**tiny, "image": b64(png_bytes(picture(16)))}, "image")):
        r = app_client.post("/v1/edit", json=body)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], (field, r.text[:300])
    r = app_client.post("/v1/edit", content=b'{"image": "", "prompt": "a", "strength": NaN}',
                        headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "strength"], r.text


def test_a_denied_word_or_class_gets_the_refusal_of_generate_before_any_other_check(app_client):
    plain = app_client.post("/v1/generate", json={"prompt": "a FORBIDDEN red circle"})
    r = app_client.post("/v1/edit", json={**BODY, "prompt": "a FORBIDDEN red circle"})
    assert plain.status_code == r.status_code == 400 and r.json()["detail"] == plain.json()["detail"], r.text
    for body, code, field in (({**BODY, "source_prompt": "my secrets", "image": "not base64"}, "denied_prompt",
                               "source_prompt"),  # before the image is read
                              ({"model": "tiny", "image": "", "class_label": 6, "strength": 0.5}, "denied_class",
                               "class_label"),
                              ({"model": "tiny", "image": "", "class_label": 1, "source_class": 6, "strength": 0.5},
                               "denied_class", "source_class")):
        r = app_client.post("/v1/edit", json=body)
        assert r.status_code == 400 and (r.json()["detail"]["code"], r.json()["detail"]["field"]) == (code, field), r.text


def test_models_say_what_each_version_edits_and_one_that_cannot_gets_a_400(app_client):
    from dtrain.serving.app import edit_support

    listed = {m["model"]: m["versions"][0] for m in app_client.get("/v1/models").json()["models"]}
    assert listed["words"]["edit"] == {"schemes": ["fixed_point", "euler"], "attention_replace": True}
    assert listed["tiny"]["edit"] == {"schemes": ["fixed_point", "euler"], "attention_replace": False}
    from dtrain.config import load_config

    for over, meta, why in ((["model.arch=mlp"], {}, "vectors"), ([], {"latents": {"vae_dir": "x"}}, "VAE"),
                            (["objective.name=ddpm", "objective.prediction=x0"], {}, "x0")):
        assert why in edit_support(load_config(None, over), meta)["unsupported"]
    info = app_client.replica.catalog["tiny"]["ckpt"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(info, "edit", {"unsupported": "a latent model's images need its VAE encoder"})
        r = app_client.post("/v1/edit", json={"model": "tiny", "image": BODY["image"], "class_label": 1,
                                              "strength": 0.5, "steps": 2})
    assert r.status_code == 400 and r.json()["detail"]["code"] == "unsupported", r.text
    assert "tiny/ckpt cannot edit images: a latent" in r.json()["detail"]["message"]


def test_an_edit_counts_what_it_runs_and_is_a_model_call_of_its_own(text_checkpoint, watermark_key):
    from dtrain.serving.sampler import call_groups, render_call

    m = loaded(text_checkpoint)
    x = picture(seed=5)
    for strength, scheme, steps, guidance, replace, marked in ((0.3, "fixed_point", 5, 2.0, False, True),
                                                              (1.0, "euler", 4, 1.0, True, False),
                                                              (0.7, "fixed_point", 3, 1.0, True, True)):
        _, nfe = edited(m, x, "a red circle", "a blue circle", strength, steps, guidance, scheme=scheme,
                        attention_replace=replace, watermark=watermark_key if marked else None)
        assert edit_nfe(strength, steps, guidance, scheme, replace, marked) == nfe, (strength, scheme, replace)
    # quota and admission: the plain images its NFE is worth at the same steps and guidance, at least 1
    spec = EditSpec(x.tobytes(), (1, 8, 8), 0.8, watermark=True)
    job = Job(None, (), "ddim", 16, 2.0, "a blue circle", edit=spec)
    assert (job.images, job.nfe, job.cost) == (1, 2 * (13 * 4 + 13 + 1), 5)  # 132 NFE against a plain 32
    zero = Job(None, (), "ddim", 16, 2.0, "a", edit=EditSpec(x.tobytes(), (1, 8, 8), 0.0))
    assert (zero.nfe, zero.cost) == (0, 1)
    # in a batch: its own call, beside plain ones that share theirs, and the image of dtrain.editing.edit
    small = Job(None, (), "ddim", 2, 2.0, "a blue circle",
                edit=EditSpec(x.tobytes(), (1, 8, 8), 0.5, source_prompt="a red circle"))
    plain = [Job(None, (1,), "ddim", 2, 2.0, prompt="a"), Job(None, (2,), "ddim", 2, 2.0, prompt="b")]
    assert call_groups([plain[0], small, plain[1], small]) == [[0, 2], [1], [3]]
    want, _ = edited(m, x, "a red circle", "a blue circle", 0.5, 2)
    torch.testing.assert_close(render_call(m, [small], watermark_key), want, atol=0, rtol=0)  # watermark: not asked
    # a replica whose net is cast once to bf16 (precision auto on a GPU or AMX) edits through the same call
    import copy
    import dataclasses

    cast = dataclasses.replace(m, net=copy.deepcopy(m.net).to(torch.bfloat16), precision="bf16")
    replaced = dataclasses.replace(small, edit=dataclasses.replace(small.edit, attention_replace=True, watermark=True))
    low = render_call(cast, [replaced], watermark_key)
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert (low - render_call(m, [replaced], watermark_key)).abs().max() < 0.1


def test_fuzzed_edit_bodies_never_get_a_server_error(app_client):
    """Every field of the /v1/edit body fuzzed: images of every size, mode and format and bytes that are
    none, masks likewise, conditions on either model, numbers, NaN, strings where numbers go; and bodies
    that fit a model, mostly served."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = st.builds(lambda seed, fmt: b64(encoded(picture(8, seed), fmt)), st.integers(0, 3),
                     st.sampled_from(["PNG", "JPEG"]))
    images = st.one_of(
        good, st.sampled_from([b for b, _ in bad_images()[:-1]]),
        st.builds(lambda side, ch, fmt: b64(encoded(picture(side, 2, ch), fmt)), st.sampled_from([7, 8, 9]),
                  st.sampled_from([1, 3]), st.sampled_from(["PNG", "JPEG"])),
        st.binary(max_size=40).map(b64), st.text(max_size=8), st.integers(), st.none())
    values = {"mask": images, "prompt": st.sampled_from(["a blue circle", "forbidden", "", 7]),
              "source_prompt": st.sampled_from(["a red circle", "secret", None]),
              "class_label": st.one_of(st.integers(-1, 11), st.none()), "source_class": st.integers(-1, 11),
              "steps": st.integers(-1, 4), "guidance": st.one_of(st.floats(0, 3), st.floats()),
              "scheme": st.sampled_from(["fixed_point", "euler", "x"]), "attention_replace": st.booleans(),
              "model": st.sampled_from(["words", "tiny", "nope"]), "extra": st.integers()}
    strengths = st.one_of(st.floats(0, 1), st.floats(-0.5, 1.5), st.floats(), st.sampled_from([0, 1, "0.5", None]))
    anything = st.fixed_dictionaries({"image": images, "strength": strengths}, optional=values)

    def fitting(model: str):  # bodies that fit the model: served, or refused by the deny lists
        cond = ({"prompt": st.sampled_from(prompts.CAPTIONS + ["forbidden"])} if model == "words"
                else {"class_label": st.integers(0, 9)})
        more = ({"source_prompt": st.sampled_from(prompts.CAPTIONS + [""]), "attention_replace": st.booleans()}
                if model == "words" else {"source_class": st.integers(0, 9)})
        return st.fixed_dictionaries({"model": st.just(model), "image": good, "strength": st.floats(0, 1),
                                      "steps": st.integers(1, 3), **cond},
                                     optional={"mask": good, "scheme": st.sampled_from(["fixed_point", "euler"]),
                                               "guidance": st.floats(0, 3), **more})

    seen = []

    @settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=st.one_of(anything, st.sampled_from(["words", "tiny"]).flatmap(fitting)))
    def check(body):
        r = app_client.post("/v1/edit", content=json.dumps(body, allow_nan=True).encode(),
                            headers={"content-type": "application/json"})
        assert r.status_code in (200, 400, 422), (body, r.status_code, r.text)
        seen.append(r.status_code)

    check()
    assert seen.count(200) >= 5, seen  # the fitting half is mostly served (a real edit each)

"""Serving safely, on the real stack (Ray Serve over HTTP): served images carry the deployment's
watermark and /v1/detect finds it (and not on plain images), each PNG carries a signed C2PA manifest
that a one-byte change breaks, the input policy refuses before any compute, and the response cache
answers a repeated request with the same bytes and misses on any change."""
from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from dtrain.images import png_bytes
from dtrain.provenance import ProvenanceError, verify_png
from tests.conftest import registry
from tests.test_serving import _direct, _pixels

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def safe(serve_url, versions):
    """One sampler replica of "tiny" (versions ckpt and v2) at /safe: class 6 denied for every model,
    a response cache of 32 entries."""
    from ray import serve

    from dtrain.serving.app import deploy
    from dtrain.serving.config import ServeArgs

    deploy(ServeArgs(models=registry(versions, default="ckpt"), num_replicas=1, replica_cpus=0.5, max_images=4,
                     deny_classes={"*": [6], "other": [1]}, cache_entries=32, precision="fp32"), "safe")
    with httpx.Client(base_url=f"{serve_url}/safe", timeout=60) as c:
        yield c
    serve.delete("safe")


def test_a_denied_class_is_refused_with_a_reason_and_no_image(safe):
    r = safe.post("/v1/generate", json={"class_label": 6, "num_images": 4, "steps": 50})
    assert r.status_code == 400, r.text
    assert r.json()["detail"]["code"] == "denied_class" and "images" not in r.text
    assert safe.post("/v1/generate", json={"class_label": 1, "steps": 1}).status_code == 200  # denied for "other" only


def test_the_cache_returns_the_same_bytes_and_misses_on_any_change(safe):
    body = {"class_label": 3, "seed": 11, "num_images": 2, "steps": 3}
    first, again = safe.post("/v1/generate", json=body), safe.post("/v1/generate", json=body)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("miss", "hit")
    assert first.content == again.content
    for change in ({"seed": 12}, {"steps": 4}, {"guidance": 1.5}, {"sampler": "heun"}, {"version": "v2"},
                   {"num_images": 1}, {"class_label": 4}):
        r = safe.post("/v1/generate", json={**body, **change})
        assert r.status_code == 200 and r.headers["x-cache"] == "miss", (change, r.text)
        got, was = _pixels(r.json()["images"][0]), _pixels(first.json()["images"][0])
        if change == {"num_images": 1}:  # a sample depends on its seed alone: the same first image
            assert np.array_equal(got, was)  # (other bytes: each signed manifest is unique)
        else:
            assert not np.array_equal(got, was), change
    # the explicit default version is the same cached answer as the unversioned request
    assert safe.post("/v1/generate", json={**body, "version": "ckpt"}).headers["x-cache"] == "hit"


def test_served_images_carry_the_watermark_and_detect_finds_it(safe, versions, watermark_key):
    answer = safe.post("/v1/generate", json={"class_label": 2, "seed": 40, "num_images": 4}).json()
    assert answer["watermark_key_id"] == watermark_key.key_id
    plain = _direct(versions, "ckpt", {"class_label": 2, "seed": 40, "num_images": 4}, watermark=None)
    for b64, other in zip(answer["images"], plain):
        r = safe.post("/v1/detect", json={"image": b64})
        assert r.status_code == 200, r.text
        found = r.json()
        assert found["watermarked"] and found["key_id"] == watermark_key.key_id and found["p_value"] < 1e-4, found
        assert (found["model"], found["version"]) == ("tiny", "ckpt")
        r = safe.post("/v1/detect", json={"image": base64.b64encode(png_bytes(other)).decode()})
        assert r.status_code == 200 and not r.json()["watermarked"], r.text


def test_served_images_are_signed_with_how_they_were_made_and_a_changed_byte_breaks_it(safe, versions,
                                                                                      watermark_key):
    body = {"class_label": 5, "seed": 70, "num_images": 2, "steps": 3, "version": "v2"}
    answer = safe.post("/v1/generate", json=body).json()
    (v2,) = [v for m in safe.get("/v1/models").json()["models"] for v in m["versions"] if v["version"] == "v2"]
    for seed, b64 in zip((70, 71), answer["images"]):
        png = base64.b64decode(b64)
        found = verify_png(png)
        assert found["valid"] and not found["errors"], found
        assert found["generation"] == {"model": "tiny", "version": "v2", "stage": answer["stage"],
                                       "lineage": {"parent": v2["parent"], "teacher": v2["teacher"]},
                                       "sampler": answer["sampler"],
                                       "steps": 3, "guidance": answer["guidance"], "class_label": 5, "seed": seed,
                                       "watermark_key_id": watermark_key.key_id}
        assert found["trust"] and not found["trusted"]  # test credentials: intact, but nobody vouches for them
        # one byte changed anywhere (pixels, manifest, signature): never valid again
        for at in (len(png) // 4, len(png) // 2, len(png) - 20):
            changed = bytearray(png)
            changed[at] ^= 0x01
            try:
                assert not verify_png(bytes(changed))["valid"], at
            except ProvenanceError:
                pass  # the manifest no longer parses: refused outright


def test_detect_refuses_bad_images_by_name_and_fuzzed_bodies_get_no_server_error(safe):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    for body, field in (({"image": "not base64!"}, "image"), ({"image": base64.b64encode(b"GIF8").decode()}, "image"),
                        ({"image": base64.b64encode(png_bytes(np.zeros((9, 9), np.uint8))).decode()}, "image"),
                        ({"image": "", "version": "v9"}, "version"), ({"image": "", "model": "nope"}, "model"),
                        ({"image": "", "steps": 0}, "steps"), ({}, "image"), ({"image": "", "extra": 1}, "extra")):
        r = safe.post("/v1/detect", json=body)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"][:2] == ["body", field], (body, r.text)
    fields = ["image", "model", "version", "steps"]
    values = st.one_of(st.integers(-2**70, 2**70), st.floats(), st.text(max_size=12), st.none(), st.booleans(),
                       st.sampled_from(["tiny", "ckpt", "v2", base64.b64encode(png_bytes(np.zeros((8, 8), np.uint8))).decode()]))
    bodies = st.dictionaries(st.one_of(st.sampled_from(fields), st.text(max_size=4)), values, max_size=5)

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def check(body):
        r = safe.post("/v1/detect", content=json.dumps(body, allow_nan=True).encode(),
                      headers={"content-type": "application/json"})
        assert r.status_code in (200, 422), (body, r.status_code, r.text)

    check()

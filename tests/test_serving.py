"""Serving: the typed serving config and auth (fast), then the real stack: Ray Serve over HTTP with
mixed concurrent requests checked against direct sampling, auth, fuzzed bodies, a flood answered with
503s, a killed replica replaced under traffic, and the Prometheus metrics."""
from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from dtrain.serving.auth import BearerAuth
from dtrain.serving.config import Autoscaling, ServeArgs
from tests.conftest import registry

TOKEN = "s3cret-token"


def test_serve_args_are_strict_and_consistent(tiny_checkpoint, tmp_path):
    args = ServeArgs(checkpoint=str(tiny_checkpoint))
    assert args.autoscaling.max_replicas >= args.autoscaling.min_replicas and args.num_replicas is None
    with pytest.raises(ValidationError, match="max_batch_size_images|extra"):
        ServeArgs(checkpoint=str(tiny_checkpoint), max_batch_size_images=4)  # a typo is an error, not a default
    with pytest.raises(ValidationError, match="max_images 32 > max_batch_images 16"):
        ServeArgs(checkpoint=str(tiny_checkpoint), max_images=32)
    with pytest.raises(ValidationError, match="min_replicas 3 > max_replicas 2"):
        Autoscaling(min_replicas=3, max_replicas=2)
    with pytest.raises(FileNotFoundError, match="nowhere/ckpt not found"):
        ServeArgs(checkpoint="nowhere/ckpt").resolved()
    with pytest.raises(ValidationError, match="either checkpoint .* or models"):
        ServeArgs()
    with pytest.raises(ValidationError, match="fallback version 'v3' is not one of the versions"):
        ServeArgs(models={"m": {"versions": {"v1": "a"}, "fallback": {"version": "v3", "steps": 1,
                                                                       "when_in_flight_over": 8}}})
    # one checkpoint is a registry of one: the run's name, the checkpoint's name, an absolute path
    one = ServeArgs(checkpoint=str(tiny_checkpoint)).resolved().models
    assert {n: (m.default, m.versions) for n, m in one.items()} == {
        "tiny": ("ckpt", {"ckpt": str(tiny_checkpoint.resolve())})}


def test_bearer_auth_from_file_and_env(tmp_path, monkeypatch):
    assert BearerAuth(None, "DTRAIN_TEST_NO_TOKENS").allows(None)  # no tokens: auth off
    f = tmp_path / "tokens"
    f.write_text("# ops\nalpha\n\n  beta  team-b\n")
    monkeypatch.setenv("DTRAIN_TEST_TOKENS", "gamma=team-g, delta")
    auth = BearerAuth(str(f), "DTRAIN_TEST_TOKENS")
    assert auth.enabled
    assert all(auth.allows(t) for t in ("alpha", "beta", "gamma", "delta"))
    assert not any(auth.allows(t) for t in (None, "", "# ops", "alph", "alpha ", "\ud800", "gamma, delta", "team-b"))
    assert (auth.tenant("beta"), auth.tenant("gamma"), auth.tenant("nope")) == ("team-b", "team-g", None)
    assert len(auth.tenant("alpha")) == 16 and "alpha" not in auth.tenant("alpha")  # unnamed: a digest, never the token
    assert BearerAuth(None, "DTRAIN_TEST_NO_TOKENS").tenant(None) == "anonymous"


def test_every_v1_route_is_behind_the_bearer_dependency_and_healthz_is_open(monkeypatch):
    """The app's routes on a stand-in ingress replica (no cluster): the one security dependency answers
    401 on every /v1 route before it runs, and hands the caller's tenant to the routes that take it."""
    from types import SimpleNamespace

    from fastapi import HTTPException
    from fastapi.testclient import TestClient
    from ray import serve

    from dtrain.serving.app import app
    from dtrain.serving.ingress import IngressReplica

    class Refusals:
        def __init__(self):
            self.reasons = []

        def inc(self, tags):
            self.reasons.append(tags["reason"])

    monkeypatch.setenv("DTRAIN_TEST_TOKENS", f"{TOKEN}=team-a")
    replica = IngressReplica.__new__(IngressReplica)  # only what the routes below reach
    replica.auth, replica.refusals = BearerAuth(None, "DTRAIN_TEST_TOKENS"), Refusals()
    replica.metrics = SimpleNamespace(refusals=replica.refusals)

    async def generate(req, response, tenant):
        raise HTTPException(418, f"{tenant} asked for class {req.class_label}")

    async def probe(method):
        return {"device": "cpu", "precision": "fp32", "probe_ms": 1.0}

    replica.generate, replica.call, replica.catalog = generate, probe, {"tiny": {}}
    monkeypatch.setattr(serve, "get_replica_context", lambda: SimpleNamespace(servable_object=replica))
    client, job = TestClient(app), "0" * 32
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/generate"), ("POST", "/v1/jobs"), ("GET", f"/v1/jobs/{job}"),
                         ("DELETE", f"/v1/jobs/{job}"), ("GET", f"/v1/jobs/{job}/events"), ("POST", "/v1/detect")):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = client.request(method, path, json={"class_label": 1, "image": ""}, headers=headers)
            assert (r.status_code, r.json(), r.headers["www-authenticate"]) == (401, {"detail": "unauthorized"}, "Bearer")
    r = client.post("/v1/generate", json={"class_label": 1}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert (r.status_code, r.json()) == (418, {"detail": "team-a asked for class 1"})  # the route got the tenant
    r = client.post("/v1/generate", json={"class_label": -1}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "class_label"]
    # the caller is authorized before the body is read: an unknown caller learns nothing of it
    assert client.post("/v1/generate", json={"class_label": -1}).status_code == 401
    assert replica.refusals.reasons == ["unauthorized"] * 14 + ["invalid", "unauthorized"]
    assert client.get("/healthz").json() == {"status": "ok", "model": "tiny", "device": "cpu", "precision": "fp32",
                                             "probe_ms": 1.0}
    paths = app.openapi()["paths"]
    assert {(p, m): op.get("security") for p, ops in paths.items() for m, op in ops.items()} == {
        (p, m): None if p == "/healthz" else [{"HTTPBearer": []}] for p, ops in paths.items() for m in ops}


# --- the real stack ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def served(serve_url, versions, tmp_path_factory):
    """Two sampler replicas of the model "tiny" (versions ckpt and v2: ckpt by default, half of the
    unversioned requests to v2 as a canary, v2 at one step as the spike fallback) behind token auth,
    at /srv; a short queue (16), so a flood of a hundred requests overflows it."""
    from ray import serve

    from dtrain.serving.app import deploy

    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(TOKEN + "\n")
    deploy(ServeArgs(models=registry(versions, default="ckpt", canary={"version": "v2", "weight": 0.5},
                                       fallback={"version": "v2", "steps": 1, "when_in_flight_over": 0}),
                      num_replicas=2, replica_cpus=0.5, max_batch_images=8, max_images=4, max_queued_requests=16,
                      retry_after_s=2, auth_tokens_file=str(tokens), precision="fp32"), "srv")  # compared with fp32 renders
    with httpx.Client(base_url=f"{serve_url}/srv", timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c
    serve.delete("srv")


def _pixels(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return np.asarray(img)


def _direct(versions: dict, version: str, body: dict, watermark="serving") -> np.ndarray:
    """uint8 images [N, H, W] (PNG layout) of the request sampled in this process from that version's
    checkpoint, watermarked with the deployments' key (or `watermark`, a key or None)."""
    import torch

    from dtrain.checkpoint import load_model, read_meta
    from dtrain.generation import render
    from dtrain.images import to_uint8
    from dtrain.watermark import key_for_serving

    net, cfg = load_model(versions[version])
    seeds = list(range(body.get("seed", 0), body.get("seed", 0) + body.get("num_images", 1)))
    labels = torch.full((len(seeds),), body["class_label"])
    return to_uint8(render(net, cfg, read_meta(versions[version]), labels, seeds, body.get("steps", 4),
                           body.get("guidance", 2.0), "fp32", body.get("sampler", "euler"),
                           key_for_serving(None) if watermark == "serving" else watermark))


def _assert_same_images(answer: dict, expected: np.ndarray) -> None:
    # the same seed gives the same image in any batch; a matmul blocked differently may move a level
    got = np.stack([_pixels(b64) for b64 in answer["images"]]).astype(int)
    assert got.shape == expected.shape and np.abs(got - expected.astype(int)).max() <= 1


@pytest.mark.slow
def test_mixed_concurrent_requests_match_direct_sampling(served, versions, watermark_key):
    from dtrain.diffusion.samplers import nfe

    bodies = [{"class_label": i % 10, "seed": 100 * i, "num_images": 1 + i % 3, "version": ("ckpt", "v2")[i % 3 == 0],
               "sampler": ("euler", "heun")[i % 2], "steps": 2 + i % 3, "guidance": (1.0, 2.0)[i // 4 % 2]}
              for i in range(12)] + [{"class_label": 7}]  # the last takes the defaults (version: ckpt or canary v2)
    with ThreadPoolExecutor(len(bodies)) as pool:  # all at once: they share batches
        answers = list(pool.map(lambda b: served.post("/v1/generate", json=b), bodies))
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        got = r.json()
        sampler, steps, guidance = (body.get("sampler", "euler"), body.get("steps", 4), body.get("guidance", 2.0))
        assert (got["model"], got["stage"], got["fallback"]) == ("tiny", "pretrain", False)
        assert got["version"] == body.get("version", got["version"]) and got["version"] in versions
        assert (got["sampler"], got["steps"], got["guidance"]) == (sampler, steps, guidance)
        assert got["nfe"] == nfe(sampler, steps, guidance) and got["watermark_key_id"] == watermark_key.key_id
        assert got["seeds"] == list(range(body.get("seed", 0), body.get("seed", 0) + body.get("num_images", 1)))
        _assert_same_images(got, _direct(versions, got["version"], body))


@pytest.mark.slow
def test_versions_canary_and_spike_fallback(served, versions):
    body = {"class_label": 5, "seed": 3}
    by_version = {v: served.post("/v1/generate", json={**body, "version": v}).json() for v in versions}
    assert by_version["ckpt"]["images"] != by_version["v2"]["images"]  # other weights, other images
    for v, answer in by_version.items():
        _assert_same_images(answer, _direct(versions, v, body))
    # unversioned: the default, or the canary for about half (both seen in 24: all alike has p = 2^-23)
    seen = [served.post("/v1/generate", json=body).json()["version"] for _ in range(24)]
    assert set(seen) == {"ckpt", "v2"}, seen
    # allowing the fallback under load (threshold 0: always): v2 at one step, and the answer says so
    fb = served.post("/v1/generate", json={**body, "allow_fallback": True}).json()
    assert (fb["version"], fb["steps"], fb["fallback"]) == ("v2", 1, True)
    for field, bad in (("model", {"model": "nope"}), ("version", {"version": "v9"})):
        r = served.post("/v1/generate", json={**body, **bad})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", field], r.text
    (listed,) = served.get("/v1/models").json()["models"]
    assert (listed["model"], listed["default"], listed["canary"]["version"]) == ("tiny", "ckpt", "v2")
    assert [(v["version"], v["stage"], v["defaults"]["steps"]) for v in listed["versions"]] == [
        ("ckpt", "pretrain", 4), ("v2", "pretrain", 4)]


@pytest.mark.slow
def test_auth_health_models_and_offline_docs(served, serve_url):
    with httpx.Client(base_url=f"{serve_url}/srv", timeout=60) as anon:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            r = anon.post("/v1/generate", json={"class_label": 1}, headers=headers)
            assert r.status_code == 401 and r.json() == {"detail": "unauthorized"}, r.text
            assert r.headers["www-authenticate"] == "Bearer" and TOKEN not in r.text
        health = anon.get("/healthz")  # open to load balancers, and it runs a real one-step sample
        assert health.status_code == 200 and health.json()["probe_ms"] > 0 and health.json()["device"] == "cpu"
        docs = anon.get("/docs")
        assert docs.status_code == 200 and "cdn" not in docs.text
        assert anon.get("/srv/docs-assets/swagger-ui-bundle.js".removeprefix("/srv")).status_code == 200


EDGE_CASES = [b'{"class_label": NaN}', b'{"class_label": 1, "guidance": Infinity}', b'{"class_label": 1e309}',
              b'{"class_label": 1, "guidance": -Infinity}', b'{"class_label": 1, "seed": 1e309}',
              b'{"class_label": "\\ud800"}', b'{"\\ud800": 1, "class_label": 1}', b'{"class_label": 1, "sampler": "\\udfff"}',
              b'{"class_label": 1, "class_label": NaN}', b'{"class_label": 1, "steps": 1, "steps": Infinity}',
              b'{"class_label": 99999999999999999999999999999}', b'[]', b'null', b'"x"', b'{', b'\xff\xfe',
              b'{"class_label": 1, "num_images": 100000}', b'{"class_label": 1, "steps": 0}', b'{}']


@pytest.mark.slow
def test_no_body_gets_a_server_error(served):
    """Edge cases that once gave 500s, then bodies fuzzed over the schema's fields: always a 2xx or 4xx."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    for raw in EDGE_CASES:
        r = served.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (raw, r.status_code, r.text)
        assert r.json()["detail"]  # names what is wrong

    fields = list(served.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]["properties"])
    assert set(fields) == {"model", "version", "allow_fallback", "class_label", "prompt", "negative_prompt", "seed",
                           "num_images", "sampler", "steps", "guidance", "regions",
                           "region_method"}
    values = st.one_of(st.integers(-2**70, 2**70), st.integers(0, 12), st.floats(), st.text(max_size=8), st.none(),
                       st.booleans(), st.lists(st.integers(), max_size=2),
                       st.sampled_from(["euler", "heun", "ddim", "tiny", "ckpt", "v2"]))
    bodies = st.dictionaries(st.one_of(st.sampled_from(fields), st.text(max_size=4)), values, max_size=7)

    @settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies)
    def check(body):
        raw = json.dumps(body, allow_nan=True).encode()  # NaN and Infinity literals, \ud800 escapes
        r = served.post("/v1/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (200, 422), (raw, r.status_code, r.text)

    check()


@pytest.mark.slow
def test_killed_replica_is_replaced_while_traffic_continues(served):
    import ray
    from ray import serve

    statuses, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            statuses.append(served.post("/v1/generate", json={"class_label": 2, "steps": 8, "num_images": 2}).status_code)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        replicas = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["namespace"] == "serve" and "srv#Sampler" in a["name"]]
        assert len(replicas) == 2, replicas
        ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
        time.sleep(3.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(statuses) > 10 and set(statuses) == {200}, statuses  # in-flight work retried on the live replica
    deadline = time.time() + 60
    while time.time() < deadline:
        sampler = serve.status().applications["srv"].deployments["Sampler"]
        if sampler.status == "HEALTHY" and sampler.replica_states.get("RUNNING") == 2:
            break
        time.sleep(1)
    assert sampler.replica_states.get("RUNNING") == 2, sampler


@pytest.mark.slow
def test_metrics_reach_prometheus(served):
    import ray

    served.post("/v1/generate", json={"class_label": 3, "num_images": 2, "steps": 3}).raise_for_status()
    assert served.post("/v1/generate", json={"class_label": 3}, headers={"Authorization": ""}).status_code == 401
    port = ray._private.worker.global_worker.node.metrics_export_port
    deadline, text = time.time() + 60, ""
    names = ("dtrain_serve_images", "dtrain_serve_nfe", "dtrain_serve_batch_images", "dtrain_serve_stage_seconds",
             "dtrain_serve_refusals", "dtrain_serve_queue_depth")
    while time.time() < deadline and not all(n in text for n in names):
        time.sleep(2)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    missing = [n for n in names if n not in text]
    assert not missing, f"not exported: {missing}; " + "\n".join(line for line in text.splitlines() if "dtrain" in line)
    assert 'stage="compute"' in text and 'reason="unauthorized"' in text


@pytest.mark.slow
def test_a_flood_is_shed_with_503_and_nothing_admitted_is_lost(served):
    """Room for 64 requests at the ingress (48 in flight: 2 replicas x 2 batches of 8 images, plus a queue
    of 16), and for 48 at the samplers: 128 at once get only 200 (complete) or 503 with Retry-After. Each asks
    for the most steps allowed, so the first answers take longer than the proxy takes to read the flood
    (at 20 steps a slow proxy let answers free room as fast as requests came, and none was shed)."""
    body = {"class_label": 4, "steps": 100, "num_images": 4}
    flood = 128
    burst = threading.Barrier(flood)  # all sent at once, not as the pool's threads happen to start

    def post(_):
        burst.wait(timeout=30)
        return client.post("/v1/generate", json=body)

    # a connection each (httpx pools 100 by default, which would hold the rest back until answers came)
    with (httpx.Client(base_url=served.base_url, headers=served.headers, timeout=120,
                       limits=httpx.Limits(max_connections=flood)) as client, ThreadPoolExecutor(flood) as pool):
        answers = list(pool.map(post, range(flood)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
    assert all(len(r.json()["images"]) == 4 for r in answers if r.status_code == 200)
    assert all(r.headers.get("retry-after") == "2" for r in answers if r.status_code == 503)


@pytest.mark.slow
def test_a_new_default_version_deploys_under_traffic_without_losing_a_request(served, versions, tmp_path):
    """Redeploy with v2 as the default (no canary) while clients keep sending: every request answered."""
    from dtrain.serving.app import deploy

    statuses, served_by, stop = [], [], threading.Event()

    def traffic():
        while not stop.is_set():
            r = served.post("/v1/generate", json={"class_label": 1, "steps": 2})
            statuses.append(r.status_code)
            served_by.append(r.json().get("version") if r.status_code == 200 else None)

    threads = [threading.Thread(target=traffic) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        tokens = tmp_path / "tokens"
        tokens.write_text(TOKEN)
        deploy(ServeArgs(models=registry(versions, default="v2"), num_replicas=2, replica_cpus=0.5,
                         max_batch_images=8, max_images=4, auth_tokens_file=str(tokens)), "srv")
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(statuses) > 10 and set(statuses) == {200}, statuses
    assert served_by[-1] == "v2" and all(served.post("/v1/generate", json={"class_label": 1, "steps": 2}).json()[
        "version"] == "v2" for _ in range(4))

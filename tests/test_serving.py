"""Serving: the typed serving config and auth (fast), then the real stack: Ray Serve over HTTP with
requests of two tenants sharing a model call (read from the Prometheus metrics), mixed concurrent
requests checked against direct sampling, auth, fuzzed bodies, a flood answered with 503s, a killed
replica replaced under traffic, a new checkpoint rolled in under traffic, and the timeout's 503."""
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
TOKEN_B = "another-s3cret"  # tenant team-b


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
def tokens_file(tmp_path_factory) -> str:
    """Two tenants' tokens: TOKEN's (a tenant named by its digest) and TOKEN_B's, team-b."""
    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(f"{TOKEN}\n{TOKEN_B} team-b\n")
    return str(tokens)


def _srv_args(models: dict, tokens_file: str, **changes) -> ServeArgs:
    """The arguments of the module's deployment "srv" with the registry `models` and `changes`. A redeploy
    replaces every replica, whatever changed: serve.run gives each deployment a new version on every call."""
    return ServeArgs(models=models, num_replicas=2, replica_cpus=0.5, max_batch_images=8, max_images=4,
                     max_queued_requests=16, retry_after_s=2, auth_tokens_file=tokens_file,
                     precision="fp32", **changes)  # compared with fp32 renders


@pytest.fixture(scope="module")
def served(serve_url, versions, tokens_file):
    """Two sampler replicas of the model "tiny" (versions ckpt and v2: ckpt by default, half of the
    unversioned requests to v2 as a canary, v2 at one step as the spike fallback) behind token auth,
    at /srv; a short queue (16), so a flood of a hundred requests overflows it."""
    from ray import serve

    from dtrain.serving.app import deploy

    deploy(_srv_args(registry(versions, default="ckpt", canary={"version": "v2", "weight": 0.5},
                              fallback={"version": "v2", "steps": 1, "when_in_flight_over": 0}), tokens_file), "srv")
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


def _metrics_text() -> str:
    """The Prometheus text of this node's metrics port (Ray's and Serve's metrics, and dtrain's)."""
    import ray

    port = ray._private.worker.global_worker.node.metrics_export_port
    return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text


def _total(text: str, sample: str, **labels: str) -> float:
    """The sum of the samples named `sample` with these labels, over every series (replica, worker)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.mark.slow
def test_concurrent_requests_of_two_tenants_share_one_model_call_and_the_metrics_show_it(served, versions):
    """A long request on each sampler replica (100 Heun steps of 4 images); while they compute, eight clients,
    a connection each and of two tenants in turn, send a one-image request each (the same sampler, steps and
    guidance; other classes and seeds). They wait on their replica behind the long one and are answered
    together: the requests-per-call histogram records a call of two requests or more, and
    each image is the one sampled alone in this process. With batching off (max_batch_images=1, or a call
    per request) every call answers one request and this fails. The batch sizes, and every other metric,
    reach Prometheus. Put first among the deployment's tests, so no earlier traffic of "srv" is still on its
    way to the metrics port when they are read."""
    app = {"application": "srv", "model": "tiny/ckpt"}
    before = _metrics_text()
    long_body = {"version": "ckpt", "class_label": 0, "sampler": "heun", "steps": 100, "num_images": 4}
    bodies = [{"version": "ckpt", "class_label": i, "seed": 40 + i, "steps": 3} for i in range(8)]
    clients = [httpx.Client(base_url=served.base_url, timeout=60,
                            headers={"Authorization": f"Bearer {(TOKEN, TOKEN_B)[i % 2]}"}) for i in range(8)]
    burst = threading.Barrier(len(bodies))

    def post(client, body):
        burst.wait(timeout=30)
        return client.post("/v1/generate", json=body)

    try:
        with ThreadPoolExecutor(len(bodies) + 2) as pool:
            longs = [pool.submit(served.post, "/v1/generate", json=long_body) for _ in range(2)]
            time.sleep(0.1)  # on their replicas (one each: the router picks the one with less in flight)
            answers = list(pool.map(post, clients, bodies))
            assert all(f.result().status_code == 200 for f in longs)
    finally:
        for c in clients:
            c.close()
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        _assert_same_images(r.json(), _direct(versions, "ckpt", body))
    # and a refusal, so every metric has been recorded once
    assert served.post("/v1/generate", json={"class_label": 3}, headers={"Authorization": ""}).status_code == 401

    images = 2 * 4 + len(bodies)
    deadline, text = time.time() + 60, before  # Ray exports every 10 s
    while (_total(text, "ray_dtrain_serve_images_total", **app) - _total(before, "ray_dtrain_serve_images_total", **app)
           < images or 'reason="unauthorized"' not in text) and time.time() < deadline:
        time.sleep(0.5)
        text = _metrics_text()
    # counts are exact; a histogram's _sum is not (Ray's export estimates it from bucket midpoints)
    delta = {name: _total(text, name, **app) - _total(before, name, **app)
             for name in ("ray_dtrain_serve_images_total", "ray_dtrain_serve_batch_images_count",
                          "ray_dtrain_serve_batch_requests_count")}
    calls = delta["ray_dtrain_serve_batch_requests_count"]
    alone = (_total(text, "ray_dtrain_serve_batch_requests_bucket", le="1.0", **app)
             - _total(before, "ray_dtrain_serve_batch_requests_bucket", le="1.0", **app))
    print(f"\n{len(bodies) + 2} requests ({delta['ray_dtrain_serve_images_total']:.0f} images) in {calls:.0f} model "
          f"calls, {calls - alone:.0f} of them shared by two requests or more")
    assert delta["ray_dtrain_serve_images_total"] == images and delta["ray_dtrain_serve_batch_images_count"] == calls
    assert calls - alone >= 1 and calls < len(bodies) + 2, (delta, alone)
    names = ("dtrain_serve_images", "dtrain_serve_nfe", "dtrain_serve_batch_images", "dtrain_serve_batch_requests",
             "dtrain_serve_stage_seconds", "dtrain_serve_refusals", "dtrain_serve_queue_depth")
    missing = [n for n in names if n not in text]
    assert not missing, f"not exported: {missing}; " + "\n".join(line for line in text.splitlines() if "dtrain" in line)
    assert 'stage="compute"' in text and 'reason="unauthorized"' in text


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


class _Traffic:
    """Clients (a thread and a connection each) sending `body` one request after another until the block ends:
    `answers` holds (when it was sent, time.monotonic(), and the response) in the order they came back."""

    def __init__(self, served: httpx.Client, body: dict, clients: int = 3):
        self.served, self.body, self.clients = served, body, clients
        self.answers: list[tuple[float, httpx.Response]] = []
        self.stop = threading.Event()

    def _send(self):
        with httpx.Client(base_url=self.served.base_url, headers=self.served.headers, timeout=60) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                self.answers.append((sent, client.post("/v1/generate", json=self.body)))

    def __enter__(self) -> "_Traffic":
        self.threads = [threading.Thread(target=self._send) for _ in range(self.clients)]
        for t in self.threads:
            t.start()
        while len(self.answers) < self.clients:  # flowing before the block's work starts
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join()


def _sampler_replicas() -> set[str]:
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and "srv#Sampler" in a["name"]}


@pytest.mark.slow
def test_a_new_default_version_from_a_new_checkpoint_rolls_in_under_traffic_without_losing_a_request(
        served, versions, tokens_file, tmp_path):
    """Redeploy while three clients keep sending unversioned requests: v2, served from a run directory that has
    gained a newer checkpoint (as after more training), becomes the default, with no canary. serve.run gives
    every deployment a new version, so Serve replaces every replica, the samplers one at a time. Every request
    is answered 200 with exactly the images of ckpt or of the old v2 (the canary) before, and of the new
    checkpoint once the deploy has returned; no replica of before is left."""
    from dtrain.checkpoint import read_config
    from dtrain.serving.app import deploy
    from tests.conftest import write_tiny_checkpoint

    shards = read_config(versions["v2"]).data.val_shards
    run = tmp_path / "run"
    write_tiny_checkpoint(run / "checkpoint_000001", shards, seed=1)
    new = write_tiny_checkpoint(run / "checkpoint_000002", shards, seed=2)  # the newest: the one deployed
    body = {"class_label": 6, "seed": 11, "steps": 2}
    expected = {"ckpt": _direct(versions, "ckpt", body), "old v2": _direct(versions, "v2", body),
                "new v2": _direct({"v2": new}, "v2", body)}

    def which(answer: dict) -> str:
        got = _pixels(answer["images"][0]).astype(int)
        return next((k for k, px in expected.items() if np.abs(got - px[0].astype(int)).max() <= 1), "neither")

    samplers = _sampler_replicas()
    with _Traffic(served, body) as traffic:
        deploy(_srv_args(registry({**versions, "v2": run}, default="v2"), tokens_file), "srv")
        deployed = time.monotonic()
        time.sleep(1.0)
    statuses = [r.status_code for _, r in traffic.answers]
    assert len(statuses) > 10 and set(statuses) == {200}, statuses
    kinds = [which(r.json()) for _, r in traffic.answers]
    during = [k for (sent, _), k in zip(traffic.answers, kinds) if sent <= deployed]
    after = [k for (sent, _), k in zip(traffic.answers, kinds) if sent > deployed]
    seen = ", ".join(f"{during.count(k)} {k}" for k in expected)
    print(f"\n{len(kinds)} requests, all 200: sent during the roll {len(during)} ({seen}), after it {len(after)}")
    assert "neither" not in kinds and set(kinds[:3]) <= {"ckpt", "old v2"}, kinds  # the first before the deploy
    assert after and set(after) == {"new v2"}, kinds
    assert all(which(a := served.post("/v1/generate", json=body).json()) == "new v2" and a["version"] == "v2"
               for _ in range(4))
    now = _sampler_replicas()
    assert len(now) == 2 and not now & samplers, (samplers, now)


@pytest.mark.slow
def test_a_request_unanswered_after_request_timeout_s_gets_503_with_retry_after(serve_url, versions, tokens_file):
    """A deployment of its own (one sampler replica) whose request_timeout_s is 0.1 s: a request that takes
    longer (100 Heun steps of 4 images, 0.4 s of compute alone in one process on this machine) is answered
    503 with Retry-After, naming the timeout."""
    from ray import serve

    from dtrain.serving.app import deploy

    deploy(ServeArgs(models=registry(versions), num_replicas=1, replica_cpus=0.5, max_images=4, retry_after_s=3,
                     request_timeout_s=0.1, auth_tokens_file=tokens_file, watermark=False, provenance=False), "slow")
    try:
        with httpx.Client(base_url=f"{serve_url}/slow", timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN_B}"}) as client:
            started = time.monotonic()
            r = client.post("/v1/generate", json={"class_label": 1, "sampler": "heun", "steps": 100, "num_images": 4})
            waited = time.monotonic() - started
    finally:
        serve.delete("slow", _blocking=False)  # its last replica drains while the next test runs
    assert r.status_code == 503, r.text
    assert r.headers["retry-after"] == "3" and r.json() == {"detail": "timeout: retry later"}
    print(f"\n503 after {waited:.2f} s")

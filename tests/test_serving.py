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
    assert ServeArgs(checkpoint=str(tiny_checkpoint)).resolved().checkpoint == str(tiny_checkpoint.resolve())


def test_bearer_auth_from_file_and_env(tmp_path, monkeypatch):
    assert BearerAuth(None, "DTRAIN_TEST_NO_TOKENS").allows(None)  # no tokens: auth off
    f = tmp_path / "tokens"
    f.write_text("# ops\nalpha\n\n  beta  \n")
    monkeypatch.setenv("DTRAIN_TEST_TOKENS", "gamma, delta")
    auth = BearerAuth(str(f), "DTRAIN_TEST_TOKENS")
    assert auth.enabled
    assert all(auth.allows(t) for t in ("alpha", "beta", "gamma", "delta"))
    assert not any(auth.allows(t) for t in (None, "", "# ops", "alph", "alpha ", "\ud800", "gamma, delta"))


# --- the real stack ----------------------------------------------------------------------------

def _deploy(name: str, args: ServeArgs) -> None:
    from ray import serve

    from dtrain.serving.app import build_app

    serve.run(build_app(args), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def served(serve_url, tiny_checkpoint, tmp_path_factory):
    """Two sampler replicas of the tiny checkpoint behind token auth, at /srv."""
    from ray import serve

    tokens = tmp_path_factory.mktemp("auth") / "tokens"
    tokens.write_text(TOKEN + "\n")
    _deploy("srv", ServeArgs(checkpoint=str(tiny_checkpoint), num_replicas=2, replica_cpus=0.5, max_batch_images=8,
                             max_images=4, auth_tokens_file=str(tokens)))
    with httpx.Client(base_url=f"{serve_url}/srv", timeout=60, headers={"Authorization": f"Bearer {TOKEN}"}) as c:
        yield c
    serve.delete("srv")


def _pixels(b64: str) -> np.ndarray:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert img.format == "PNG"
    return np.asarray(img)


@pytest.mark.slow
def test_mixed_concurrent_requests_match_direct_sampling(served, tiny_checkpoint):
    import torch

    from dtrain.checkpoint import load_model, read_meta
    from dtrain.generation import nfe, render
    from dtrain.images import to_uint8

    bodies = [{"class_label": i % 10, "seed": 100 * i, "num_images": 1 + i % 3,
               "sampler": ("euler", "heun")[i % 2], "steps": 2 + i % 3, "guidance": (1.0, 2.0)[i // 4 % 2]}
              for i in range(12)] + [{"class_label": 7}]  # the last takes the checkpoint's defaults
    with ThreadPoolExecutor(len(bodies)) as pool:  # all at once: they share batches
        answers = list(pool.map(lambda b: served.post("/v1/generate", json=b), bodies))
    net, cfg = load_model(tiny_checkpoint)
    meta = read_meta(tiny_checkpoint)
    for body, r in zip(bodies, answers):
        assert r.status_code == 200, r.text
        got = r.json()
        sampler, steps, guidance = (body.get("sampler", "euler"), body.get("steps", 4), body.get("guidance", 2.0))
        assert (got["model"], got["version"], got["stage"]) == ("tiny", "ckpt", "pretrain")
        assert (got["sampler"], got["steps"], got["guidance"]) == (sampler, steps, guidance)
        assert got["nfe"] == nfe(steps, guidance, sampler)
        seeds = list(range(body.get("seed", 0), body.get("seed", 0) + body.get("num_images", 1)))
        assert got["seeds"] == seeds
        labels = torch.full((len(seeds),), body["class_label"])
        want = to_uint8(render(net, cfg, meta, labels, seeds, steps, guidance, "fp32", sampler))
        for image, expected in zip(got["images"], want):
            # the same seed gives the same image in any batch; a matmul blocked differently may move a level
            diff = np.abs(_pixels(image).astype(int) - expected.squeeze().astype(int))
            assert diff.max() <= 1, (body, diff.max())


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
    models = served.get("/v1/models").json()["models"]
    assert [(m["model"], m["stage"], m["defaults"]["steps"]) for m in models] == [("tiny", "pretrain", 4)]


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
    assert set(fields) == {"class_label", "seed", "num_images", "sampler", "steps", "guidance"}
    values = st.one_of(st.integers(-2**70, 2**70), st.integers(0, 12), st.floats(), st.text(max_size=8), st.none(),
                       st.booleans(), st.lists(st.integers(), max_size=2), st.sampled_from(["euler", "heun", "ddim"]))
    bodies = st.dictionaries(st.one_of(st.sampled_from(fields), st.text(max_size=4)), values, max_size=7)

    @settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
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
    assert not missing, f"not exported: {missing}; " + "\n".join(l for l in text.splitlines() if "dtrain" in l)
    assert 'stage="compute"' in text and 'reason="unauthorized"' in text


@pytest.mark.slow
def test_a_flood_is_shed_with_503_and_nothing_admitted_is_lost(serve_url, tiny_checkpoint):
    """One replica, room for a few requests: 24 at once get only 200 (complete) or 503 with Retry-After."""
    from ray import serve

    _deploy("tight", ServeArgs(checkpoint=str(tiny_checkpoint), num_replicas=1, replica_cpus=0.5, max_batch_images=2,
                               max_images=2, max_queued_requests=2, retry_after_s=2))
    body = {"class_label": 4, "steps": 20, "num_images": 2}
    with httpx.Client(base_url=f"{serve_url}/tight", timeout=120) as c, ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: c.post("/v1/generate", json=body), range(24)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503} and codes.count(503) > 0 and codes.count(200) > 0, codes
    assert all(len(r.json()["images"]) == 2 for r in answers if r.status_code == 200)
    assert all(r.headers.get("retry-after") == "2" for r in answers if r.status_code == 503)
    serve.delete("tight")

"""Asynchronous jobs on the real stack (Ray Serve over HTTP): submit, follow the server-sent events,
fetch the signed images; cancel a long job mid-run while its batch-mate finishes; results expire;
fuzzed bodies and ids never get a 5xx."""
from __future__ import annotations

import base64
import json
import time
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from dtrain.provenance import verify_png
from tests.conftest import registry
from tests.test_serving import _assert_same_images, _direct

pytestmark = pytest.mark.slow
TTL_S = 8.0


@pytest.fixture(scope="module")
def jobs(serve_url, versions):
    """One sampler replica of "tiny" at /jobs: long jobs allowed, batches wait 0.2 s to fill (so two
    jobs sent together share one), results kept TTL_S."""
    from ray import serve

    from dtrain.serving.app import deploy
    from dtrain.serving.config import ServeArgs

    deploy(ServeArgs(models=registry(versions, default="ckpt"), num_replicas=1, replica_cpus=0.5, max_images=4,
                     max_steps=5000, batch_wait_timeout_s=0.2, job_ttl_s=TTL_S, precision="fp32"), "jobs")
    with httpx.Client(base_url=f"{serve_url}/jobs", timeout=60) as c:
        yield c
    serve.delete("jobs")


def wait_for(client: httpx.Client, job_id: str, until, timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = client.get(f"/v1/jobs/{job_id}").json()
        if until(state):
            return state
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never got there: {state}")


def test_a_job_streams_its_progress_and_gives_signed_images(jobs, versions):
    body = {"class_label": 3, "seed": 5, "num_images": 2, "steps": 300, "guidance": 1.0}
    r = jobs.post("/v1/jobs", json=body)
    assert r.status_code == 202 and r.json()["state"] in ("queued", "running"), r.text
    job_id = r.json()["job_id"]
    events = []
    with jobs.stream("GET", f"/v1/jobs/{job_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append([line[7:]])
            elif line.startswith("data: "):
                events[-1].append(json.loads(line[6:]))
    kinds, steps = [k for k, _ in events], [d["step"] for _, d in events]
    assert kinds[-1] == "done" and set(kinds[:-1]) == {"progress"}, kinds
    assert steps == sorted(steps) and steps[-1] == 300 and len(set(steps)) >= 3, steps  # it moved, step by step
    state = jobs.get(f"/v1/jobs/{job_id}").json()
    assert state["state"] == "done" and state["step"] == 300
    _assert_same_images(state["result"], _direct(versions, "ckpt", body))
    png = base64.b64decode(state["result"]["images"][0])
    assert verify_png(png)["valid"] and verify_png(png)["generation"]["seed"] == 5


def test_a_cancelled_job_stops_within_a_step_while_its_batch_mate_finishes(jobs, versions):
    long_body = {"class_label": 1, "seed": 1, "num_images": 4, "steps": 4000, "guidance": 1.0}
    mate_body = {**long_body, "class_label": 7, "seed": 90, "num_images": 2}
    victim = jobs.post("/v1/jobs", json=long_body).json()["job_id"]
    mate = jobs.post("/v1/jobs", json=mate_body).json()["job_id"]
    running = wait_for(jobs, victim, lambda s: s["step"] >= 100)
    r = jobs.delete(f"/v1/jobs/{victim}")
    assert r.status_code == 200 and r.json()["state"] in ("running", "cancelled"), r.text
    cancelled = wait_for(jobs, victim, lambda s: s["state"] == "cancelled", 30)
    seen, last = cancelled["cancel"]["seen_at_step"], cancelled["cancel"]["last_step"]
    assert running["step"] <= seen and last - seen <= 1 and last < 4000, cancelled  # stopped within one step
    assert cancelled["result"] is None
    # cancelling again, or a finished job, changes nothing: each asked at once, since under load the mate
    # can outlast the victim's TTL_S, and sampling the mate in this process can outlast its own
    assert jobs.delete(f"/v1/jobs/{victim}").json()["state"] == "cancelled"
    done = wait_for(jobs, mate, lambda s: s["state"] != "running" and s["state"] != "queued", 120)
    assert done["state"] == "done" and done["step"] == 4000, done
    assert jobs.delete(f"/v1/jobs/{mate}").json()["state"] == "done"
    _assert_same_images(done["result"], _direct(versions, "ckpt", mate_body))


def test_results_expire_and_unknown_or_malformed_ids_are_refused(jobs):
    job_id = jobs.post("/v1/jobs", json={"class_label": 2, "steps": 2, "guidance": 1.0}).json()["job_id"]
    assert wait_for(jobs, job_id, lambda s: s["state"] == "done")["result"]["images"]
    time.sleep(TTL_S + 1)
    for method in ("GET", "DELETE"):
        r = jobs.request(method, f"/v1/jobs/{job_id}")
        assert r.status_code == 404 and r.json()["detail"]["code"] == "unknown_job", r.text
    assert jobs.get(f"/v1/jobs/{job_id}/events").status_code == 404
    r = jobs.get("/v1/jobs/not-a-job-id")
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["path", "job_id"], r.text


def test_fuzzed_job_bodies_and_ids_get_no_server_error(jobs):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fields = ["class_label", "seed", "num_images", "steps", "guidance", "sampler", "model", "version"]
    values = st.one_of(st.integers(-2**70, 2**70), st.integers(0, 6), st.floats(), st.text(max_size=8), st.none(),
                       st.booleans(), st.sampled_from(["tiny", "ckpt", "v2", "euler", "heun"]))
    bodies = st.dictionaries(st.one_of(st.sampled_from(fields), st.text(max_size=4)), values, max_size=6)
    ids = st.one_of(st.text(max_size=40).map(lambda t: quote(t, safe="")) , st.text("0123456789abcdef", min_size=32, max_size=32))

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies, job_id=ids)
    def check(body, job_id):
        r = jobs.post("/v1/jobs", content=json.dumps(body, allow_nan=True).encode(),
                      headers={"content-type": "application/json"})
        assert r.status_code in (202, 422), (body, r.status_code, r.text)
        if r.status_code == 202:  # a valid body started a job: stop it
            assert jobs.delete(f"/v1/jobs/{r.json()['job_id']}").status_code == 200
        for method, path in (("GET", f"/v1/jobs/{job_id}"), ("DELETE", f"/v1/jobs/{job_id}"),
                             ("GET", f"/v1/jobs/{job_id}/events")):
            r = jobs.request(method, path)
            assert r.status_code < 500, (method, path, r.status_code, r.text)

    check()
    np.testing.assert_equal(jobs.get("/healthz").status_code, 200)


@pytest.fixture(scope="module")
def tiers(serve_url, versions, tmp_path_factory):
    """/tiers: tokens of tenants gold (high tier), bronze (low) and capped (a quota of 12 images a minute);
    one request of 2 images at a time goes to the one sampler replica, the rest wait by tier."""
    from ray import serve

    from dtrain.serving.app import deploy
    from dtrain.serving.config import ServeArgs

    tokens = tmp_path_factory.mktemp("tiers") / "tokens"
    tokens.write_text("gold-token gold\nbronze-token bronze\ncapped-token capped\n")
    deploy(ServeArgs(models=registry(versions, default="ckpt"), num_replicas=1, replica_cpus=0.5, max_images=4,
                     max_steps=5000, auth_tokens_file=str(tokens), admit_images=2, precision="fp32",
                     tenants={"gold": {"tier": "high"}, "bronze": {"tier": "low"},
                              "capped": {"images_per_minute": 12}}), "tiers")
    yield f"{serve_url}/tiers"
    serve.delete("tiers")


def test_a_tenant_over_its_quota_gets_429_and_others_do_not(tiers):
    with httpx.Client(base_url=tiers, timeout=60, headers={"Authorization": "Bearer capped-token"}) as c:
        body = {"class_label": 1, "num_images": 4, "steps": 1}
        assert [c.post("/v1/generate", json=body).status_code for _ in range(3)] == [200, 200, 200]
        r = c.post("/v1/generate", json=body)
        assert r.status_code == 429 and r.json()["detail"]["code"] == "quota", r.text
        assert 1 <= int(r.headers["retry-after"]) <= 60
        assert c.post("/v1/jobs", json=body).status_code == 429  # jobs count too
        r = c.post("/v1/generate", json=body, headers={"Authorization": "Bearer bronze-token"})
        assert r.status_code == 200, r.text  # another tenant, no quota


def test_under_load_the_high_tier_is_served_first(tiers):
    from concurrent.futures import ThreadPoolExecutor

    body = {"class_label": 2, "num_images": 2, "steps": 400, "guidance": 1.0}

    def post(token: str) -> float:
        with httpx.Client(base_url=tiers, timeout=120) as c:
            r = c.post("/v1/generate", json=body, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
        return time.monotonic()

    with ThreadPoolExecutor(8) as pool:
        low = [pool.submit(post, "bronze-token") for _ in range(6)]
        time.sleep(0.3)  # the first low request runs, the other five wait at the gate
        high = pool.submit(post, "gold-token")
        low_done, high_done = sorted(f.result() for f in low), high.result()
    assert sum(t > high_done for t in low_done) >= 4, (low_done, high_done)  # it overtook the waiting ones


def test_the_flow_map_sampler_on_a_velocity_model_is_a_422_naming_the_sampler(jobs):
    for path in ("/v1/generate", "/v1/jobs"):
        r = jobs.post(path, json={"class_label": 1, "sampler": "flow_map", "steps": 1})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "sampler"], r.text

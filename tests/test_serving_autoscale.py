"""Autoscaling on dtrain's own signal (dtrain.serving.autoscaling: images queued and in flight per sampler
replica, Serve's custom policy API): the policy's arithmetic (fast), then on the real stack one deployment
of the tiny model that scales from 1 replica to more under a burst and back down, then to zero and back
(min_replicas 0, initial_replicas 1), with the time from the burst to the new replica running split
into its phases (dtrain.bench.serve.scale_up_split) and the cold start from the first request to its
answer. Delays are short so the file runs in seconds; the figures it prints are on a loaded machine."""
from __future__ import annotations

import threading
import time

import httpx
import pytest
from pydantic import ValidationError

from dtrain.serving.autoscaling import IMAGES, REQUESTS, ImagesPolicy, images_waiting, wanted_replicas
from dtrain.serving.config import Autoscaling, ServeArgs

APP = "autoscale"


def test_images_per_replica_policy_and_its_config():
    assert [wanted_replicas(n, 4) for n in (0, 1, 4, 4.2, 8, 9)] == [0, 1, 1, 2, 2, 3]
    # 8 images in 2 requests on the replicas: 2 more queued requests count as 4 images each
    assert images_waiting({"r1": 6.0, "r2": 2.0}, {"r1": 1.0, "r2": 1.0}, 2) == 16
    assert images_waiting({}, {}, 3) == 3  # nothing on the replicas to measure images per request on

    class Ctx:
        current_num_replicas, target_num_replicas, total_queued_requests = 2, 2, 0.0
        aggregated_metrics = {IMAGES: {"r1": 12.0, "r2": 9.0}, REQUESTS: {"r1": 3.0, "r2": 3.0}}

    assert ImagesPolicy(target_images_per_replica=8)(Ctx())[0] == 3
    Ctx.current_num_replicas = 0  # none reports yet: Serve's own decision (its scale-from-zero path) stands
    assert ImagesPolicy(target_images_per_replica=8)(Ctx())[0] == 2

    config = Autoscaling(min_replicas=0, initial_replicas=1).serve_config(max_batch_images=8)
    assert config["policy"] == {"policy_function": "dtrain.serving.autoscaling:ImagesPolicy",
                                "policy_kwargs": {"target_images_per_replica": 8.0}}
    assert "policy" not in Autoscaling(policy="requests").serve_config()  # Serve's default on ongoing requests
    with pytest.raises(ValidationError, match="initial_replicas 5 is not within"):
        Autoscaling(initial_replicas=5)
    from ray.serve.config import AutoscalingConfig

    serve_config = AutoscalingConfig(**config)  # what Serve makes of it: the policy imported, its kwargs kept
    assert serve_config.policy.get_policy() is ImagesPolicy and serve_config.initial_replicas == 1


# --- the real stack ----------------------------------------------------------------------------

def _sampler_replicas() -> tuple[int, int]:
    """(running, asked for: starting or running) sampler replicas of the app."""
    from ray import serve

    states = serve.status().applications[APP].deployments["Sampler"].replica_states
    return states.get("RUNNING", 0), sum(n for state, n in states.items() if state != "STOPPING")


def _wait_for(check, timeout_s: float, what: str, every_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(every_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


@pytest.fixture(scope="module")
def autoscaled(serve_url, tiny_checkpoint):
    """The tiny model between 0 and 2 sampler replicas of half a CPU, starting with 1 (initial_replicas),
    4 images per batch and per replica; fast delays: up after 0.1 s, down after 1 s, to zero 2 s later.
    Two at most: on 2 cores, replicas that start together share them, and the first is ready later.
    Yields a client and the sampler replicas running right after the deploy."""
    from ray import serve

    from dtrain.serving.app import deploy

    scaling = Autoscaling(min_replicas=0, initial_replicas=1, max_replicas=2, target_images_per_replica=4,
                          upscale_delay_s=0.1, downscale_delay_s=1.0, downscale_to_zero_delay_s=2.0,
                          metrics_interval_s=0.1, look_back_period_s=0.5)
    deploy(ServeArgs(checkpoint=str(tiny_checkpoint), autoscaling=scaling, replica_cpus=0.5, max_batch_images=4,
                     max_images=4, watermark=False, provenance=False, precision="fp32"), APP)
    deployed_with = _sampler_replicas()[0]
    with httpx.Client(base_url=f"{serve_url}/{APP}", timeout=120) as client:
        yield client, deployed_with
    serve.delete(APP, _blocking=False)  # its replicas stop while the next tests run


@pytest.mark.slow
def test_a_burst_scales_the_samplers_up_and_back_down(autoscaled):
    """Three closed-loop clients of 4 images at 100 steps hold about 12 images against 4 per replica: Serve
    asks for the second replica within a second, it runs, and once the burst ends they go back to at most one.
    The time from the burst to that replica running is split into decision, process start, imports, init
    call, model load, warm-up and Serve's own bookkeeping (printed; the decision is bounded)."""
    from dtrain.bench.serve import scale_up_split

    client, _ = autoscaled
    body = {"class_label": 3, "num_images": 4, "steps": 100}
    statuses, stop = [], threading.Event()

    def burst():
        while not stop.is_set():
            statuses.append(client.post("/v1/generate", json=body).status_code)

    burst_at = time.time()
    clients = [threading.Thread(target=burst) for _ in range(3)]
    for t in clients:
        t.start()
    try:
        _wait_for(lambda: _sampler_replicas()[1] >= 2, 20, "the autoscaler asks for a second replica")
        _wait_for(lambda: _sampler_replicas()[0] >= 2, 60, "a second replica runs")
    finally:
        stop.set()
        for t in clients:
            t.join()
    assert statuses and set(statuses) == {200}, statuses
    split = _wait_for(lambda: scale_up_split(APP, burst_at), 10, "the scale-up's phases in the Serve logs", 0.5)
    print(f"\nburst to the first new replica running: {split}")
    assert all(v >= -0.05 for v in split["seconds"].values()), split  # each phase after the one before
    assert split["seconds"]["decision"] < 5, split
    _wait_for(lambda: _sampler_replicas()[0] <= 1, 30, "back down to at most one replica after the burst", 0.2)


@pytest.mark.slow
def test_scale_to_zero_and_a_cold_start_answers(autoscaled):
    """min_replicas 0 with initial_replicas 1: deployed with one replica, none once idle, and the first
    request then starts one and is answered (the cold start: the request's latency, printed, with its split)."""
    from dtrain.bench.serve import scale_up_split

    client, deployed_with = autoscaled
    assert deployed_with == 1  # initial_replicas, above min_replicas 0
    _wait_for(lambda: _sampler_replicas() == (0, 0), 30, "scaled to zero when idle", 0.2)
    sent = time.time()
    r = client.post("/v1/generate", json={"class_label": 5, "num_images": 2, "steps": 4})
    cold_start = time.time() - sent
    assert r.status_code == 200 and len(r.json()["images"]) == 2, r.text
    split = _wait_for(lambda: scale_up_split(APP, sent), 10, "the cold start's phases in the Serve logs", 0.5)
    print(f"\ncold start, first request to its answer: {cold_start:.2f} s; to the replica running: {split}")
    assert split["seconds"]["decision"] < 5, split

"""`dtrain bench serve`: what Ray Serve costs against sampling the same model in-process, and how the
app rides a traffic spike. Loopback only, bounded in time and in clients.

1. The limit: in-process batched sampling (`max_batch_images` per call, the replica's threads).
2. One fixed replica at concurrency 1, 16, 64 (closed-loop clients, one image per request):
   throughput against the limit, p50/p95/p99 latency, status codes, the latency added at 1; with
   every feature (the default), with none (watermark and signing off; cache and jobs are off unless
   asked), each feature alone at 1 client, and the peer (dtrain.bench.peer: a minimal Serve app of
   the same checkpoint, a FastAPI ingress and an `@serve.batch` sampler) in the same run.
3. An autoscaling deployment under a spike: baseline clients, 8x, baseline again, then a 10x
   flood: replicas over time, how long after the spike the most replicas ran, and that every
   answer was a 200, 429 or 503 with no admitted request lost (no dropped connection, no 5xx).
   The time from the spike to the first replica it added running is split into the controller's
   decision, process start, imports, model load, warm-up and Serve's own steps (`scale_up_split`,
   from the Serve logs: the controller's decisions, each sampler replica's logged start phases).
"""
from __future__ import annotations

import asyncio
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import httpx
import numpy as np
import torch

from dtrain.serving.config import Autoscaling, ServeArgs


@dataclass
class Shot:
    """One request: when it was sent (s since the run began), how long it took, what came back."""
    sent: float
    latency: float
    status: int  # 0: no HTTP answer (a dropped connection or a client timeout)
    phase: str


async def _closed_loop(client: httpx.AsyncClient, body: dict, until: float, origin: float, phase: str,
                       shots: list[Shot]) -> None:
    while time.perf_counter() < until:
        sent = time.perf_counter()
        try:
            r = await client.post("/v1/generate", json=body)
            status = r.status_code if r.status_code != 200 or len(r.json()["images"]) == body["num_images"] else 0
        except httpx.HTTPError:
            status = 0
        shots.append(Shot(sent - origin, time.perf_counter() - sent, status, phase))
        if status in (429, 503):
            await asyncio.sleep(0.05)  # a client that honours back-off a little, not a tight retry loop


async def _phases(url: str, body: dict, phases: list[tuple[str, int, float]], origin: float) -> list[Shot]:
    """Run (name, clients, seconds) phases back to back; each keeps `clients` requests in flight."""
    shots: list[Shot] = []
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for name, clients, seconds in phases:
            until = time.perf_counter() + seconds
            await asyncio.gather(*(_closed_loop(client, body, until, origin, name, shots) for _ in range(clients)))
    return shots


def summarize(shots: list[Shot], images_per_request: int = 1) -> dict:
    """Latency percentiles of the 200s, throughput in images/s over the phase, status counts."""
    ok = [s for s in shots if s.status == 200]
    span = max(s.sent + s.latency for s in shots) - min(s.sent for s in shots) if shots else 0.0
    lat = np.array([s.latency for s in ok]) * 1000 if ok else np.array([np.nan])
    codes: dict[str, int] = {}
    for s in shots:
        codes[str(s.status)] = codes.get(str(s.status), 0) + 1
    return {"requests": len(shots), "images_per_s": len(ok) * images_per_request / span if span else 0.0,
            "p50_ms": float(np.percentile(lat, 50)), "p95_ms": float(np.percentile(lat, 95)),
            "p99_ms": float(np.percentile(lat, 99)), "codes": codes}


def in_process_limit(checkpoint: str, steps: int, batch: int, threads: int, seconds: float = 3.0) -> dict:
    """Images/s of `render` on full batches, and the latency of one image, in this process."""
    from dtrain.checkpoint import load_model, read_meta
    from dtrain.generation import render

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        net, cfg = load_model(checkpoint)
        meta = read_meta(checkpoint)
        s = cfg.sample
        labels = torch.arange(batch) % cfg.model.num_classes
        call = lambda n: render(net, cfg, meta, labels[:n], list(range(n)), steps, s.guidance, "fp32", s.sampler)  # noqa: E731
        call(batch)  # warm up
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            call(batch)
            done += batch
        rate = done / (time.perf_counter() - start)
        one = []
        for _ in range(10):
            t = time.perf_counter()
            call(1)
            one.append(time.perf_counter() - t)
        return {"images_per_s": rate, "one_image_ms": 1000 * float(np.median(one))}
    finally:
        torch.set_num_threads(before)


class ReplicaWatch:
    """Polls the sampler's replicas in a thread: `samples` [(seconds since origin, RUNNING)] and
    `requested` [(seconds, replicas the autoscaler asked for: starting or running)]."""

    def __init__(self, app: str, origin: float, every_s: float = 0.25):
        self.app, self.origin, self.every_s = app, origin, every_s
        self.samples: list[tuple[float, int]] = []
        self.requested: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        from ray import serve

        while not self._stop.is_set():
            app = serve.status().applications.get(self.app)
            if app and "Sampler" in app.deployments:
                states, t = app.deployments["Sampler"].replica_states, time.perf_counter() - self.origin
                self.samples.append((t, states.get("RUNNING", 0)))
                self.requested.append((t, sum(n for k, n in states.items() if k != "STOPPING")))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "ReplicaWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def time_to_max(samples: list[tuple[float, int]], spike_at: float, most: int) -> Optional[float]:
    """Seconds from the spike until `most` replicas ran (None if they never did)."""
    return next((t - spike_at for t, n in samples if t >= spike_at and n >= most), None)


_DECISION = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) controller \d+ -- (Up|Down)scaling "
                       r"Deployment\(name='(\w+)', app='([^']*)'\) from (\d+) to (\d+) replicas")
_RUNNING = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) controller \d+ -- Replica\(id='(\w+)', "
                      r"deployment='(\w+)', app='([^']*)'\) started successfully")


def _log_time(stamp: str) -> float:
    """Seconds since the epoch of a Serve log line's time (local, to the millisecond)."""
    from datetime import datetime

    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def serve_logs() -> Path:
    """This process's Ray cluster's Serve logs (a local cluster: the controller's and every replica's)."""
    import ray

    return Path(ray._private.worker.global_worker.node.get_logs_dir_path()) / "serve"


def scaling_events(app: str, deployment: str = "Sampler", logs: Optional[Path] = None) -> dict:
    """From the Serve logs: the controller's scaling decisions [(time, from, to)], the replicas it saw
    running [(time, replica id)], and the sampler replicas' start phases {replica id: Startup times}
    (dtrain.serving.autoscaling.Startup), times in seconds since the epoch."""
    from dtrain.serving.autoscaling import parse_startup

    logs = logs or serve_logs()
    decisions, running, startups = [], [], {}
    for f in sorted(logs.glob("controller_*.log")):
        for line in f.read_text(errors="replace").splitlines():
            if (m := _DECISION.match(line)) and m[3] == deployment and m[4] == app:
                decisions.append((_log_time(m[1]), int(m[5]), int(m[6])))
            elif (m := _RUNNING.match(line)) and m[3] == deployment and m[4] == app:
                running.append((_log_time(m[1]), m[2]))
    for f in sorted(logs.glob(f"replica_{app}_{deployment}_*.log")):
        for line in f.read_text(errors="replace").splitlines():
            if (startup := parse_startup(line)) is not None:
                startups[startup["replica"].rsplit("#", 1)[-1]] = startup
    return {"decisions": sorted(decisions), "running": sorted(running), "startups": startups}


def scale_up_split(app: str, burst_at: float, deployment: str = "Sampler", logs: Optional[Path] = None) -> Optional[dict]:
    """The seconds from a burst (`burst_at`, since the epoch) to the first replica it added running, split:
    - decision: until the controller's first upscaling after the burst;
    - process_start: until the replica's process was created (0 where Ray gave it a worker process it had
      started before);
    - worker_boot: until that process began importing dtrain's serving code (Ray's worker, Serve's
      replica actor and its imports);
    - imports: dtrain.serving.sampler and all it imports (torch, ...);
    - init_call: until Serve's controller, seeing the replica allocated, asked it to initialize;
    - model_load: the replica's __init__ to its default model loaded;
    - warm_up: a one-step sample;
    - serve: until the controller saw it running (Serve's reconfigure, first health check, next loop).
    None until a decision after the burst and a replica started after it are both in the logs."""
    events = scaling_events(app, deployment, logs)
    decided = next((t for t, old, new in events["decisions"] if t >= burst_at and new > old), None)
    if decided is None:
        return None
    started = [(t, rid) for t, rid in events["running"] if t >= decided and rid in events["startups"]]
    if not started:
        return None
    ran, rid = started[0]
    s = events["startups"][rid]
    process = max(s["process"], decided)
    split = {"decision": decided - burst_at, "process_start": process - decided,
             "worker_boot": s["imports_began"] - process, "imports": s["imports_done"] - s["imports_began"],
             "init_call": s["init_began"] - s["imports_done"], "model_load": s["model_loaded"] - s["init_began"],
             "warm_up": s["warmed_up"] - s["model_loaded"], "serve": ran - s["warmed_up"]}
    return {"seconds": {k: round(v, 3) for k, v in split.items()},
            "ready_after_decision_s": round(ran - decided, 3), "ready_after_burst_s": round(ran - burst_at, 3),
            "worker_started_before_decision": s["process"] < decided, "replica": rid}


def _fixed_rows(url: str, name: str, start, body: dict, concurrencies: tuple[int, ...], seconds: float,
                limit: dict, rows: list[dict]) -> dict[int, dict]:
    """`start()` an app at /bench_fixed, drive it at each concurrency (one image per request), delete it;
    its rows appended to `rows` and returned by clients."""
    from ray import serve

    start()
    out: dict[int, dict] = {}
    for c in concurrencies:
        shots = asyncio.run(_phases(f"{url}/bench_fixed", body, [(f"c{c}", c, seconds)], time.perf_counter()))
        s = summarize(shots)
        out[c] = {"phase": f"{name} c={c}", "clients": c, **s, "vs_in_process": s["images_per_s"] / limit["images_per_s"]}
        rows.append(out[c])
    serve.delete("bench_fixed")
    return out


def run(checkpoint: str, url: Optional[str] = None, steps: int = 4, seconds: float = 6.0,
        concurrencies: tuple[int, ...] = (1, 16, 64), baseline: int = 4, max_replicas: int = 4,
        replica_cpus: float = 0.5, max_batch_images: int = 16, batch_wait_timeout_s: float = 0.005,
        plot: Optional[str] = None) -> tuple[list[dict], dict]:
    """The benchmark against Serve at `url` (else one started here on a free loopback port)."""
    from ray import serve

    from dtrain.bench.peer import peer_app
    from dtrain.serving.app import deploy

    if url is None:
        from dtrain.runtime import free_port

        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
    body = {"class_label": 3, "steps": steps, "num_images": 1}
    rows: list[dict] = []
    limit = in_process_limit(checkpoint, steps, max_batch_images, threads=1)
    rows.append({"phase": "in-process", "clients": max_batch_images, **limit})

    # one replica with the in-process threads: what Serve adds, with every feature (the default), with
    # none (watermark, signing, cache and jobs off), and the peer: a minimal Serve app (dtrain.bench.peer)
    one = dict(checkpoint=checkpoint, num_replicas=1, replica_cpus=1, max_batch_images=max_batch_images,
               batch_wait_timeout_s=batch_wait_timeout_s, max_queued_requests=4 * max(concurrencies))
    fixed = _fixed_rows(url, "fixed", lambda: deploy(ServeArgs(**one), "bench_fixed"), body, concurrencies, seconds,
                        limit, rows)
    # the same compute in requests of max_batch_images images: what the per-request cost is
    deploy(ServeArgs(**one), "bench_fixed")
    shots = asyncio.run(_phases(f"{url}/bench_fixed", {**body, "num_images": max_batch_images},
                                [("multi", 4, seconds)], time.perf_counter()))
    s = summarize(shots, images_per_request=max_batch_images)
    rows.append({"phase": f"fixed c=4, {max_batch_images} images/request", "clients": 4, **s,
                 "vs_in_process": s["images_per_s"] / limit["images_per_s"]})
    serve.delete("bench_fixed")
    bare = _fixed_rows(url, "bare", lambda: deploy(ServeArgs(**one, watermark=False, provenance=False), "bench_fixed"),
                       body, concurrencies, seconds, limit, rows)
    # each feature alone, at one client: its own cost per request
    features = {"watermark only": {"provenance": False}, "signing only": {"watermark": False}}
    alone = {name: _fixed_rows(url, name, lambda o=o: deploy(ServeArgs(**one, **o), "bench_fixed"), body,
                               (min(concurrencies),), seconds, limit, rows)[min(concurrencies)]
             for name, o in features.items()}
    peer = _fixed_rows(url, "peer", lambda: serve.run(peer_app(checkpoint, 1, max_batch_images), name="bench_fixed",
                                                      route_prefix="/bench_fixed"),
                       body, concurrencies, seconds, limit, rows)

    # autoscaling through a spike and a flood
    # dtrain's policy on images per replica: the baseline's images fill half a replica, the spike's 4
    scaling = Autoscaling(min_replicas=1, max_replicas=max_replicas, target_images_per_replica=2 * baseline,
                          upscale_delay_s=0.5, downscale_delay_s=30)
    deploy(ServeArgs(checkpoint=checkpoint, autoscaling=scaling, replica_cpus=replica_cpus,
                                    max_batch_images=max_batch_images, batch_wait_timeout_s=batch_wait_timeout_s,
                                    max_queued_requests=64), "bench_auto")
    phases = [("baseline", baseline, seconds), ("spike 8x", 8 * baseline, seconds), ("baseline again", baseline, seconds),
              ("flood 10x", 80 * baseline, seconds / 2)]
    origin, origin_epoch = time.perf_counter(), time.time()
    with ReplicaWatch("bench_auto", origin) as watch:
        shots = asyncio.run(_phases(f"{url}/bench_auto", body, phases, origin))
    serve.delete("bench_auto")
    starts = np.cumsum([0.0] + [p[2] for p in phases])
    for (name, clients, _), start in zip(phases, starts):
        most = max((n for t, n in watch.samples if start <= t < start + seconds), default=0)
        rows.append({"phase": name, "clients": clients, **summarize([s for s in shots if s.phase == name]),
                     "replicas_max": most})
    flood = next(r for r in rows if r["phase"] == "flood 10x")
    reached = time_to_max(watch.samples, float(starts[1]), max_replicas)
    summary = {
        "steps": steps, "checkpoint": checkpoint, "seconds_per_phase": seconds, "max_replicas": max_replicas,
        "throughput_vs_in_process": {f"c{c}": r["vs_in_process"] for c, r in fixed.items()},
        # p50 at the fewest clients against one in-process image: what Serve adds to a lone request
        "added_latency_ms": fixed[min(fixed)]["p50_ms"] - limit["one_image_ms"],
        # dtrain with its optional features off against the peer (targets: >= 0.9 of its images/s at 16
        # clients, <= 1.2x its added latency at 1)
        "bare_vs_peer_images_per_s": {f"c{c}": bare[c]["images_per_s"] / peer[c]["images_per_s"] for c in bare},
        "added_latency_ms_bare_peer": [bare[min(bare)]["p50_ms"] - limit["one_image_ms"],
                                       peer[min(peer)]["p50_ms"] - limit["one_image_ms"]],
        # each feature's own cost: its p50 at one client over the bare app's
        "feature_cost_ms": {**{name: r["p50_ms"] - bare[min(bare)]["p50_ms"] for name, r in alone.items()},
                            "all (default)": fixed[min(fixed)]["p50_ms"] - bare[min(bare)]["p50_ms"]},
        "seconds_to_scale_decision_after_spike": time_to_max(watch.requested, float(starts[1]), max_replicas),
        "seconds_to_max_replicas_after_spike": reached,
        # the first replica the spike added: decision, process start, imports, model load, warm-up, ...
        "scale_up_split": scale_up_split("bench_auto", origin_epoch + float(starts[1])),
        "flood_codes": flood["codes"],
        "flood_only_200_429_503": set(flood["codes"]) <= {"200", "429", "503"},
        "lost_requests": sum(r["codes"].get("0", 0) + sum(v for k, v in r["codes"].items() if k.startswith("5")
                                                          and k != "503") for r in rows if "codes" in r),
    }
    if plot:
        summary["plot"] = str(plot_timeline(shots, watch.samples, phases, plot))
    return rows, summary


def plot_timeline(shots: list[Shot], replicas: list[tuple[float, int]], phases: list[tuple[str, int, float]],
                  path: str | Path, bin_s: float = 0.5) -> Path:
    """Clients, running replicas and p95 latency against time, one panel each."""
    from dtrain.plots import Panel, panels

    edges = np.cumsum([0.0] + [p[2] for p in phases])
    load = [(float(a), float(c)) for (_, c, _), a in zip(phases, edges)] + [(float(edges[-1]), float(phases[-1][1]))]
    p95 = []
    for t in np.arange(0, edges[-1], bin_s):
        done = [s.latency * 1000 for s in shots if s.status == 200 and t <= s.sent + s.latency < t + bin_s]
        if done:
            p95.append((float(t + bin_s / 2), float(np.percentile(done, 95))))
    stack = [Panel("clients (requests in flight)", {"clients": load}, step={"clients"}),
             Panel("sampler replicas running", {"replicas": [(t, float(n)) for t, n in replicas]}, step={"replicas"})]
    if p95:  # none when no request was answered
        stack.append(Panel("p95 latency of answered requests (ms)", {"p95 ms": p95}))
    return panels(path, stack,
                  xlabel="seconds since the load began (baseline, 8x spike, baseline, flood)", size=(720, 600))

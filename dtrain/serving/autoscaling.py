"""Sampler autoscaling on dtrain's own signal: the images queued and in flight per sampler replica.

Ray 2.60 has a custom autoscaling policy API, and this uses it: `AutoscalingConfig.policy` names
`ImagesPolicy` (an `AutoscalingPolicy` by import path, with `policy_kwargs`), which Serve's controller
calls with an `AutoscalingContext` on every control-loop tick (0.1 s). Its signal comes from the
replicas: every sampler replica's `record_autoscaling_stats` (Serve's hook for custom autoscaling
metrics) reports the images it holds, received and not yet answered (waiting for a batch or computing),
and the requests they came in; the replicas push them every `metrics_interval_s` and the controller
averages each over `look_back_period_s` (`AutoscalingContext.aggregated_metrics`). The policy adds
the requests still queued at the ingress's handles (Serve's own `total_queued_requests`, counted as
images at the replicas' images per request) and asks for ceil(images / target_images_per_replica)
replicas. Serve wraps it in the config's delays (`upscale_delay_s`, `downscale_delay_s`,
`downscale_to_zero_delay_s`), scaling factors and min/max bounds, and in its scale-from-zero fast
path: with no replica running, a request waiting at a handle starts one at once.

Images, not requests: one request may ask for 1 or 16 images, and a region request or an edit counts
as the plain images its network evaluations are worth (`Job.cost`, what the ingress's admission gate
counts), so a replica's load is what it must compute. Serve's default policy (ongoing requests per
replica, `target_ongoing_requests`) stays available as `policy: requests`.

This module is small and imports only the standard library at the top: Serve pickles it by value
into its controller, and the sampler imports it first, so `IMPORTS_BEGAN` clocks when a replica
process began importing dtrain's serving code (`Startup`: the phases of a replica's start, logged
once it is ready, which `dtrain bench serve` reads back to split the time from a burst to a new
replica)."""
from __future__ import annotations

import json
import math
import os
import time
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from ray.serve.config import AutoscalingContext

IMPORTS_BEGAN = time.time()  # this process's first import of dtrain's serving code (the sampler's first)

IMAGES = "dtrain_images"  # custom metric: images a sampler replica holds (queued or computing)
REQUESTS = "dtrain_requests"  # custom metric: the requests those images came in
POLICY = f"{__name__}:ImagesPolicy"
STARTUP_LOG = "dtrain sampler startup "  # the replica's log line of its Startup, then JSON


def wanted_replicas(images: float, target_images_per_replica: float) -> int:
    """Replicas that hold `images` at `target_images_per_replica` each (0 for no work)."""
    return math.ceil(images / target_images_per_replica - 1e-9) if images > 0 else 0


def images_waiting(held: dict[Any, float], requests: dict[Any, float], queued_requests: float) -> float:
    """Images the deployment holds: on its replicas (per replica, averaged over the look-back window),
    plus the requests queued at handles, counted at the replicas' images per request (1 when the
    replicas hold nothing to measure it on)."""
    on_replicas, in_requests = sum(held.values()), sum(requests.values())
    per_request = on_replicas / in_requests if in_requests > 0 else 1.0
    return on_replicas + max(0.0, queued_requests) * max(1.0, per_request)


class ImagesPolicy:
    """Serve's controller instantiates this once per deployment (`policy_kwargs`) and calls it every
    tick: the replicas that hold the images waiting at `target_images_per_replica` each. Serve applies
    the delays, factors and bounds of the deployment's AutoscalingConfig around it."""

    def __init__(self, target_images_per_replica: float):
        self.target = float(target_images_per_replica)

    def __call__(self, ctx: "AutoscalingContext") -> tuple[int, dict]:
        if ctx.current_num_replicas == 0:  # nothing reports yet: keep what Serve decided (its cold-start path)
            return ctx.target_num_replicas, {}
        metrics = ctx.aggregated_metrics or {}
        images = images_waiting(metrics.get(IMAGES, {}), metrics.get(REQUESTS, {}), ctx.total_queued_requests or 0.0)
        return wanted_replicas(images, self.target), {"images": images}


def serve_policy(target_images_per_replica: float) -> dict:
    """The `policy` of a Serve AutoscalingConfig that scales on images per replica."""
    return {"policy_function": POLICY, "policy_kwargs": {"target_images_per_replica": target_images_per_replica}}


class Startup:
    """When a sampler replica's start phases ended, in seconds since the epoch: the process was created,
    its imports of dtrain's serving code began (`IMPORTS_BEGAN`) and ended (`imported`: the sampler
    module's last line), the replica's __init__ began, its default model was loaded and warmed up.
    Logged as one line once the replica is ready."""

    def __init__(self, imported: float):
        self.times = {"process": process_started(), "imports_began": IMPORTS_BEGAN, "imports_done": imported,
                      "init_began": time.time()}

    def mark(self, phase: str) -> None:
        self.times[phase] = time.time()

    def log_line(self, replica: str) -> str:
        return STARTUP_LOG + json.dumps({"replica": replica, **self.times})


def process_started() -> float:
    """When this process was created, in seconds since the epoch: to a clock tick on Linux (its start in
    ticks since boot against the boot clock now; psutil's boot time is whole seconds), else psutil's."""
    try:
        with open("/proc/self/stat") as f:
            ticks = float(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, AttributeError, IndexError, ValueError):
        import psutil

        return psutil.Process(os.getpid()).create_time()


def parse_startup(line: str) -> Optional[dict]:
    """A replica's Startup from a line of its log (None if the line holds none)."""
    at = line.find(STARTUP_LOG)
    if at < 0:
        return None
    try:
        return json.loads(line[at + len(STARTUP_LOG):].strip())
    except ValueError:
        return None

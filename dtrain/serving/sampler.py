"""The sampler deployment: one checkpoint's network on a replica's device, fed by dynamic batches
counted in images. Requests in one batch that differ in sampler, steps or guidance run as separate
model calls and are scattered back in order; a sample depends on its seed alone, never on its batch."""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from ray import serve

from dtrain.checkpoint import load_model, read_meta
from dtrain.generation import image_shape, nfe, render
from dtrain.images import to_uint8
from dtrain.precision import choose
from dtrain.runtime import pin_threads
from dtrain.serving.metrics import SamplerMetrics

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Job:
    """One request as the sampler sees it."""
    class_label: int
    seeds: tuple[int, ...]
    sampler: str
    steps: int
    guidance: float

    @property
    def key(self) -> tuple[str, int, float]:
        return self.sampler, self.steps, self.guidance


def images_in(jobs: list[Job]) -> int:
    return sum(len(j.seeds) for j in jobs)


@serve.deployment(graceful_shutdown_timeout_s=60, health_check_period_s=10, health_check_timeout_s=60)
class Sampler:
    def __init__(self, checkpoint: str, model: str):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        threads = pin_threads()  # the replica's num_cpus, not every core of the node
        self.net, self.cfg = load_model(checkpoint)
        self.meta = read_meta(checkpoint)
        choice = choose("auto", self.device)
        self.precision = choice.precision
        # cast and moved once here, so render() never makes a copy per batch
        self.net.to(device=self.device, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(choice.precision,
                                                                                                   torch.float32))
        self.metrics = SamplerMetrics(model)
        self.waiting = 0
        self.probe()  # a replica that cannot sample (a missing VAE, a bad device) fails at start, not per request
        logger.info(f"sampler: {checkpoint} on {self.device}, images {image_shape(self.cfg, self.meta)}, "
                    f"precision {choice.precision} ({choice.reason}), {threads} thread(s)")

    def reconfigure(self, user_config: dict) -> None:
        """Live settings (no restart): images per batch and the wait to fill one."""
        self.run_batch.set_max_batch_size(user_config["max_batch_images"])
        self.run_batch.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    def probe(self) -> dict:
        """A real one-step, one-image sample: the health check of the replica and of `/healthz`."""
        start = time.perf_counter()
        x = render(self.net, self.cfg, self.meta, torch.zeros(1, dtype=torch.long), [0], 1, 1.0, self.precision)
        if not torch.isfinite(x).all():
            raise RuntimeError("the one-step probe sample is not finite")
        return {"device": self.device, "precision": self.precision, "probe_ms": 1000 * (time.perf_counter() - start)}

    def check_health(self) -> None:
        self.probe()  # raising marks the replica unhealthy and Serve replaces it

    async def __call__(self, job: Job) -> np.ndarray:
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        return await self.run_batch(job, time.perf_counter())

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01, batch_size_fn=images_in)  # sized by the jobs
    async def run_batch(self, jobs: list[Job], queued_at: list[float]) -> list[np.ndarray]:
        started = time.perf_counter()
        self.waiting -= len(jobs)
        self.metrics.queue_depth.set(self.waiting)
        for t in queued_at:
            self.metrics.stage_seconds.observe(started - t, tags={"stage": "queue"})
        out: list[Optional[np.ndarray]] = [None] * len(jobs)
        groups: dict[tuple[str, int, float], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(i)
        for (sampler, steps, guidance), idx in groups.items():
            labels = torch.cat([torch.full((len(jobs[i].seeds),), jobs[i].class_label) for i in idx])
            seeds = [s for i in idx for s in jobs[i].seeds]
            images = to_uint8(render(self.net, self.cfg, self.meta, labels, seeds, steps, guidance, self.precision,
                                     sampler))
            self.metrics.batch_images.observe(len(seeds))
            self.metrics.images.inc(len(seeds))
            self.metrics.nfe.inc(len(seeds) * nfe(steps, guidance, sampler))
            start = 0
            for i in idx:
                n = len(jobs[i].seeds)
                out[i], start = images[start: start + n], start + n
        self.metrics.stage_seconds.observe(time.perf_counter() - started, tags={"stage": "compute"})
        return out  # type: ignore[return-value]


def replica_gpus(requested: Optional[float]) -> float:
    """GPUs per sampler replica: as asked, else one where the cluster has any."""
    if requested is not None:
        return requested
    import ray

    return 1.0 if math.floor(ray.cluster_resources().get("GPU", 0)) > 0 else 0.0

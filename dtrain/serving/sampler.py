"""The sampler deployment: one checkpoint's network on a replica's device, fed by dynamic batches
counted in images. Requests in one batch that differ in sampler, steps or guidance run as separate
model calls and are scattered back in order; requests that differ in class or prompt share a call
(the condition is per row); a sample depends on its seed alone, never on its batch.

A request with regions (dtrain.regions) runs as a model call of its own: its net is a RegionNet over
its boxes (multidiffusion evaluates it once per region in one batch of R times its images), which no
other request shares. Its images still count towards the batch they came in, and the batch's calls
run one after the other, so a region request adds its own call's latency to the plain requests it was
batched with, and does not gain from batching itself. An edit (POST /v1/edit: dtrain.editing.edit on the
image it carries) is a model call of its own in the same way, one image."""
from __future__ import annotations

from dtrain.serving.autoscaling import IMAGES, REQUESTS, Startup  # first: it clocks the imports below (stdlib only)
import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from ray import serve

from dtrain.checkpoint import load_model, read_meta, read_tokenizer
from dtrain.editing import edit
from dtrain.generation import conditions, image_shape, render
from dtrain.images import to_uint8
from dtrain.models import null_condition
from dtrain.precision import DTYPES, choose, in_precision
from dtrain.regions import render_regions
from dtrain.runtime import pin_threads
from dtrain.serving.jobs import Cancelled, LiveRows, watch_while
from dtrain.serving.metrics import SamplerMetrics
from dtrain.serving.planning import Job  # one request as the sampler sees it
from dtrain.serving.store import StoreSpec
from dtrain.watermark import WatermarkKey, recover_noise
from dtrain.watermark import detect as detect_watermark

logger = logging.getLogger("ray.serve")
MODELS_PER_REPLICA = 4  # versions a replica keeps loaded (least recently used is dropped)


def images_in(jobs: list[Job]) -> int:
    return sum(j.images for j in jobs)


@dataclass
class Loaded:
    """A checkpoint's network on this replica's device, cast once to the precision it runs in, and a
    text model's tokenizer (JSON; None for a class model, or a text model with a frozen encoder)."""
    net: torch.nn.Module
    cfg: object
    meta: dict
    precision: str
    tokenizer: Optional[str] = None


def condition(m: Loaded, jobs: list[Job]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The condition of one model call, a row per image of `jobs` in order: class labels [B], or a text
    model's prompt ids [B, L] and its negative prompts' ids [B, L] (None where no job has one; the
    empty prompt, the null condition, for the jobs without one where another has)."""
    per_image = lambda f: [f(j) for j in jobs for _ in j.seeds]  # noqa: E731
    if m.cfg.model.conditioning != "text":
        return torch.tensor(per_image(lambda j: j.class_label), dtype=torch.long), None
    cond = conditions(m.cfg, m.tokenizer, per_image(lambda j: j.prompt))
    if all(j.negative_prompt is None for j in jobs):
        return cond, None
    return cond, conditions(m.cfg, m.tokenizer, per_image(lambda j: j.negative_prompt or ""))


def call_groups(jobs: list[Job]) -> list[list[int]]:
    """The model calls of a batch, each the indices of its jobs in order: the plain jobs with the same
    sampler, steps and guidance share one; a region job or an edit has one of its own."""
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        plain = job.regions is None and job.edit is None
        groups.setdefault(job.key if plain else ("own", i), []).append(i)
    return list(groups.values())


def render_call(m: Loaded, jobs: list[Job], watermark: Optional[WatermarkKey] = None,
                live: Optional[LiveRows] = None) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] of one model call (`call_groups`): the plain jobs' images, a
    condition row each, or one region job's, or one edit's."""
    sampler, steps, guidance = jobs[0].key
    if jobs[0].edit is not None:
        (job,) = jobs
        return render_edit(m, job, watermark)
    seeds = [s for j in jobs for s in j.seeds]
    if jobs[0].regions is not None:
        (job,) = jobs
        return render_regions(m.net, m.cfg, m.meta, job.regions, seeds, steps, guidance, m.precision, sampler,
                              job.region_method, tokenizer=m.tokenizer, negative=job.negative_prompt or None,
                              watermark=watermark, live=live)
    cond, negative = condition(m, jobs)
    return render(m.net, m.cfg, m.meta, cond, seeds, steps, guidance, m.precision, sampler, watermark, live, negative)


def render_edit(m: Loaded, job: Job, watermark: Optional[WatermarkKey] = None) -> torch.Tensor:
    """The edited image [1, C, H, W] in [-1, 1] of an edit job: dtrain.editing.edit from its source
    condition to its target, watermarked with `watermark` when the job asks for it."""
    e = job.edit
    c, h, w = e.shape
    x = torch.frombuffer(bytearray(e.image), dtype=torch.uint8).reshape(1, c, h, w).float() / 127.5 - 1
    mask = None if e.mask is None else torch.frombuffer(bytearray(e.mask), dtype=torch.uint8).reshape(h, w).float() / 255
    if m.cfg.model.conditioning == "text":
        source, target = conditions(m.cfg, m.tokenizer, [e.source_prompt or "", job.prompt]).chunk(2)
    else:
        source = torch.tensor([null_condition(m.cfg.model) if e.source_class is None else e.source_class])
        target = torch.tensor([job.class_label])
    dtype = DTYPES[m.precision]
    net = m.net if dtype == torch.float32 else _Cast(m.net, dtype)
    return edit(net, m.cfg, x, source, target, e.strength, job.steps, job.guidance, e.scheme, mask=mask,
                attention_replace=e.attention_replace, watermark=watermark if e.watermark else None).image


class _Cast(torch.nn.Module):
    """A net cast to `dtype` once (the replica's) as editing.edit calls it: float32 in, float32 out."""

    def __init__(self, net: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.net, self.run = net, in_precision(net, dtype)

    def forward(self, x, t, cond, s=None):
        return self.run(x, t, cond, s)


class SamplerReplica:
    """Every version of the registry behind one deployment: Serve's model multiplexing routes a
    request to a replica that already holds its version, and a replica keeps the last
    MODELS_PER_REPLICA versions it used."""

    def __init__(self, checkpoints: dict[str, str], default_model: str, precision: str = "auto",
                 watermark: Optional[WatermarkKey] = None, store: Optional[StoreSpec] = None):
        self.startup = Startup(IMPORTED)  # when this process started, imported, began this (autoscaling's timeline)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.precision, self.watermark = precision, watermark
        context = serve.get_replica_context()  # jobs' progress and cancellations go through the app's state store
        self.replica, self.store = context.replica_id.to_full_id_str(), store and store.open(context.app_name)
        self.threads = pin_threads()  # the replica's num_cpus, not every core of the node
        self.checkpoints, self.default_model = checkpoints, default_model
        self.metrics = SamplerMetrics(default_model)
        self.waiting = 0
        self.held = {IMAGES: 0, REQUESTS: 0}  # received, not yet answered: the autoscaling signal
        # the default version loaded and warmed up before the replica counts as ready (its first requests
        # would wait for both); model() takes it from here
        self.warm = {default_model: self.load(default_model)}
        self.startup.mark("model_loaded")
        self.one_step_sample(self.warm[default_model])  # the warm-up: the first call's one-time costs paid here
        self.startup.mark("warmed_up")
        logger.info(self.startup.log_line(self.replica))

    @staticmethod
    def one_step_sample(m: Loaded) -> torch.Tensor:
        """A one-step, one-image sample of `m`: the warm-up at start (kernel selection, allocator; nothing
        is compiled, so nothing is compiled twice) and the health probe."""
        text = m.cfg.model.conditioning == "text"
        cond = conditions(m.cfg, m.tokenizer, [""]) if text else torch.zeros(1, dtype=torch.long)
        return render(m.net, m.cfg, m.meta, cond, [0], 1, 1.0, m.precision)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom autoscaling metrics (dtrain.serving.autoscaling.ImagesPolicy): the images
        this replica holds, waiting for a batch or computing, and the requests they came in."""
        return dict(self.held)

    async def check_health(self) -> None:
        await self.probe()  # raising marks the replica unhealthy and Serve replaces it

    async def probe(self) -> dict:
        """A real one-step, one-image sample of `default_model` (the registry's first version): the
        health check of the replica and of `/healthz`. The model was loaded and warmed up at start: a
        replica that cannot sample (a missing VAE, a bad device) fails then, not per request."""
        start = time.perf_counter()
        m = await self.model(self.default_model)
        x = await asyncio.to_thread(self.one_step_sample, m)
        if not torch.isfinite(x).all():
            raise RuntimeError("the one-step probe sample is not finite")
        return {"device": self.device, "precision": m.precision, "probe_ms": 1000 * (time.perf_counter() - start)}

    @serve.multiplexed(max_num_models_per_replica=MODELS_PER_REPLICA)
    async def model(self, model_id: str) -> Loaded:
        return self.warm.pop(model_id, None) or self.load(model_id)

    def load(self, model_id: str) -> Loaded:
        if model_id not in self.checkpoints:
            raise KeyError(f"unknown model {model_id!r}")
        net, cfg = load_model(self.checkpoints[model_id])
        meta, tokenizer = read_meta(self.checkpoints[model_id]), read_tokenizer(self.checkpoints[model_id])
        choice = choose(self.precision, self.device)
        net.to(device=self.device, dtype=DTYPES[choice.precision])  # once, so render() never copies per batch
        logger.info(f"sampler: {model_id} ({self.checkpoints[model_id]}) on {self.device}, images "
                    f"{image_shape(cfg, meta)}, precision {choice.precision} ({choice.reason}), {self.threads} thread(s)")
        return Loaded(net, cfg, meta, choice.precision, tokenizer)

    def reconfigure(self, user_config: dict) -> None:
        """Live settings (no restart): images per batch and the wait to fill one."""
        self.run_batch.set_max_batch_size(user_config["max_batch_images"])
        self.run_batch.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    async def __call__(self, job: Job) -> np.ndarray | Cancelled:
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        self.held[IMAGES] += job.cost
        self.held[REQUESTS] += 1
        try:
            return await self.run_batch(job, time.perf_counter())
        finally:
            self.held[IMAGES] -= job.cost
            self.held[REQUESTS] -= 1

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005, batch_size_fn=images_in)  # sized by the jobs
    async def run_batch(self, jobs: list[Job], queued_at: list[float]) -> list[np.ndarray | Cancelled]:
        # Serve splits a batch by model: one version here, the one the request was routed for
        model_id = serve.get_multiplexed_model_id() or self.default_model
        m, tags = await self.model(model_id), {"model": model_id}
        started = time.perf_counter()
        self.waiting -= len(jobs)
        self.metrics.queue_depth.set(self.waiting)
        for t in queued_at:
            self.metrics.stage_seconds.observe(started - t, tags={"stage": "queue"})
        out: list[Optional[np.ndarray | Cancelled]] = [None] * len(jobs)
        for idx in call_groups(jobs):
            group = [jobs[i] for i in idx]
            rows = (LiveRows([(j.job_id, j.images) for j in group])
                    if self.store is not None and any(j.job_id for j in group) else None)
            # in a thread: the replica's event loop keeps taking requests (the next batch fills
            # while this one computes), answering health checks and taking the jobs' cancellations
            compute = asyncio.ensure_future(asyncio.to_thread(render_call, m, group, self.watermark, rows))
            watcher = rows and asyncio.ensure_future(watch_while(self.store, self.replica, rows, compute))
            try:
                images = to_uint8(await compute)
            finally:
                if watcher:
                    watcher.cancel()
            self.metrics.batch_images.observe(images_in(group), tags=tags)  # one model call: its size,
            self.metrics.batch_requests.observe(len(group), tags=tags)  # and the requests it answered
            self.metrics.images.inc(images_in(group), tags=tags)
            self.metrics.nfe.inc(sum(j.images * j.nfe for j in group), tags=tags)
            start = 0
            for i in idx:
                n = jobs[i].images
                out[i], start = (rows and rows.outcome(jobs[i].job_id)) or images[start: start + n], start + n
        self.metrics.stage_seconds.observe(time.perf_counter() - started, tags={"stage": "compute", **tags})
        return out  # type: ignore[return-value]

    async def detect(self, images: torch.Tensor, steps: Optional[int]) -> list[dict]:
        """Watermark detection of images [B, C, H, W] in [-1, 1] with this deployment's key, by inverting
        the ODE of the version the request was routed for (dtrain.watermark)."""
        m = await self.model(serve.get_multiplexed_model_id() or self.default_model)
        noises = await asyncio.to_thread(recover_noise, m.net, m.cfg, images, steps, None, m.precision)
        return detect_watermark(noises, [self.watermark])


# The deployment. Its class has a name of its own in this module, so Ray pickles it by reference and a replica
# imports this module (by value, as a decorated class is pickled, its methods would keep the driver's globals).
Sampler = serve.deployment(SamplerReplica, name="Sampler", graceful_shutdown_timeout_s=60, health_check_period_s=10,
                           health_check_timeout_s=60)


def replica_gpus(requested: Optional[float]) -> float:
    """GPUs per sampler replica: as asked, else one where the cluster has any."""
    if requested is not None:
        return requested
    import ray

    return 1.0 if ray.cluster_resources().get("GPU", 0) >= 1 else 0.0


IMPORTED = time.time()  # the end of this module's imports: a replica's start phases (autoscaling.Startup)

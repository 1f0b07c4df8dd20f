"""Ray Serve app: a CPU FastAPI ingress in front of a batching sampler deployment.

    POST /v1/generate  {class_label, seed, steps, num_images, guidance} -> PNG images (base64)
    GET  /healthz

Deploy with `dtrain serve CHECKPOINT`, or `serve run serve/digits.yaml` (import path
dtrain.serving.app:build_app). A replica needs only the checkpoint: no Ray Train, no DeepSpeed.
"""
# No `from __future__ import annotations` here: FastAPI must see the real request types.
import base64
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle

from dtrain.checkpoint import load_model, read_config, read_meta, resolve
from dtrain.generation import image_shape, render
from dtrain.images import png_bytes, to_uint8
from dtrain.precision import choose
from dtrain.runtime import pin_threads
from dtrain.serving.schemas import GenerateRequest, GenerateResponse, Health

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Job:
    """One request as the sampler sees it; requests that share (steps, guidance) run as one batch."""
    class_label: int
    seeds: tuple[int, ...]
    steps: int
    guidance: float


@serve.deployment
class Sampler:
    def __init__(self, checkpoint: str):
        threads = pin_threads()  # the replica's num_cpus, not every core of the node
        self.net, self.cfg = load_model(checkpoint)
        self.meta = read_meta(checkpoint)  # says whether samples decode through a VAE
        choice = choose("auto", "cpu")
        self.precision = choice.precision
        self.net.to(choice.dtype)  # once here, so render() never has to make a cast copy per batch
        # image_shape loads a latent checkpoint's VAE now: a missing VAE fails the replica at start
        logger.info(f"sampler: {resolve(checkpoint)}, images {image_shape(self.cfg, self.meta)}, "
                    f"precision {choice.precision} ({choice.reason}), {threads} thread(s)")

    def reconfigure(self, user_config: dict) -> None:
        """Live settings (no restart): dynamic batch size and wait."""
        self.run_batch.set_max_batch_size(user_config.get("max_batch_size", 16))
        self.run_batch.set_batch_wait_timeout_s(user_config.get("batch_wait_timeout_s", 0.01))

    async def __call__(self, job: Job) -> np.ndarray:
        return await self.run_batch(job)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def run_batch(self, jobs: list[Job]) -> list[np.ndarray]:
        out: list[Optional[np.ndarray]] = [None] * len(jobs)
        groups: dict[tuple[int, float], list[int]] = {}
        for i, job in enumerate(jobs):
            groups.setdefault((job.steps, job.guidance), []).append(i)
        for (steps, guidance), idx in groups.items():
            cond = torch.cat([torch.full((len(jobs[i].seeds),), jobs[i].class_label) for i in idx])
            seeds = [s for i in idx for s in jobs[i].seeds]
            images = to_uint8(render(self.net, self.cfg, self.meta, cond, seeds, steps, guidance, self.precision,
                                             self.cfg.sample.sampler))
            start = 0
            for i in idx:
                n = len(jobs[i].seeds)
                out[i], start = images[start: start + n], start + n
        return out  # type: ignore[return-value]


app = FastAPI(title="dtrain", description="Class-conditional image generation with a dtrain checkpoint")


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class Ingress:
    def __init__(self, sampler: DeploymentHandle, model_name: str, num_classes: int, max_steps: int, max_images: int):
        self.sampler, self.model_name = sampler, model_name
        self.num_classes, self.max_steps, self.max_images = num_classes, max_steps, max_images

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health(status="ok", model=self.model_name)

    @app.post("/v1/generate", response_model=GenerateResponse)
    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        for ok, field, msg in ((req.class_label < self.num_classes, "class_label", f"must be < {self.num_classes}"),
                               (req.steps <= self.max_steps, "steps", f"must be <= {self.max_steps}"),
                               (req.num_images <= self.max_images, "num_images", f"must be <= {self.max_images}")):
            if not ok:
                raise HTTPException(status_code=422, detail=[{"loc": ["body", field], "msg": msg, "type": "value_error"}])
        seeds = tuple(range(req.seed, req.seed + req.num_images))
        images = await self.sampler.remote(Job(req.class_label, seeds, req.steps, req.guidance))
        return GenerateResponse(model=self.model_name, class_label=req.class_label, steps=req.steps, seeds=list(seeds),
                                images=[base64.b64encode(png_bytes(img)).decode() for img in images])


class ServeArgs(BaseModel):
    """Arguments of the app builder (the `args:` of a Serve config file)."""
    checkpoint: str
    num_replicas: Optional[int] = None  # default: serve.num_replicas of the checkpoint's config
    replica_cpus: Optional[float] = None
    max_batch_size: Optional[int] = None


def build_app(args: ServeArgs):
    """Typed app builder: checkpoint -> ingress bound to a sampler deployment."""
    ckpt = resolve(args.checkpoint)
    cfg = read_config(ckpt)
    s = cfg.serve
    sampler = Sampler.options(
        num_replicas=args.num_replicas or s.num_replicas,
        ray_actor_options={"num_cpus": s.replica_cpus if args.replica_cpus is None else args.replica_cpus},
        # @serve.batch never exceeds max_ongoing_requests (default 5): let a full batch in.
        max_ongoing_requests=2 * (args.max_batch_size or s.max_batch_size),
        user_config={"max_batch_size": args.max_batch_size or s.max_batch_size,
                     "batch_wait_timeout_s": s.batch_wait_timeout_s},
    ).bind(str(ckpt))
    return Ingress.bind(sampler, model_name=f"{ckpt.parent.name}/{ckpt.name}", num_classes=cfg.model.num_classes,
                        max_steps=s.max_steps, max_images=s.max_images)


class _DropLog(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def run_blocking(checkpoint: str, host: Optional[str] = None, port: Optional[int] = None,
                 replicas: Optional[int] = None) -> None:
    """`dtrain serve`: start (or join) a local Ray cluster, deploy, serve until Ctrl-C."""
    from dtrain.runtime import ensure_ray

    s = read_config(checkpoint).serve
    ensure_ray()
    host, port = host or s.host, port or s.port
    serve.start(http_options={"host": host, "port": port})
    # serve.run reconnects to the Serve instance started just above and logs that "new http_options
    # will not be applied": they were, a line earlier. Drop that one false alarm, nothing else.
    quiet = _DropLog("Connecting to existing Serve app")
    logger.addFilter(quiet)
    try:
        serve.run(build_app(ServeArgs(checkpoint=checkpoint, num_replicas=replicas)), name="dtrain", route_prefix="/")
    finally:
        logger.removeFilter(quiet)
    print(f"serving {resolve(checkpoint)} at http://{host}:{port}  (POST /v1/generate, GET /healthz, docs at /docs)",
          flush=True)
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()

"""Ray Serve app: a FastAPI ingress in front of an autoscaling, batching sampler deployment.

    POST /v1/generate  {model, version, allow_fallback, class_label, seed, num_images, sampler, steps,
                        guidance} -> PNG images (base64)
    GET  /v1/models    the registered models and versions: stage, lineage, default sampler and steps
    GET  /healthz      a real one-step sample on a sampler replica
    GET  /docs         Swagger UI, served from a package (works offline)

Deploy with `dtrain serve CHECKPOINT` (or `--models FILE`), or `serve run serve/digits.yaml` (import
path dtrain.serving.app:build_app, typed arguments dtrain.serving.config.ServeArgs). A replica needs
only the checkpoints: no Ray Train, no DeepSpeed. Overload is answered with 503 and Retry-After, never a
500; every invalid body gets a 422 naming the field.
"""
# No `from __future__ import annotations` here: FastAPI must see the real request types.
import asyncio
import base64
import json
import logging
import random
import time
from typing import Any, Optional

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from dtrain.checkpoint import read_config, read_meta
from dtrain.generation import nfe
from dtrain.images import png_bytes
from dtrain.serving.auth import BearerAuth
from dtrain.serving.config import ServeArgs
from dtrain.serving.docs import serve_docs_offline
from dtrain.serving.metrics import IngressMetrics
from dtrain.serving.sampler import Job, Sampler, replica_gpus
from dtrain.serving.schemas import GenerateRequest, GenerateResponse, Health

logger = logging.getLogger("ray.serve")


class SafeJSONResponse(JSONResponse):
    """JSON that any input can be echoed into: non-ASCII escaped (a lone surrogate in a field name
    cannot be encoded as UTF-8) and no NaN/Infinity literals (which are not JSON)."""
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


app = FastAPI(title="dtrain", description="Class-conditional image generation with a dtrain checkpoint",
              docs_url=None, redoc_url=None, default_response_class=SafeJSONResponse)
serve_docs_offline(app)
bearer = HTTPBearer(auto_error=False, description="Required when the deployment has tokens")


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
    # pydantic's errors carry the offending input (NaN, 1e309 -> inf, lone surrogates), which cannot
    # always be serialised: answer with where and why only.
    request.app.state.metrics.refusals.inc(tags={"reason": "invalid"})
    detail = [{"loc": [p if isinstance(p, int) else str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
              for e in exc.errors()]
    return SafeJSONResponse(status_code=422, content={"detail": detail})


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=60)
@serve.ingress(app)
class Ingress:
    def __init__(self, sampler: DeploymentHandle, catalog: dict, args: ServeArgs):
        self.sampler, self.catalog, self.args = sampler, catalog, args
        self.specs = args.models  # resolved: name -> ModelSpec
        self.auth = BearerAuth(args.auth_tokens_file, args.auth_tokens_env)
        self.metrics = IngressMetrics(next(iter(catalog)))
        self.in_flight = 0
        app.state.metrics = self.metrics
        logger.info(f"ingress for {sorted(catalog)}: auth {'on' if self.auth.enabled else 'off'}")

    def _refuse(self, status: int, reason: str, detail: Any, headers: Optional[dict] = None) -> HTTPException:
        self.metrics.refusals.inc(tags={"reason": reason})
        return HTTPException(status_code=status, detail=detail, headers=headers)

    def _invalid(self, field: str, msg: str) -> HTTPException:
        return self._refuse(422, "invalid", [{"loc": ["body", field], "msg": msg, "type": "value_error"}])

    def _authorize(self, creds: Optional[HTTPAuthorizationCredentials]) -> None:
        if not self.auth.allows(creds.credentials if creds else None):
            raise self._refuse(401, "unauthorized", "unauthorized", {"WWW-Authenticate": "Bearer"})

    def _overloaded(self, reason: str) -> HTTPException:
        return self._refuse(503, reason, f"{reason}: retry later", {"Retry-After": str(self.args.retry_after_s)})

    async def _call(self, method: str, *args: Any, model_id: str = "") -> Any:
        """A sampler call bounded by the request timeout; a replica that died mid-call is retried once
        on another (samples depend on their seeds only, so a retry returns the same images)."""
        handle = getattr(self.sampler.options(multiplexed_model_id=model_id), method)
        for attempt in range(2):
            response = handle.remote(*args)
            try:
                return await asyncio.wait_for(response, self.args.request_timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                raise self._overloaded("timeout") from None
            except BackPressureError:
                raise self._overloaded("overloaded") from None
            except RayActorError:
                if attempt:
                    raise self._overloaded("replica_lost") from None
                logger.warning("a sampler replica died during a request: retrying it on another")

    def _route(self, req: GenerateRequest) -> tuple[str, str, bool]:
        """(model, version, fallback used) for a request: as named, else the default or a canary share;
        the spike fallback when the request allows it and the ingress holds more than its threshold."""
        name = req.model or next(iter(self.specs))
        if name not in self.specs:
            raise self._invalid("model", f"unknown model; registered: {sorted(self.specs)}")
        spec = self.specs[name]
        if req.version is not None:
            if req.version not in spec.versions:
                raise self._invalid("version", f"unknown version of {name}; registered: {sorted(spec.versions)}")
            return name, req.version, False
        fb = spec.fallback
        if req.allow_fallback and fb and self.in_flight > fb.when_in_flight_over:
            return name, fb.version, True
        if spec.canary and random.random() < spec.canary.weight:
            return name, spec.canary.version, False
        return name, spec.default, False

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        probe = await self._call("probe")
        return Health(status="ok", model=next(iter(self.catalog)), **probe)

    @app.get("/v1/models")
    async def models(self, creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> dict:
        self._authorize(creds)
        return {"models": [{"model": name, "default": self.specs[name].default,
                            "canary": self.specs[name].canary and self.specs[name].canary.model_dump(),
                            "fallback": self.specs[name].fallback and self.specs[name].fallback.model_dump(),
                            "versions": list(versions.values())} for name, versions in self.catalog.items()]}

    @app.post("/v1/generate", response_model=GenerateResponse,
              responses={401: {"description": "Missing or unknown bearer token"},
                         503: {"description": "Overloaded or timed out: retry after Retry-After seconds"}})
    async def generate(self, req: GenerateRequest,
                       creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> GenerateResponse:
        started = time.perf_counter()
        self._authorize(creds)
        self.in_flight += 1  # this request included: what the spike fallback's threshold counts
        try:
            return await self._generate(req, started)
        finally:
            self.in_flight -= 1

    async def _generate(self, req: GenerateRequest, started: float) -> GenerateResponse:
        name, version, fallback = self._route(req)
        info, a = self.catalog[name][version], self.args
        d = info["defaults"]
        sampler = req.sampler or d["sampler"]
        steps = self.specs[name].fallback.steps if fallback else (req.steps or d["steps"])
        guidance = d["guidance"] if req.guidance is None else req.guidance
        for ok, field, msg in ((req.class_label < info["num_classes"], "class_label", f"must be < {info['num_classes']}"),
                               (steps <= a.max_steps, "steps", f"must be <= {a.max_steps}"),
                               (req.num_images <= a.max_images, "num_images", f"must be <= {a.max_images}")):
            if not ok:
                raise self._invalid(field, msg)
        seeds = tuple(range(req.seed, req.seed + req.num_images))
        images = await self._call("__call__", Job(req.class_label, seeds, sampler, steps, guidance),
                                  model_id=f"{name}/{version}")
        encoding = time.perf_counter()
        pngs = [base64.b64encode(png_bytes(img)).decode() for img in images]
        done = time.perf_counter()
        self.metrics.stage_seconds.observe(done - encoding, tags={"stage": "encode"})
        self.metrics.stage_seconds.observe(done - started, tags={"stage": "total"})
        return GenerateResponse(model=name, version=version, stage=info["stage"], fallback=fallback,
                                class_label=req.class_label, sampler=sampler, steps=steps, guidance=guidance,
                                nfe=nfe(steps, guidance, sampler), seeds=list(seeds), images=pngs)


def version_info(name: str, version: str, checkpoint: str) -> dict:
    """What a client may know of one version: its stage and lineage, and its sampling defaults."""
    cfg, meta = read_config(checkpoint), read_meta(checkpoint)
    s = cfg.sample
    return {"model": name, "version": version, "checkpoint": checkpoint, "stage": meta.get("stage", "pretrain"),
            "parent": meta.get("parent"), "teacher": meta.get("teacher"), "num_classes": cfg.model.num_classes,
            "image_size": cfg.model.image_size,
            "defaults": {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance}}


def build_app(args: ServeArgs):
    """Typed app builder: a checkpoint or a registry -> an ingress bound to an autoscaling, multiplexed
    sampler deployment."""
    args = args.resolved()
    catalog = {name: {v: version_info(name, v, path) for v, path in spec.versions.items()}
               for name, spec in args.models.items()}
    checkpoints = {f"{name}/{v}": path for name, spec in args.models.items() for v, path in spec.versions.items()}
    scaling = ({"num_replicas": args.num_replicas} if args.num_replicas
               else {"autoscaling_config": args.autoscaling.serve_config()})
    busy = 2 * args.max_batch_images  # one batch running and the next filling
    overload = BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s)
    sampler = Sampler.options(
        **scaling,
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": replica_gpus(args.replica_gpus)},
        max_ongoing_requests=busy, max_queued_requests=args.max_queued_requests,
        user_config={"max_batch_images": args.max_batch_images, "batch_wait_timeout_s": args.batch_wait_timeout_s},
    ).bind(checkpoints, next(iter(checkpoints)), args.precision)  # health probes: the first version, so a new default
    # version changes only the ingress's arguments and Serve replaces only the ingress
    # Serve's default of 5 requests per ingress would cap a batch at 5 images: admit every request
    # the samplers could hold, queue a bounded number more, refuse the rest with 503.
    most = args.num_replicas or args.autoscaling.max_replicas
    return Ingress.options(max_ongoing_requests=most * busy + args.max_queued_requests,
                           max_queued_requests=args.max_queued_requests, backpressure_config=overload,
                           ).bind(sampler, catalog, args)


def deploy(args: ServeArgs, name: str, route_prefix: Optional[str] = None) -> None:
    """Build and run the app on the Serve instance this process is connected to, at `route_prefix`
    (default `/<name>`); returns once every replica is up."""
    serve.run(build_app(args), name=name, route_prefix=route_prefix or f"/{name}")


class _DropLog(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def run_blocking(args: ServeArgs, host: str = "127.0.0.1", port: int = 8000) -> None:
    """`dtrain serve`: start (or join) a local Ray cluster, deploy, serve until Ctrl-C."""
    from dtrain.runtime import ensure_ray

    args = args.resolved()  # a missing checkpoint fails here, before a cluster starts
    ensure_ray()
    serve.start(http_options={"host": host, "port": port})
    # serve.run reconnects to the Serve instance started just above and logs that "new http_options
    # will not be applied": they were, a line earlier. Drop that one false alarm, nothing else.
    quiet = _DropLog("Connecting to existing Serve app")
    logger.addFilter(quiet)
    try:
        deploy(args, "dtrain", route_prefix="/")
    finally:
        logger.removeFilter(quiet)
    models = {name: list(spec.versions) for name, spec in args.models.items()}
    print(f"serving {models} at http://{host}:{port}  (POST /v1/generate, GET /v1/models, "
          "GET /healthz, docs at /docs)", flush=True)
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # replicas drain their in-flight requests (graceful_shutdown_timeout_s) first

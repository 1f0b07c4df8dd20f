"""Ray Serve app: a FastAPI ingress in front of an autoscaling, batching sampler deployment.

    POST /v1/generate  {model, version, allow_fallback, class_label, seed, num_images, sampler, steps,
                        guidance} -> PNG images (base64), watermarked with the deployment's key and
                        signed with a C2PA manifest of how each was made
    POST /v1/jobs      the same body -> a job id at once; GET /v1/jobs/{id} its state and, when done, the
                       images; DELETE /v1/jobs/{id} cancels it; GET /v1/jobs/{id}/events streams progress
    POST /v1/detect    {image, model, version, steps} -> is the image watermarked with that key
    GET  /v1/models    the registered models and versions: stage, lineage, default sampler and steps
    GET  /healthz      a real one-step sample on a sampler replica
    GET  /docs         Swagger UI, served from a package (works offline)

Deploy with `dtrain serve CHECKPOINT` (or `--models FILE`), or `serve run serve/digits.yaml` (import
path dtrain.serving.app:build_app, typed arguments dtrain.serving.config.ServeArgs). A replica needs
only the checkpoints: no Ray Train, no DeepSpeed. Overload is answered with 503 and Retry-After, never a
500; every invalid body gets a 422 naming the field. The input policy (`deny_classes`) refuses a request
with 400 and a reason code before any compute; an optional response cache answers a repeated request
(same version, parameters and seeds) with the same bytes, marked `X-Cache: hit`. Tenants (named by
their bearer tokens) have image quotas (429 with Retry-After) and tiers: requests waiting for the
samplers are admitted high tier first (dtrain.serving.tenancy).
"""
# No `from __future__ import annotations` here: FastAPI must see the real request types.
import asyncio
import base64
import binascii
import dataclasses
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from cachetools import TTLCache
from fastapi import FastAPI, HTTPException, Request, Response, Security
from fastapi import Path as FPath
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from dtrain.checkpoint import read_config, read_meta
from dtrain.generation import nfe
from dtrain.images import png_bytes
from dtrain.provenance import ProvenanceSigner, signer_for_serving
from dtrain.serving.auth import BearerAuth
from dtrain.serving.config import ServeArgs, TenantPolicy
from dtrain.serving.docs import serve_docs_offline
from dtrain.serving.metrics import IngressMetrics
from dtrain.serving.jobs import Cancelled, JobBoard, follow
from dtrain.serving.sampler import Job, Sampler, replica_gpus
from dtrain.serving.tenancy import PriorityGate, Quotas
from dtrain.serving.schemas import DetectRequest, DetectResponse, GenerateRequest, GenerateResponse, Health, JobState
from dtrain.watermark import decode_for_model, key_for_serving

logger = logging.getLogger("ray.serve")
JOB_ID = r"^[0-9a-f]{32}$"


@dataclass(frozen=True)
class Plan:
    """A request routed and checked: the version that serves it and the sampler's job."""
    name: str
    version: str
    fallback: bool
    info: dict
    job: Job

    @property
    def model_id(self) -> str:
        return f"{self.name}/{self.version}"


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
    def __init__(self, sampler: DeploymentHandle, board: DeploymentHandle, catalog: dict, args: ServeArgs,
                 watermark_key_id: Optional[str], signer: Optional[ProvenanceSigner] = None):
        self.sampler, self.board, self.catalog, self.args = sampler, board, catalog, args
        self.jobs: set[asyncio.Task] = set()
        self.key_id, self.signer = watermark_key_id, signer
        self.specs = args.models  # resolved: name -> ModelSpec
        self.auth = BearerAuth(args.auth_tokens_file, args.auth_tokens_env)
        self.metrics = IngressMetrics(next(iter(catalog)))
        self.in_flight = 0
        self.cache = TTLCache(args.cache_entries, args.cache_ttl_s) if args.cache_entries else None
        self.gate = PriorityGate(args.admit_images or args.images_held())
        self.quotas = Quotas()
        app.state.metrics = self.metrics
        logger.info(f"ingress for {sorted(catalog)}: auth {'on' if self.auth.enabled else 'off'}, "
                    f"watermark {self.key_id or 'off'}, provenance {'signed' if signer else 'off'}")

    def _refuse(self, status: int, reason: str, detail: Any, headers: Optional[dict] = None) -> HTTPException:
        self.metrics.refusals.inc(tags={"reason": reason})
        return HTTPException(status_code=status, detail=detail, headers=headers)

    def _invalid(self, field: str, msg: str) -> HTTPException:
        return self._refuse(422, "invalid", [{"loc": ["body", field], "msg": msg, "type": "value_error"}])

    def _authorize(self, creds: Optional[HTTPAuthorizationCredentials]) -> str:
        """The caller's tenant (who owns its jobs); 401 for a missing or unknown token."""
        token = creds.credentials if creds else None
        if not self.auth.allows(token):
            raise self._refuse(401, "unauthorized", "unauthorized", {"WWW-Authenticate": "Bearer"})
        return self.auth.tenant(token)

    def _overloaded(self, reason: str) -> HTTPException:
        return self._refuse(503, reason, f"{reason}: retry later", {"Retry-After": str(self.args.retry_after_s)})

    async def _call(self, method: str, *args: Any, model_id: str = "", timeout_s: Optional[float] = None) -> Any:
        """A sampler call bounded by the request timeout; a replica that died mid-call is retried once
        on another (samples depend on their seeds only, so a retry returns the same images)."""
        handle = getattr(self.sampler.options(multiplexed_model_id=model_id), method)
        for attempt in range(2):
            response = handle.remote(*args)
            try:
                return await asyncio.wait_for(response, timeout_s or self.args.request_timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                raise self._overloaded("timeout") from None
            except BackPressureError:
                raise self._overloaded("overloaded") from None
            except RayActorError:
                if attempt:
                    raise self._overloaded("replica_lost") from None
                logger.warning("a sampler replica died during a request: retrying it on another")

    async def _sample(self, plan: Plan, tenant: str, timeout_s: Optional[float] = None) -> Any:
        """The plan's images from a sampler, once the priority gate admits them (by the tenant's tier)."""
        timeout_s = timeout_s or self.args.request_timeout_s
        images, start = len(plan.job.seeds), time.monotonic()
        try:
            await asyncio.wait_for(self.gate.acquire(self._policy(tenant).tier, images), timeout_s)
        except asyncio.TimeoutError:
            raise self._overloaded("timeout") from None
        try:
            left = max(0.001, timeout_s - (time.monotonic() - start))
            return await self._call("__call__", plan.job, model_id=plan.model_id, timeout_s=left)
        finally:
            self.gate.release(images)

    def _policy(self, tenant: str) -> TenantPolicy:
        return self.args.tenants.get(tenant, self.args.default_tenant)

    def _check_quota(self, tenant: str, images: int) -> None:
        wait = self.quotas.take(tenant, self._policy(tenant).images_per_minute, images)
        if wait is not None:
            logger.info(f"refused: tenant {tenant!r}, {images} image(s): quota")
            raise self._refuse(429, "quota", {"code": "quota", "message": f"over the quota of {tenant}: retry "
                                              f"after {wait} s"}, {"Retry-After": str(wait)})

    def _model(self, model: Optional[str]) -> str:
        """The model a request names (default: the first registered); 422 for an unknown one."""
        name = model or next(iter(self.specs))
        if name not in self.specs:
            raise self._invalid("model", f"unknown model; registered: {sorted(self.specs)}")
        return name

    def _version(self, name: str, version: str) -> str:
        if version not in self.specs[name].versions:
            raise self._invalid("version", f"unknown version of {name}; registered: {sorted(self.specs[name].versions)}")
        return version

    def _route(self, req: GenerateRequest) -> tuple[str, str, bool]:
        """(model, version, fallback used) for a request: as named, else the default or a canary share;
        the spike fallback when the request allows it and the ingress holds more than its threshold."""
        name = self._model(req.model)
        spec = self.specs[name]
        if req.version is not None:
            return name, self._version(name, req.version), False
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
              responses={400: {"description": "Refused by the input policy: detail.code says why"},
                         401: {"description": "Missing or unknown bearer token"},
                         429: {"description": "Over the tenant's quota: retry after Retry-After seconds"},
                         503: {"description": "Overloaded or timed out: retry after Retry-After seconds"}})
    async def generate(self, req: GenerateRequest, response: Response,
                       creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> GenerateResponse:
        started = time.perf_counter()
        tenant = self._authorize(creds)
        self._check_policy(req)
        self.in_flight += 1  # this request included: what the spike fallback's threshold counts
        try:
            return await self._generate(req, response, started, tenant)
        finally:
            self.in_flight -= 1

    def _check_policy(self, req: GenerateRequest) -> None:
        """The input policy, before routing or any compute: a denied class is refused with 400 and a
        reason code, counted, and logged with what was refused only (never the token or the body)."""
        name = req.model or next(iter(self.specs))
        denied = {*self.args.deny_classes.get("*", ()), *self.args.deny_classes.get(name, ())}
        if req.class_label in denied:
            logger.info(f"refused: model {name!r}, class {req.class_label}: denied_class")
            raise self._refuse(400, "denied_class", {"code": "denied_class",
                                                     "message": f"class {req.class_label} of {name} is not served"})

    def _plan(self, req: GenerateRequest) -> Plan:
        """Route and check a request against the version that will serve it."""
        name, version, fallback = self._route(req)
        info, a = self.catalog[name][version], self.args
        d = info["defaults"]
        sampler = req.sampler or d["sampler"]
        steps = self.specs[name].fallback.steps if fallback else (req.steps or d["steps"])
        guidance = d["guidance"] if req.guidance is None else req.guidance
        for ok, field, msg in ((req.class_label < info["num_classes"], "class_label", f"must be < {info['num_classes']}"),
                               (sampler != "flow_map" or info["flow_map"], "sampler",
                                f"flow_map needs a flow-map model; {name}/{version} predicts a velocity"),
                               (steps <= a.max_steps, "steps", f"must be <= {a.max_steps}"),
                               (req.num_images <= a.max_images, "num_images", f"must be <= {a.max_images}")):
            if not ok:
                raise self._invalid(field, msg)
        seeds = tuple(range(req.seed, req.seed + req.num_images))
        return Plan(name, version, fallback, info, Job(req.class_label, seeds, sampler, steps, guidance))

    async def _generate(self, req: GenerateRequest, response: Response, started: float, tenant: str) -> GenerateResponse:
        plan = self._plan(req)
        self._check_quota(tenant, len(plan.job.seeds))
        # everything the bytes depend on: the version's checkpoint and every generation parameter
        key = (self.args.models[plan.name].versions[plan.version], plan.fallback, plan.job, self.key_id)
        if self.cache is not None:
            hit = self.cache.get(key)
            self.metrics.cache.inc(tags={"result": "miss" if hit is None else "hit"})
            response.headers["X-Cache"] = "miss" if hit is None else "hit"
            if hit is not None:
                return hit
        images = await self._sample(plan, tenant)
        answer = await self._answer(plan, images, started)
        if self.cache is not None:
            self.cache[key] = answer
        return answer

    async def _answer(self, plan: Plan, images: Any, started: float) -> GenerateResponse:
        """The response for a plan's images: PNGs, signed last (nothing may change the bytes after)."""
        job, info = plan.job, plan.info
        encoding = time.perf_counter()
        pngs = [png_bytes(img) for img in images]
        if self.signer is not None:
            signing = time.perf_counter()
            how = {"model": plan.name, "version": plan.version, "stage": info["stage"],
                   "lineage": {"parent": info["parent"], "teacher": info["teacher"]}, "sampler": job.sampler,
                   "steps": job.steps, "guidance": job.guidance, "class_label": job.class_label,
                   "watermark_key_id": self.key_id}
            pngs = await asyncio.to_thread(lambda: [self.signer.sign_png(png, {**how, "seed": seed}, f"dtrain {plan.name}")
                                                    for png, seed in zip(pngs, job.seeds)])
            self.metrics.stage_seconds.observe(time.perf_counter() - signing, tags={"stage": "sign"})
        pngs = [base64.b64encode(png).decode() for png in pngs]
        done = time.perf_counter()
        self.metrics.stage_seconds.observe(done - encoding, tags={"stage": "encode"})
        self.metrics.stage_seconds.observe(done - started, tags={"stage": "total"})
        return GenerateResponse(model=plan.name, version=plan.version, stage=info["stage"], fallback=plan.fallback,
                                class_label=job.class_label, sampler=job.sampler, steps=job.steps,
                                guidance=job.guidance, nfe=nfe(job.steps, job.guidance, job.sampler),
                                seeds=list(job.seeds), watermark_key_id=self.key_id, images=pngs)

    # Jobs: the same generation, answered at once with an id (dtrain.serving.jobs)

    def _no_job(self) -> HTTPException:
        return HTTPException(404, {"code": "unknown_job", "message": "no such job, or its result has expired"})

    @app.post("/v1/jobs", status_code=202, response_model=JobState,
              responses={400: {"description": "Refused by the input policy: detail.code says why"},
                         401: {"description": "Missing or unknown bearer token"},
                         429: {"description": "Over the tenant's quota: retry after Retry-After seconds"},
                         503: {"description": "Too many jobs kept: retry after Retry-After seconds"}})
    async def submit_job(self, req: GenerateRequest,
                         creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> dict:
        """Start a generation (the body of /v1/generate) and answer at once with its job id. Poll
        GET /v1/jobs/{id}, follow GET /v1/jobs/{id}/events, cancel with DELETE /v1/jobs/{id}."""
        owner = self._authorize(creds)
        self._check_policy(req)
        plan = self._plan(req)
        self._check_quota(owner, req.num_images)
        job_id = uuid.uuid4().hex
        job = dataclasses.replace(plan.job, job_id=job_id)
        if not await self.board.create.remote(job_id, owner, job.steps, nfe(job.steps, 1.0, job.sampler)):
            raise self._overloaded("jobs_full")
        task = asyncio.ensure_future(self._run_job(dataclasses.replace(plan, job=job), owner))
        self.jobs.add(task)  # held, or the loop may drop the task
        task.add_done_callback(self.jobs.discard)
        return await self.board.get.remote(job_id, owner, False)

    async def _run_job(self, plan: Plan, tenant: str) -> None:
        job_id, started = plan.job.job_id, time.perf_counter()
        try:
            out = await self._sample(plan, tenant, timeout_s=self.args.job_timeout_s)
            if isinstance(out, Cancelled):
                await self.board.finish.remote(job_id, "cancelled", cancelled=out)
            else:
                answer = await self._answer(plan, out, started)
                await self.board.finish.remote(job_id, "done", result=answer.model_dump())
        except HTTPException as e:
            await self.board.finish.remote(job_id, "failed", error=str(e.detail))
        except Exception:
            logger.exception(f"job {job_id} failed")
            await self.board.finish.remote(job_id, "failed", error="internal error")

    @app.get("/v1/jobs/{job_id}", response_model=JobState, responses={404: {"description": "Unknown or expired"}})
    async def job(self, job_id: str = FPath(pattern=JOB_ID),
                  creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> dict:
        """The job's state and progress; once done, its images (until `job_ttl_s` after it finished)."""
        state = await self.board.get.remote(job_id, self._authorize(creds))
        if state is None:
            raise self._no_job()
        return state

    @app.delete("/v1/jobs/{job_id}", response_model=JobState, responses={404: {"description": "Unknown or expired"}})
    async def cancel_job(self, job_id: str = FPath(pattern=JOB_ID),
                         creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> dict:
        """Cancel a queued or running job: a running one stops computing at its next network call, while
        the rest of its batch runs on. A finished job is left as it is."""
        state = await self.board.cancel.remote(job_id, self._authorize(creds))
        if state is None:
            raise self._no_job()
        return state

    @app.get("/v1/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}},
                                                     404: {"description": "Unknown or expired"}})
    async def job_events(self, job_id: str = FPath(pattern=JOB_ID),
                         creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> StreamingResponse:
        """Server-sent events: `progress` as the job's steps advance (at most every 50 ms), then one
        of `done`, `cancelled` or `failed` (fetch the images with GET /v1/jobs/{id}), and the stream ends."""
        owner = self._authorize(creds)
        first = await self.board.get.remote(job_id, owner, False)
        if first is None:
            raise self._no_job()
        return StreamingResponse(follow(self.board, job_id, owner, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/detect", response_model=DetectResponse,
              responses={400: {"description": "Nothing to detect: detail.code says why"},
                         401: {"description": "Missing or unknown bearer token"},
                         503: {"description": "Overloaded or timed out: retry after Retry-After seconds"}})
    async def detect(self, req: DetectRequest,
                     creds: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> DetectResponse:
        """Is this image watermarked with the deployment's key? The version's ODE is inverted to the
        image's noise, whose signs are matched against the key (dtrain.watermark)."""
        self._authorize(creds)
        if self.key_id is None:
            raise self._refuse(400, "watermark_off", {"code": "watermark_off",
                                                      "message": "this deployment does not watermark its images"})
        name = self._model(req.model)
        version = self._version(name, req.version or self.specs[name].default)
        info = self.catalog[name][version]
        if info["latent"]:
            raise self._refuse(400, "unsupported", {"code": "unsupported", "message": "detection on a latent "
                                                    "model's images needs its VAE encoder, which is not wired yet"})
        if (req.steps or info["defaults"]["steps"]) > self.args.max_steps:
            raise self._invalid("steps", f"must be <= {self.args.max_steps}")
        try:
            image = decode_for_model(base64.b64decode(req.image, validate=True),
                                     (info["channels"], info["image_size"], info["image_size"]))
        except (binascii.Error, ValueError) as e:
            raise self._invalid("image", str(e)) from None
        (found,) = await self._call("detect", image[None], req.steps, model_id=f"{name}/{version}")
        return DetectResponse(model=name, version=version, **found)


def version_info(name: str, version: str, checkpoint: str) -> dict:
    """What a client may know of one version: its stage and lineage, and its sampling defaults."""
    cfg, meta = read_config(checkpoint), read_meta(checkpoint)
    s = cfg.sample
    return {"model": name, "version": version, "checkpoint": checkpoint, "stage": meta.get("stage", "pretrain"),
            "parent": meta.get("parent"), "teacher": meta.get("teacher"), "num_classes": cfg.model.num_classes,
            "image_size": cfg.model.image_size, "channels": cfg.model.in_channels, "flow_map": cfg.model.flow_map,
            "latent": isinstance(meta.get("latents"), dict),
            "defaults": {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance}}


def build_app(args: ServeArgs):
    """Typed app builder: a checkpoint or a registry -> an ingress bound to an autoscaling, multiplexed
    sampler deployment."""
    args = args.resolved()
    key = key_for_serving(args.watermark_key_file) if args.watermark else None
    signer = _signer(args)
    catalog = {name: {v: version_info(name, v, path) for v, path in spec.versions.items()}
               for name, spec in args.models.items()}
    checkpoints = {f"{name}/{v}": path for name, spec in args.models.items() for v, path in spec.versions.items()}
    scaling = ({"num_replicas": args.num_replicas} if args.num_replicas
               else {"autoscaling_config": args.autoscaling.serve_config()})
    board = JobBoard.bind(args.job_ttl_s, args.max_jobs)
    overload = BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s)
    sampler = Sampler.options(
        **scaling,
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": replica_gpus(args.replica_gpus)},
        max_ongoing_requests=2 * args.max_batch_images,  # one batch running and the next filling
        max_queued_requests=args.max_queued_requests,
        user_config={"max_batch_images": args.max_batch_images, "batch_wait_timeout_s": args.batch_wait_timeout_s},
    ).bind(checkpoints, next(iter(checkpoints)), args.precision, key, board)  # health probes: the first version, so a new default
    # version changes only the ingress's arguments and Serve replaces only the ingress
    # Serve's default of 5 requests per ingress would cap a batch at 5 images: admit every request
    # the samplers could hold, queue a bounded number more, refuse the rest with 503.
    return Ingress.options(max_ongoing_requests=args.images_held() + args.max_queued_requests,
                           max_queued_requests=args.max_queued_requests, backpressure_config=overload,
                           ).bind(sampler, board, catalog, args, key and key.key_id, signer)


def _signer(args: ServeArgs) -> Optional[ProvenanceSigner]:
    if not args.provenance:
        return None
    signer, test = signer_for_serving(args.provenance_cert_chain, args.provenance_key)
    if test:
        logger.warning(f"served images are signed with test credentials ({signer.cert_chain_path}): they prove "
                       "an image unchanged, not who made it; give provenance_cert_chain and provenance_key")
    return signer


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

    args = args.resolved()  # a missing checkpoint or a bad key fails here, before a cluster starts
    key = key_for_serving(args.watermark_key_file) if args.watermark else None
    _signer(args)  # bad credentials fail here too
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
    print(f"serving {models} at http://{host}:{port}  (POST /v1/generate, POST /v1/detect, GET /v1/models, "
          f"GET /healthz, docs at /docs); watermark key {key.key_id if key else 'off'}", flush=True)
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # replicas drain their in-flight requests (graceful_shutdown_timeout_s) first

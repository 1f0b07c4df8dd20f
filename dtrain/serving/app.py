"""Ray Serve app: a FastAPI ingress in front of an autoscaling, batching sampler deployment.

    POST /v1/generate  {model, version, allow_fallback, class_label | prompt (+ negative_prompt) | regions
                        (+ region_method), seed, num_images, sampler, steps, guidance} -> PNG images
                        (base64), watermarked with the deployment's key and signed with a C2PA manifest
                        of how each was made
    POST /v1/jobs      the same body -> a job id at once; GET /v1/jobs/{id} its state and, when done, the
                       images; DELETE /v1/jobs/{id} cancels it; GET /v1/jobs/{id}/events streams progress
    POST /v1/edit      {model, version, image, prompt | class_label, source_prompt | source_class, strength,
                        steps, guidance, scheme, mask, attention_replace} -> the image inverted along the
                        model's ODE and regenerated under the target (dtrain.editing), watermarked, signed
                        with a manifest that records the edit and names the image sent as its parent
    POST /v1/detect    {image, model, version, steps} -> is the image watermarked with that key
    GET  /v1/models    the registered models and versions: stage, lineage, conditioning (class or text,
                       with its classes or prompt limits), region control, editing, default sampler and steps
    GET  /healthz      a real one-step sample on a sampler replica
    GET  /docs         Swagger UI, served from a package (works offline)

Deploy with `dtrain serve CHECKPOINT` (or `--models FILE`), or `serve run serve/digits.yaml` (import
path dtrain.serving.app:build_app, typed arguments dtrain.serving.config.ServeArgs). A replica needs
only the checkpoints: no Ray Train, no DeepSpeed. Overload is answered with 503 and Retry-After, never a
500; a missing or unknown token gets 401 before anything else, every invalid body a 422 naming the
field. The input policy (`deny_classes`, `deny_words`, `deny_patterns`; dtrain.serving.policy) refuses
a request with 400 and a reason code before any compute; an optional response cache answers a repeated
request (same version, parameters, prompts and seeds) with the same bytes, marked `X-Cache: hit`.
Tenants (named by their bearer tokens) have image quotas (429 with Retry-After) and tiers: requests
waiting for the samplers are admitted high tier first (dtrain.serving.tenancy).

The routes are functions, here and in dtrain.serving.job_routes (an APIRouter). Every /v1 route sits
behind one security dependency that authorizes the caller and names its tenant, and reaches the ingress
replica by another (dtrain.serving.dependencies). What a request means (model, version, canary,
fallback, defaults, bounds) is planned by a pure function (dtrain.serving.planning); the replica
(dtrain.serving.ingress) holds the handles, the admission gate, the quotas and the cache.
"""
# No `from __future__ import annotations` here: FastAPI must see the real request types.
import json
import logging
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig

from dtrain.checkpoint import read_config, read_meta
from dtrain.diffusion import prediction_and_path
from dtrain.editing import SCHEMES
from dtrain.provenance import ProvenanceSigner, signer_for_serving
from dtrain.regions import MAX_OBJECTS, METHODS, Region, RegionError, RegionSpec, check_model
from dtrain.serving import job_routes
from dtrain.serving.config import ServeArgs
from dtrain.serving.dependencies import IngressDep, Tenant, current_ingress, tenant
from dtrain.serving.docs import serve_docs_offline
from dtrain.serving.ingress import IngressReplica
from dtrain.serving.sampler import Sampler, replica_gpus
from dtrain.serving.planning import PlanError
from dtrain.serving.schemas import (MAX_PROMPT_CHARS, DetectRequest, DetectResponse, EditRequest, EditResponse,
                                   GenerateRequest, GenerateResponse, Health)
from dtrain.serving.uploads import DETECT_FORMATS, as_model_input, decode_upload
from dtrain.watermark import key_for_serving

logger = logging.getLogger("ray.serve")


class SafeJSONResponse(JSONResponse):
    """JSON that any input can be echoed into: non-ASCII escaped (a lone surrogate in a field name
    cannot be encoded as UTF-8) and no NaN/Infinity literals (which are not JSON)."""
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


app = FastAPI(title="dtrain", description="Class- or text-conditional image generation with dtrain checkpoints",
              docs_url=None, redoc_url=None, default_response_class=SafeJSONResponse)
serve_docs_offline(app)
# Every route but /healthz: the caller is authorized (401 otherwise) before the route runs, once per request;
# a route that needs the caller's tenant takes a `Tenant` parameter (the same, cached).
v1 = APIRouter(dependencies=[Security(tenant)])


@app.exception_handler(RequestValidationError)
async def _invalid_body(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
    # pydantic's errors carry the offending input (NaN, 1e309 -> inf, lone surrogates), which cannot
    # always be serialised: answer with where and why only. Counted by the replica that serves (the app
    # a replica runs is a copy of this one: nothing set on this module's `app` reaches it).
    (await current_ingress()).metrics.refusals.inc(tags={"reason": "invalid"})
    detail = [{"loc": [p if isinstance(p, int) else str(p) for p in e["loc"]], "msg": e["msg"], "type": e["type"]}
              for e in exc.errors()]
    return SafeJSONResponse(status_code=422, content={"detail": detail})


# Routes: functions given the ingress replica (and the caller's tenant) by dependencies. All are added
# before the Ingress class below, whose @serve.ingress(app) freezes the app.

@app.get("/healthz", response_model=Health)
async def healthz(ingress: IngressDep) -> Health:
    probe = await ingress.call("probe")
    return Health(status="ok", model=next(iter(ingress.catalog)), **probe)


@v1.get("/v1/models")
async def models(ingress: IngressDep) -> dict:
    specs = ingress.specs
    return {"models": [{"model": name, "default": specs[name].default,
                        "canary": specs[name].canary and specs[name].canary.model_dump(),
                        "fallback": specs[name].fallback and specs[name].fallback.model_dump(),
                        "versions": list(versions.values())} for name, versions in ingress.catalog.items()]}


@v1.post("/v1/generate", response_model=GenerateResponse,
         responses={400: {"description": "Refused by the input policy: detail.code says why"},
                    401: {"description": "Missing or unknown bearer token"},
                    429: {"description": "Over the tenant's quota: retry after Retry-After seconds"},
                    503: {"description": "Overloaded or timed out: retry after Retry-After seconds"}})
async def generate(req: GenerateRequest, response: Response, owner: Tenant, ingress: IngressDep) -> GenerateResponse:
    return await ingress.generate(req, response, owner)


v1.include_router(job_routes.router)  # /v1/jobs...: the same generation, answered at once with an id


@v1.post("/v1/edit", response_model=EditResponse,
         responses={400: {"description": "Refused by the input policy, or a version that cannot edit: detail.code "
                                         "says why"},
                    401: {"description": "Missing or unknown bearer token"},
                    422: {"description": "A field that does not fit, named: image or mask not a PNG or JPEG of the "
                                         "model's size and channels, too long, ..."},
                    429: {"description": "Over the tenant's quota: retry after Retry-After seconds"},
                    503: {"description": "Overloaded or timed out: retry after Retry-After seconds"}})
async def edit(req: EditRequest, response: Response, owner: Tenant, ingress: IngressDep) -> EditResponse:
    """Edit an image: invert it along the version's ODE to t0 = 1 - strength under the source condition,
    regenerate it under the target (optionally only where the mask is white; with prompt-to-prompt
    attention replacement). Counts against the quota as the plain images its network evaluations are worth."""
    return await ingress.edit(req, response, owner)


@v1.post("/v1/detect", response_model=DetectResponse,
         responses={400: {"description": "Nothing to detect: detail.code says why"},
                    401: {"description": "Missing or unknown bearer token"},
                    503: {"description": "Overloaded or timed out: retry after Retry-After seconds"}})
async def detect(req: DetectRequest, ingress: IngressDep) -> DetectResponse:
    """Is this image watermarked with the deployment's key? The version's ODE is inverted to the
    image's noise, whose signs are matched against the key (dtrain.watermark)."""
    if ingress.key_id is None:
        raise ingress.refuse(400, "watermark_off", {"code": "watermark_off",
                                                    "message": "this deployment does not watermark its images"})
    name, version = ingress.model_version(req.model, req.version)
    info = ingress.catalog[name][version]
    if info["latent"]:
        raise ingress.refuse(400, "unsupported", {"code": "unsupported", "message": "detection on a latent "
                                                  "model's images needs its VAE encoder, which is not wired yet"})
    if (req.steps or info["defaults"]["steps"]) > ingress.args.max_steps:
        raise ingress.invalid("steps", f"must be <= {ingress.args.max_steps}")
    try:  # the common formats, colour converted to the model's channels; the size read from the header first
        image = decode_upload(req.image, "image", (info["channels"], info["image_size"], info["image_size"]),
                              formats=DETECT_FORMATS, convert=True)
    except PlanError as e:
        raise ingress.invalid(e.field, e.msg) from None
    (found,) = await ingress.call("detect", as_model_input(image.pixels)[None], req.steps,
                                  model_id=f"{name}/{version}")
    return DetectResponse(model=name, version=version, **found)


app.include_router(v1)


@serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=60)
@serve.ingress(app)
class Ingress(IngressReplica):
    """The ingress deployment: the routes above, in front of one IngressReplica per replica."""


def version_info(name: str, version: str, checkpoint: str) -> dict:
    """What a client may know of one version: its stage and lineage, what it is conditioned on (a class
    model's class count; a text model's prompt limits: characters taken, tokens read), its backbone, its
    region control (the methods it takes, the most objects; None for a vector model) and its sampling
    defaults, and what of editing it takes (`edit_support`)."""
    cfg, meta = read_config(checkpoint), read_meta(checkpoint)
    s, m = cfg.sample, cfg.model
    cond = ({"num_classes": m.num_classes} if m.conditioning == "class"
            else {"max_prompt_chars": MAX_PROMPT_CHARS, "max_tokens": m.max_tokens})
    methods = region_methods(cfg)
    return {"model": name, "version": version, "checkpoint": checkpoint, "stage": meta.get("stage", "pretrain"),
            "parent": meta.get("parent"), "teacher": meta.get("teacher"), "conditioning": str(m.conditioning),
            **cond, "arch": str(m.arch), "image_size": cfg.model.image_size, "channels": cfg.model.in_channels,
            "flow_map": cfg.model.flow_map, "latent": isinstance(meta.get("latents"), dict),
            "regions": {"methods": methods, "max_objects": MAX_OBJECTS} if methods else None,
            "edit": edit_support(cfg, meta),
            "defaults": {"sampler": s.sampler, "steps": s.steps, "guidance": s.guidance}}


def edit_support(cfg, meta: dict) -> dict:
    """What POST /v1/edit takes on a version: its inversion schemes and whether attention replacement (a
    text model's); or why it cannot edit ("unsupported"): a vector model, a latent one (its images would
    need the VAE's encoder), an x0-predicting one (no noise estimate at the data end to invert from)."""
    m = cfg.model
    if m.arch == "mlp":
        return {"unsupported": "it samples vectors (model.arch=mlp), not images"}
    if isinstance(meta.get("latents"), dict):
        return {"unsupported": "a latent model's images need its VAE encoder, which is not wired yet"}
    if prediction_and_path(cfg.objective)[0] == "x0":
        return {"unsupported": "it predicts x0, so it has no noise estimate at the data end to invert from"}
    return {"schemes": list(SCHEMES), "attention_replace": m.conditioning == "text"}


def region_methods(cfg) -> list[str]:
    """The region methods a model takes, as dtrain.regions.check_model decides for a one-region spec."""
    spec = RegionSpec(Region(prompt="") if cfg.model.conditioning == "text" else Region(class_label=0))
    methods = []
    for method in METHODS:
        try:
            check_model(spec, cfg, method)
        except RegionError:
            continue
        methods.append(method)
    return methods


def build_app(args: ServeArgs):
    """Typed app builder: a checkpoint or a registry -> an ingress (`ingress_replicas`) bound to an
    autoscaling, multiplexed sampler deployment, both on the app's state store (`state_store`)."""
    args = args.resolved()
    key = key_for_serving(args.watermark_key_file) if args.watermark else None
    signer = _signer(args)
    catalog = {name: {v: version_info(name, v, path) for v, path in spec.versions.items()}
               for name, spec in args.models.items()}
    checkpoints = {f"{name}/{v}": path for name, spec in args.models.items() for v, path in spec.versions.items()}
    # autoscaling on images queued and in flight per replica (dtrain.serving.autoscaling), by default
    scaling = ({"num_replicas": args.num_replicas} if args.num_replicas
               else {"autoscaling_config": args.autoscaling.serve_config(args.max_batch_images)})
    overload = BackpressureConfig(status_code=503, retry_after_s=args.retry_after_s)
    sampler = Sampler.options(
        **scaling,
        ray_actor_options={"num_cpus": args.replica_cpus, "num_gpus": replica_gpus(args.replica_gpus)},
        max_ongoing_requests=2 * args.max_batch_images,  # one batch running and the next filling
        max_queued_requests=args.max_queued_requests,
        user_config={"max_batch_images": args.max_batch_images, "batch_wait_timeout_s": args.batch_wait_timeout_s},
    ).bind(checkpoints, next(iter(checkpoints)), args.precision, key, args.store_spec())
    # health probes: the first version, so a new default version changes only the ingress's arguments and
    # Serve replaces only the ingress (the store's spec is the same: its state stays)
    # Serve's default of 5 requests per ingress would cap a batch at 5 images: admit every request
    # the samplers could hold, queue a bounded number more, refuse the rest with 503.
    return Ingress.options(num_replicas=args.ingress_replicas,
                           max_ongoing_requests=args.images_held() + args.max_queued_requests,
                           max_queued_requests=args.max_queued_requests, backpressure_config=overload,
                           ).bind(sampler, catalog, args, key and key.key_id, signer)


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
    print(f"serving {models} at http://{host}:{port}  (POST /v1/generate, POST /v1/edit, POST /v1/detect, GET /v1/models, "
          f"GET /healthz, docs at /docs); watermark key {key.key_id if key else 'off'}", flush=True)
    import signal
    import threading

    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # replicas drain their in-flight requests (graceful_shutdown_timeout_s) first

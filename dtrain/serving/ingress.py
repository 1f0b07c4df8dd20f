"""One replica of the serving ingress: what only it can do. The HTTP routes are in dtrain.serving.app
and dtrain.serving.job_routes (they reach the replica by dtrain.serving.dependencies); what a request
means is planned by dtrain.serving.planning; the Serve deployment is dtrain.serving.app.Ingress."""
from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import random
import time
from typing import Any, Callable, Optional

from fastapi import HTTPException, Response
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle

from dtrain.images import png_bytes
from dtrain.provenance import Ingredient, ProvenanceSigner
from dtrain.regions import RegionSpec
from dtrain.serving import planning
from dtrain.serving.auth import BearerAuth
from dtrain.serving.config import ServeArgs, TenantPolicy
from dtrain.serving.metrics import IngressMetrics
from dtrain.serving.planning import Plan, PlanError, Unsupported
from dtrain.serving.policy import InputPolicy
from dtrain.serving.schemas import EditRequest, EditResponse, GenerateRequest, GenerateResponse, field_loc, region_data
from dtrain.serving.tenancy import PriorityGate, Quotas
from dtrain.serving.uploads import Upload, decode_upload

logger = logging.getLogger("ray.serve")


class IngressReplica:
    """What only a replica of the ingress can do: hold the sampler handle, the state store (jobs, quotas and
    the response cache, shared by every replica: dtrain.serving.store) and the tokens, admit work to the
    samplers through its priority gate (by tier), run and heartbeat its jobs, count the requests in flight,
    sign responses. The routes reach it by the `IngressDep` dependency."""

    def __init__(self, sampler: DeploymentHandle, catalog: dict, args: ServeArgs,
                 watermark_key_id: Optional[str], signer: Optional[ProvenanceSigner] = None):
        self.sampler, self.catalog, self.args = sampler, catalog, args
        self.store = args.store_spec().open(_app_name())
        self.jobs: dict[str, asyncio.Task] = {}  # this replica's running jobs (held, or the loop may drop them)
        self.beating: Optional[asyncio.Task] = None
        self.key_id, self.signer = watermark_key_id, signer
        self.specs = args.models  # resolved: name -> ModelSpec
        self.auth = BearerAuth(args.auth_tokens_file, args.auth_tokens_env)
        self.metrics = IngressMetrics(next(iter(catalog)))
        self.in_flight = 0
        self.gate = PriorityGate(args.admit_images or args.images_held())
        self.quotas = Quotas(self.store.limits_storage())
        self.policy = InputPolicy(args.deny_classes, args.deny_words, args.deny_patterns)
        logger.info(f"ingress for {sorted(catalog)}: auth {'on' if self.auth.enabled else 'off'}, "
                    f"watermark {self.key_id or 'off'}, provenance {'signed' if signer else 'off'}")

    def refuse(self, status: int, reason: str, detail: Any, headers: Optional[dict] = None) -> HTTPException:
        self.metrics.refusals.inc(tags={"reason": reason})
        return HTTPException(status_code=status, detail=detail, headers=headers)

    def invalid(self, field: str, msg: str) -> HTTPException:
        """422 at a body field, as FastAPI's own: "regions.objects[1].class_label" is at
        ["body", "regions", "objects", 1, "class_label"], and the message starts with the field."""
        loc = ["body", *field_loc(field)]
        msg = msg if len(loc) == 2 else f"{field}: {msg}"
        return self.refuse(422, "invalid", [{"loc": loc, "msg": msg, "type": "value_error"}])

    def authorize(self, creds: Optional[HTTPAuthorizationCredentials]) -> str:
        """The caller's tenant (who owns its jobs); 401 for a missing or unknown token."""
        token = creds.credentials if creds else None
        if not self.auth.allows(token):
            raise self.refuse(401, "unauthorized", "unauthorized", {"WWW-Authenticate": "Bearer"})
        return self.auth.tenant(token)

    def overloaded(self, reason: str) -> HTTPException:
        return self.refuse(503, reason, f"{reason}: retry later", {"Retry-After": str(self.args.retry_after_s)})

    async def call(self, method: str, *args: Any, model_id: str = "", timeout_s: Optional[float] = None) -> Any:
        """A sampler call bounded by the request timeout; a replica that died mid-call is retried once
        on another (samples depend on their seeds only, so a retry returns the same images)."""
        handle = getattr(self.sampler.options(multiplexed_model_id=model_id), method)
        for attempt in range(2):
            response = handle.remote(*args)
            try:
                return await asyncio.wait_for(response, timeout_s or self.args.request_timeout_s)
            except asyncio.TimeoutError:
                response.cancel()
                raise self.overloaded("timeout") from None
            except BackPressureError:
                raise self.overloaded("overloaded") from None
            except RayActorError:
                if attempt:
                    raise self.overloaded("replica_lost") from None
                logger.warning("a sampler replica died during a request: retrying it on another")

    async def sample(self, plan: Plan, tenant: str, timeout_s: Optional[float] = None) -> Any:
        """The plan's images from a sampler, once the priority gate admits them (by the tenant's tier; a
        region request's images count as the plain images their NFE is worth, `Job.cost`)."""
        timeout_s = timeout_s or self.args.request_timeout_s
        images, start = plan.job.cost, time.monotonic()
        try:
            await asyncio.wait_for(self.gate.acquire(self._policy(tenant).tier, images), timeout_s)
        except asyncio.TimeoutError:
            raise self.overloaded("timeout") from None
        try:
            left = max(0.001, timeout_s - (time.monotonic() - start))
            return await self.call("__call__", plan.job, model_id=plan.model_id, timeout_s=left)
        finally:
            self.gate.release(images)

    def _policy(self, tenant: str) -> TenantPolicy:
        return self.args.tenants.get(tenant, self.args.default_tenant)

    async def state(self, op: Callable, *args: Any) -> Any:
        """A state store operation, in a thread (it blocks); a store that fails is a 503, never a 500."""
        try:
            return await asyncio.to_thread(op, *args)
        except self.store.errors:
            logger.exception("the state store failed")
            raise self.overloaded("state_store") from None

    def own(self, job_id: str, task: asyncio.Task) -> None:
        """Hold a job's task while it runs, and keep its heartbeat going."""
        self.jobs[job_id] = task
        task.add_done_callback(lambda _: self.jobs.pop(job_id, None))
        if self.beating is None or self.beating.done():
            self.beating = asyncio.ensure_future(self._heartbeats())

    async def _heartbeats(self) -> None:
        """While this replica runs jobs, four heartbeats per timeout for them, and a cleanup: jobs of dead
        replicas fail, expired ones go, even when no one asks for them."""
        while self.jobs:
            await asyncio.sleep(self.args.job_heartbeat_timeout_s / 4)
            try:
                await asyncio.to_thread(self.store.heartbeat, list(self.jobs))
                await asyncio.to_thread(self.store.cleanup)
            except self.store.errors:
                logger.warning("the state store failed a heartbeat", exc_info=True)

    async def check_quota(self, tenant: str, images: int) -> None:
        per_minute = self._policy(tenant).images_per_minute
        wait = per_minute and await self.state(self.quotas.take, tenant, per_minute, images)
        if wait is not None:
            logger.info(f"refused: tenant {tenant!r}, {images} image(s): quota")
            raise self.refuse(429, "quota", {"code": "quota", "message": f"over the quota of {tenant}: retry "
                                             f"after {wait} s"}, {"Retry-After": str(wait)})

    def check_policy(self, req: GenerateRequest | EditRequest) -> None:
        """The input policy (dtrain.serving.policy), before routing or any compute: a denied class or
        prompt is refused with 400 and a reason code, counted, and logged with the field and the rule
        that refused it only (never the token, the prompt or the body)."""
        name = req.model or next(iter(self.specs))
        refusal = self.policy.check(name, req)
        if refusal is not None:
            logger.info(f"refused: model {name!r}, {refusal.field} by {refusal.rule}: {refusal.code}")
            raise self.refuse(400, refusal.code, {"code": refusal.code, "field": refusal.field,
                                                  "message": refusal.message})

    def plan(self, req: GenerateRequest) -> Plan:
        """Route and check a request against the version that will serve it (dtrain.serving.planning),
        at this replica's load; 422 naming the field that does not fit."""
        try:
            return planning.plan(req, self.specs, self.catalog, max_steps=self.args.max_steps,
                                 max_images=self.args.max_images, in_flight=self.in_flight, draw=random.random)
        except PlanError as e:
            raise self.invalid(e.field, e.msg) from None

    def model_version(self, model: Optional[str], version: Optional[str]) -> tuple[str, str]:
        """The model and version a request names (default: the first model, its default version); 422
        for an unknown one."""
        try:
            name = planning.model_name(self.specs, model)
            return name, planning.known_version(self.specs, name, version or self.specs[name].default)
        except PlanError as e:
            raise self.invalid(e.field, e.msg) from None

    async def generate(self, req: GenerateRequest, response: Response, tenant: str) -> GenerateResponse:
        """A request answered in full: input policy, plan, quota, then the cache or the samplers."""
        started = time.perf_counter()
        self.check_policy(req)
        self.in_flight += 1  # this request included: what the spike fallback's threshold counts
        try:
            plan = self.plan(req)
            await self.check_quota(tenant, plan.job.cost)
            # everything the bytes depend on: the version's checkpoint and every generation parameter
            # (the job: class, prompt and negative prompt or regions and their method, seeds, sampler,
            # steps, guidance)
            key = (self.args.models[plan.name].versions[plan.version], plan.fallback, plan.job, self.key_id)
            return await self.cached(key, response, GenerateResponse, lambda: self.answer_from(plan, tenant, started))
        finally:
            self.in_flight -= 1

    def plan_edit(self, req: EditRequest) -> tuple[Plan, Upload]:
        """An edit routed and checked (dtrain.serving.planning.plan_edit), its image and mask decoded against
        the version's shape within the deployment's bounds (dtrain.serving.uploads): 422 naming the field
        that does not fit, 400 `unsupported` for a version that cannot edit. Returns the plan and the image
        as sent (the manifest's parent ingredient)."""
        limit = self.args.max_image_chars
        try:
            # routed first (a canary share drawn here): the image is read against the version that will edit it
            name, version, _ = planning.route(req, self.specs, 0, random.random)
            info = self.catalog[name][version]
            shape = (info["channels"], info["image_size"], info["image_size"])
            if "unsupported" in (info.get("edit") or {}):
                raise Unsupported(f"{name}/{version} cannot edit images: {info['edit']['unsupported']}")
            source = decode_upload(req.image, "image", shape, limit)
            mask = None if req.mask is None else decode_upload(req.mask, "mask", (1, *shape[1:]), limit).pixels.tobytes()
            plan = planning.plan_edit(req.model_copy(update={"model": name, "version": version}), self.specs,
                                      self.catalog, source.pixels.tobytes(), mask, max_steps=self.args.max_steps,
                                      watermark=self.key_id is not None and self.args.watermark_edits,
                                      draw=random.random)
        except PlanError as e:
            raise self.invalid(e.field, e.msg) from None
        except Unsupported as e:
            raise self.refuse(400, "unsupported", {"code": "unsupported", "message": str(e)}) from None
        return plan, source

    async def edit(self, req: EditRequest, response: Response, tenant: str) -> EditResponse:
        """An edit answered in full: input policy, plan (the image decoded), quota, then the cache or the
        samplers; the answer signed with the image sent as its parent ingredient."""
        started = time.perf_counter()
        self.check_policy(req)
        self.in_flight += 1
        try:
            plan, source = self.plan_edit(req)
            await self.check_quota(tenant, plan.job.cost)
            # the job holds the source's pixels; the file as sent is the manifest's ingredient, so it keys too
            key = (self.args.models[plan.name].versions[plan.version], "edit", plan.job,
                   hashlib.sha256(source.data).digest(), self.key_id)
            return await self.cached(key, response, EditResponse,
                                     lambda: self.answer_from(plan, tenant, started, source))
        finally:
            self.in_flight -= 1

    async def cached(self, key: tuple, response: Response, kind: type, compute):
        """The response cache's answer for `key`, or compute()'s (an awaitable factory), stored in the state
        store (shared by every ingress replica) as the response's JSON, under a digest of the key's repr (plain
        values and frozen dataclasses: the same in every process, unlike hash() or a pickle's memo); X-Cache and
        the cache metric say which."""
        if not self.args.cache_entries:
            return await compute()
        digest = hashlib.sha256(repr(key).encode("utf-8", "surrogatepass")).hexdigest()
        raw = await self.state(self.store.cache_get, digest)
        self.metrics.cache.inc(tags={"result": "miss" if raw is None else "hit"})
        response.headers["X-Cache"] = "miss" if raw is None else "hit"
        if raw is not None:
            return kind.model_validate_json(raw)
        answer = await compute()
        try:
            await asyncio.to_thread(self.store.cache_put, digest, answer.model_dump_json().encode(),
                                    self.args.cache_ttl_s, self.args.cache_entries)
        except self.store.errors:  # computed: answered, uncached
            logger.warning("the state store failed to cache a response", exc_info=True)
        return answer

    async def answer_from(self, plan: Plan, tenant: str, started: float, source: Upload | None = None):
        """The plan's images sampled and answered: an edit's (with its source) or a generation's."""
        images = await self.sample(plan, tenant)
        if source is not None:
            return await self.answer_edit(plan, images, source, started)
        return await self.answer(plan, images, started)

    async def answer_edit(self, plan: Plan, images: Any, source: Upload, started: float) -> EditResponse:
        """The response to an edit: its PNG, signed last with a manifest recording the edit and naming the
        image sent as its parent ingredient (c2pa.opened, then c2pa.edited)."""
        job, info, e = plan.job, plan.info, plan.job.edit
        encoding = time.perf_counter()
        png = png_bytes(images[0])
        key_id = self.key_id if e.watermark else None
        if self.signer is not None:
            signing = time.perf_counter()
            how = {"model": plan.name, "version": plan.version, "stage": info["stage"],
                   "lineage": {"parent": info["parent"], "teacher": info["teacher"]}, "sampler": job.sampler,
                   "steps": job.steps, "guidance": job.guidance, **condition_record(job),
                   "edit": edit_record(job, source), "nfe": job.nfe, "watermark_key_id": key_id}
            parent = Ingredient(source.data, source.mime, fallback=png_bytes(_hwc(source.pixels)))
            png = await asyncio.to_thread(self.signer.sign_png, png, how, f"dtrain {plan.name} edit", parent)
            self.metrics.stage_seconds.observe(time.perf_counter() - signing, tags={"stage": "sign"})
        done = time.perf_counter()
        self.metrics.stage_seconds.observe(done - encoding, tags={"stage": "encode"})
        self.metrics.stage_seconds.observe(done - started, tags={"stage": "total"})
        return EditResponse(model=plan.name, version=plan.version, stage=info["stage"], prompt=job.prompt,
                            source_prompt=e.source_prompt, class_label=job.class_label, source_class=e.source_class,
                            strength=e.strength, steps=job.steps, guidance=job.guidance, scheme=e.scheme,
                            mask=e.mask is not None, attention_replace=e.attention_replace, nfe=job.nfe,
                            watermark_key_id=key_id, image=base64.b64encode(png).decode())

    async def answer(self, plan: Plan, images: Any, started: float) -> GenerateResponse:
        """The response for a plan's images: PNGs, signed last (nothing may change the bytes after)."""
        job, info = plan.job, plan.info
        encoding = time.perf_counter()
        pngs = [png_bytes(img) for img in images]
        if self.signer is not None:
            signing = time.perf_counter()
            how = {"model": plan.name, "version": plan.version, "stage": info["stage"],
                   "lineage": {"parent": info["parent"], "teacher": info["teacher"]}, "sampler": job.sampler,
                   "steps": job.steps, "guidance": job.guidance, **condition_record(job),
                   "watermark_key_id": self.key_id}
            pngs = await asyncio.to_thread(lambda: [self.signer.sign_png(png, {**how, "seed": seed}, f"dtrain {plan.name}")
                                                    for png, seed in zip(pngs, job.seeds)])
            self.metrics.stage_seconds.observe(time.perf_counter() - signing, tags={"stage": "sign"})
        pngs = [base64.b64encode(png).decode() for png in pngs]
        done = time.perf_counter()
        self.metrics.stage_seconds.observe(done - encoding, tags={"stage": "encode"})
        self.metrics.stage_seconds.observe(done - started, tags={"stage": "total"})
        return GenerateResponse(model=plan.name, version=plan.version, stage=info["stage"], fallback=plan.fallback,
                                class_label=job.class_label, prompt=job.prompt,
                                negative_prompt=job.negative_prompt,
                                regions=job.regions and region_data(job.regions), region_method=job.region_method,
                                sampler=job.sampler, steps=job.steps, guidance=job.guidance, nfe=job.nfe,
                                seeds=list(job.seeds), watermark_key_id=self.key_id, images=pngs)


def _app_name() -> str:
    """The Serve app this replica serves (its state's name); "dtrain" for the app run in a plain process."""
    try:
        return serve.get_replica_context().app_name
    except RayServeException:
        return "dtrain"


def condition_record(job: planning.Job) -> dict:
    """What an image was conditioned on, for its provenance record: a class model's class_label, or a
    text model's prompt, or the regions (background and objects with their boxes, as the request gave
    them) and their method; and a text model's negative prompt, where one was given."""
    negative = {} if job.negative_prompt is None else {"negative_prompt": job.negative_prompt}
    if job.regions is not None:
        return {"regions": region_record(job.regions), "region_method": job.region_method, **negative}
    if job.prompt is None:
        return {"class_label": job.class_label}
    return {"prompt": job.prompt, **negative}


def edit_record(job: planning.Job, source: Upload) -> dict:
    """An edit's parameters for its provenance record (numbers in objects, never arrays: see region_record),
    and the image it was made from, by its SHA-256, type and size (the manifest's ingredient is that image)."""
    e = job.edit
    cond = {"source_prompt": e.source_prompt} if e.source_prompt is not None else {"source_class": e.source_class}
    return {"strength": e.strength, "scheme": e.scheme, **cond, "mask": e.mask is not None,
            "attention_replace": e.attention_replace,
            "source": {"sha256": hashlib.sha256(source.data).hexdigest(), "format": source.mime,
                       "bytes": len(source.data)}}


def _hwc(pixels) -> Any:
    """uint8 [C, H, W] -> what png_bytes takes: [H, W] or [H, W, C]."""
    return pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)


def region_record(spec: RegionSpec) -> dict:
    """The regions as the request gave them, but each box as {x0, y0, x1, y1}: C2PA (c2pa 0.38) stores
    a JSON array of numbers as bytes, so [0.0, 0.5, 1.0, 1.0] would come back as "" (dtrain.provenance
    refuses to sign one)."""
    data = region_data(spec)
    for o in data["objects"]:
        o["box"] = dict(zip(("x0", "y0", "x1", "y1"), o["box"]))
    return data

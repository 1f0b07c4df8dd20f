"""Routes of asynchronous jobs: the body of /v1/generate answered at once with a job id, then the job's
state, its cancellation and its progress as server-sent events. Every job's record is in the app's state
store (dtrain.serving.store), the replicas' side in dtrain.serving.jobs; the app includes `router` behind
its bearer auth."""
# No `from __future__ import annotations` here: FastAPI must see the real request types.
import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException
from fastapi import Path as FPath
from fastapi.responses import StreamingResponse

from dtrain.diffusion.samplers import nfe
from dtrain.serving.dependencies import IngressDep, Tenant
from dtrain.serving.ingress import IngressReplica
from dtrain.serving.jobs import Cancelled, follow, public, step
from dtrain.serving.planning import Plan
from dtrain.serving.schemas import GenerateRequest, JobState

logger = logging.getLogger("ray.serve")
JOB_ID = r"^[0-9a-f]{32}$"
JobId = Annotated[str, FPath(pattern=JOB_ID)]
UNKNOWN = {404: {"description": "Unknown or expired"}}
REPLICA_LOST = "replica_lost: its sampler replica died, and so did the one it was retried on"

router = APIRouter()


def _no_job() -> HTTPException:
    return HTTPException(404, {"code": "unknown_job", "message": "no such job, or its result has expired"})


@router.post("/v1/jobs", status_code=202, response_model=JobState,
             responses={400: {"description": "Refused by the input policy: detail.code says why"},
                        401: {"description": "Missing or unknown bearer token"},
                        429: {"description": "Over the tenant's quota: retry after Retry-After seconds"},
                        503: {"description": "Too many jobs kept: retry after Retry-After seconds"}})
async def submit_job(req: GenerateRequest, owner: Tenant, ingress: IngressDep) -> dict:
    """Start a generation (the body of /v1/generate) and answer at once with its job id. Poll
    GET /v1/jobs/{id}, follow GET /v1/jobs/{id}/events, cancel with DELETE /v1/jobs/{id}."""
    ingress.check_policy(req)
    plan = ingress.plan(req)
    await ingress.check_quota(owner, plan.job.cost)
    job_id = uuid.uuid4().hex
    job = dataclasses.replace(plan.job, job_id=job_id)
    state = await ingress.state(ingress.store.create_job, job_id, owner, job.steps, nfe(job.sampler, job.steps, 1.0),
                                ingress.args.max_jobs)
    if state is None:
        raise ingress.overloaded("jobs_full")
    ingress.own(job_id, asyncio.ensure_future(run_job(ingress, dataclasses.replace(plan, job=job), owner)))
    return public(state, False)


async def run_job(ingress: IngressReplica, plan: Plan, tenant: str) -> None:
    """A job's generation, to its end in the store: done (with the response), cancelled or failed. A
    sampler replica that dies under it is replaced by another once (IngressReplica.call)."""
    job, started = plan.job, time.perf_counter()
    calls = nfe(job.sampler, job.steps, 1.0)
    end = dict(calls_done=None, result=None, error=None, cancel=None)
    try:
        out = await ingress.sample(plan, tenant, timeout_s=ingress.args.job_timeout_s)
        if isinstance(out, Cancelled):
            state, end["calls_done"] = "cancelled", out.last_call
            end["cancel"] = {"seen_at_step": step(out.seen_at_call, job.steps, calls),
                             "last_step": step(out.last_call, job.steps, calls)}
        else:
            answer = await ingress.answer(plan, out, started)
            state, end["calls_done"], end["result"] = "done", calls, answer.model_dump(mode="json")
    except HTTPException as e:
        detail = str(e.detail)
        state, end["error"] = "failed", REPLICA_LOST if detail.startswith("replica_lost") else detail
    except Exception:
        logger.exception(f"job {job.job_id} failed")
        state, end["error"] = "failed", "internal error"
    try:
        await asyncio.to_thread(ingress.store.finish_job, job.job_id, state, **end)
    except ingress.store.errors:  # the job fails by its heartbeat instead, once this replica stops beating for it
        logger.exception(f"job {job.job_id}: its end ({state}) could not be stored")


async def _get(ingress: IngressReplica, job_id: str, owner: str, with_result: bool = True) -> dict:
    rec = await ingress.state(ingress.store.get_job, job_id, owner, with_result)
    if rec is None:
        raise _no_job()
    return public(rec, with_result)


@router.get("/v1/jobs/{job_id}", response_model=JobState, responses=UNKNOWN)
async def job(job_id: JobId, owner: Tenant, ingress: IngressDep) -> dict:
    """The job's state and progress; once done, its images (until `job_ttl_s` after it finished)."""
    return await _get(ingress, job_id, owner)


@router.delete("/v1/jobs/{job_id}", response_model=JobState, responses=UNKNOWN)
async def cancel_job(job_id: JobId, owner: Tenant, ingress: IngressDep) -> dict:
    """Cancel a queued or running job: a running one stops computing at its next network call, while
    the rest of its batch runs on. A finished job is left as it is."""
    rec = await ingress.state(ingress.store.cancel_job, job_id, owner)
    if rec is None:
        raise _no_job()
    return public(rec, False)


@router.get("/v1/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, **UNKNOWN})
async def job_events(job_id: JobId, owner: Tenant, ingress: IngressDep) -> StreamingResponse:
    """Server-sent events: `progress` as the job's steps advance (at most every 50 ms), then one
    of `done`, `cancelled` or `failed` (fetch the images with GET /v1/jobs/{id}), and the stream ends."""
    first = await _get(ingress, job_id, owner, False)

    async def read():
        try:
            return await _get(ingress, job_id, owner, False)
        except HTTPException as e:
            if e.status_code == 404:
                return None  # expired: the stream ends
            raise  # the store failed this time: follow() asks again

    return StreamingResponse(follow(read, first), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

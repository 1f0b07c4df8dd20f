"""Routes of asynchronous jobs: the body of /v1/generate answered at once with a job id, then the job's
state, its cancellation and its progress as server-sent events. The board that keeps every job's state
and the replicas' side are in dtrain.serving.jobs; the app includes `router` behind its bearer auth."""
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
from dtrain.serving.jobs import Cancelled, follow
from dtrain.serving.planning import Plan
from dtrain.serving.schemas import GenerateRequest, JobState

logger = logging.getLogger("ray.serve")
JOB_ID = r"^[0-9a-f]{32}$"
JobId = Annotated[str, FPath(pattern=JOB_ID)]
UNKNOWN = {404: {"description": "Unknown or expired"}}

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
    ingress.check_quota(owner, plan.job.cost)
    job_id = uuid.uuid4().hex
    job = dataclasses.replace(plan.job, job_id=job_id)
    if not await ingress.board.create.remote(job_id, owner, job.steps, nfe(job.sampler, job.steps, 1.0)):
        raise ingress.overloaded("jobs_full")
    task = asyncio.ensure_future(run_job(ingress, dataclasses.replace(plan, job=job), owner))
    ingress.jobs.add(task)  # held, or the loop may drop the task
    task.add_done_callback(ingress.jobs.discard)
    return await ingress.board.get.remote(job_id, owner, False)


async def run_job(ingress: IngressReplica, plan: Plan, tenant: str) -> None:
    """A job's generation, to its end on the board: done (with the response), cancelled or failed."""
    job_id, started = plan.job.job_id, time.perf_counter()
    try:
        out = await ingress.sample(plan, tenant, timeout_s=ingress.args.job_timeout_s)
        if isinstance(out, Cancelled):
            await ingress.board.finish.remote(job_id, "cancelled", cancelled=out)
        else:
            answer = await ingress.answer(plan, out, started)
            await ingress.board.finish.remote(job_id, "done", result=answer.model_dump())
    except HTTPException as e:
        await ingress.board.finish.remote(job_id, "failed", error=str(e.detail))
    except Exception:
        logger.exception(f"job {job_id} failed")
        await ingress.board.finish.remote(job_id, "failed", error="internal error")


@router.get("/v1/jobs/{job_id}", response_model=JobState, responses=UNKNOWN)
async def job(job_id: JobId, owner: Tenant, ingress: IngressDep) -> dict:
    """The job's state and progress; once done, its images (until `job_ttl_s` after it finished)."""
    state = await ingress.board.get.remote(job_id, owner)
    if state is None:
        raise _no_job()
    return state


@router.delete("/v1/jobs/{job_id}", response_model=JobState, responses=UNKNOWN)
async def cancel_job(job_id: JobId, owner: Tenant, ingress: IngressDep) -> dict:
    """Cancel a queued or running job: a running one stops computing at its next network call, while
    the rest of its batch runs on. A finished job is left as it is."""
    state = await ingress.board.cancel.remote(job_id, owner)
    if state is None:
        raise _no_job()
    return state


@router.get("/v1/jobs/{job_id}/events", responses={200: {"content": {"text/event-stream": {}}}, **UNKNOWN})
async def job_events(job_id: JobId, owner: Tenant, ingress: IngressDep) -> StreamingResponse:
    """Server-sent events: `progress` as the job's steps advance (at most every 50 ms), then one
    of `done`, `cancelled` or `failed` (fetch the images with GET /v1/jobs/{id}), and the stream ends."""
    first = await ingress.board.get.remote(job_id, owner, False)
    if first is None:
        raise _no_job()
    return StreamingResponse(follow(ingress.board, job_id, owner, first), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})

"""Asynchronous generation jobs: their public state, and the per-row control a sampler replica runs a batch
under.

A job is a /v1/generate request that answers at once with an id. The ingress runs it on the sampler
deployment like any request (so it batches with the others); its record is in the app's state store
(dtrain.serving.store), which every replica reads and writes: the ingress creates it and ends it, and while it
runs the sampler replica reports its progress there every WATCH_S and learns of a cancellation from the same
report; from the next network call on, the cancelled job's images are no longer computed while the rest of
their batch runs on (`LiveRows`, `generation.solve(live=...)`). Heartbeats (the ingress that owns a job, the
sampler's reports) fail a job whose replicas died, within the store's `heartbeat_timeout_s`.

No job board deployment: it held the jobs in one replica's memory, where they died with it; with the state in
the store every replica reaches it directly, and a board in front would only add a hop and a replica to lose.
Not Ray Serve's task consumers (async inference) either: they take a Celery broker beside every deployment
even on one machine, and their tasks report neither per-step progress nor a cancellation that stops a batch's
rows mid-sample, which is what a job here is for.
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Awaitable, Callable, Optional

import torch

from dtrain.serving.store import FINISHED, Store

logger = logging.getLogger("ray.serve")
WATCH_S = 0.05  # a replica reports progress (and so learns of a cancellation) this often while a job runs
KEEPALIVE_S = 15.0  # an event stream with nothing new sends a comment this often


@dataclass
class Cancelled:
    """What the sampler returns for a job cancelled while it ran: the network call at which the
    replica learnt of the cancellation, and the last call that still computed the job."""
    seen_at_call: int
    last_call: int


def step(calls: int, steps: int, total_calls: int) -> int:
    """Sampler steps done after `calls` of the job's `total_calls` network calls (Heun's take two a step)."""
    return min(steps, calls * steps // max(1, total_calls))


def public(rec: dict, with_result: bool = True) -> dict:
    """A job's record in the store as its tenant sees it (schemas.JobState)."""
    out = {"job_id": rec["job_id"], "state": rec["state"], "step": step(rec["calls_done"], rec["steps"], rec["calls"]),
           "steps": rec["steps"], "created_at": rec["created_at"], "finished_at": rec["finished_at"],
           "version": rec["version"]}
    for f in ("error", "cancel"):
        if rec[f]:
            out[f] = rec[f]
    if with_result and rec.get("result") is not None:
        out["result"] = rec["result"]
    return out


class LiveRows:
    """Which images of one model call are still wanted, asked before every network call from the
    compute thread (`generation.solve(live=self)`); `cancel` comes from the replica's event loop. A
    job cancelled at call c is computed at most once more (a call that had already begun)."""

    def __init__(self, job_rows: list[tuple[Optional[str], int]]):
        self.rows = job_rows  # (job id or None, its images), in batch order
        self.mask = torch.ones(sum(n for _, n in job_rows), dtype=torch.bool)
        self.calls = 0
        self.live_jobs = {j for j, _ in job_rows if j is not None}
        self.last_live: dict[str, int] = {}
        self.seen_at: dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self) -> torch.Tensor:
        with self._lock:
            self.calls += 1
            for j in self.live_jobs:
                self.last_live[j] = self.calls
            return self.mask

    def cancel(self, job_ids: list[str]) -> None:
        with self._lock:
            fresh = [j for j in job_ids if j in self.live_jobs]
            for j in fresh:
                self.seen_at[j] = self.calls
                self.live_jobs.discard(j)
            if fresh:
                keep = torch.cat([torch.full((n,), j not in self.seen_at) for j, n in self.rows])
                self.mask = keep

    def progress(self) -> dict[str, int]:
        """Network calls so far of each job still computed."""
        with self._lock:
            return {j: self.last_live.get(j, 0) for j in self.live_jobs}

    def outcome(self, job_id: Optional[str]) -> Optional[Cancelled]:
        if job_id in self.seen_at:
            return Cancelled(self.seen_at[job_id], self.last_live.get(job_id, 0))
        return None


async def watch_while(store: Store, replica: str, rows: LiveRows, compute: asyncio.Future) -> None:
    """Report `rows`' progress to the store every WATCH_S until `compute` is done, taking the jobs to stop."""
    while not compute.done():
        progress = rows.progress()
        if not progress:
            return  # every job of the call is stopped: nothing left to report
        try:
            rows.cancel(await asyncio.to_thread(store.report, progress, replica))
        except store.errors:  # the store is down: the jobs still finish, unreported
            logger.warning("sampler: the state store failed a progress report", exc_info=True)
        await asyncio.wait([compute], timeout=WATCH_S)  # the next report, or the end of the call


def _event(state: dict) -> str:
    kind = "progress" if state["state"] not in FINISHED else state["state"]
    return f"id: {state['version']}\nevent: {kind}\ndata: {json.dumps(state)}\n\n"


async def follow(read: Callable[[], Awaitable[Optional[dict]]], state: dict) -> AsyncIterator[str]:
    """A job's server-sent events from `state` on: one per change seen by `read` (the job's public state,
    polled every WATCH_S), until it finishes (or expires)."""
    yield _event(state)
    quiet = 0.0
    while state["state"] not in FINISHED:
        await asyncio.sleep(WATCH_S)
        try:
            nxt = await read()
        except Exception:  # the store failed this poll: ask again at the next
            nxt = state
        if nxt is None:
            return
        if nxt["version"] == state["version"]:
            quiet += WATCH_S
            if quiet >= KEEPALIVE_S:
                quiet = 0.0
                yield ": still running\n\n"  # a comment keeps proxies from closing an idle stream
            continue
        state, quiet = nxt, 0.0
        yield _event(state)

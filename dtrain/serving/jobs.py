"""Asynchronous generation jobs: a board that holds every job's state, and the per-row control a
sampler replica runs a batch under.

A job is a /v1/generate request that answers at once with an id. The ingress runs it on the sampler
deployment like any request (so it batches with the others); the replica reports each job's progress
to the board and learns of a cancellation by a long poll (`JobBoard.watch`), which returns the moment
a job is cancelled; from the next network call on, the cancelled job's images are no longer computed
while the rest of their batch runs on (`LiveRows`, `generation.solve(live=...)`).

Why not Ray Serve's task consumers: they need a Celery broker (Redis, RabbitMQ) that would have to
run beside every deployment; a job here lives for minutes, and the board is one Serve replica of the
same app, so it comes and goes with it. Its state is in memory: jobs die with the board's replica.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import torch
from ray import serve

ACTIVE, FINISHED = ("queued", "running"), ("done", "cancelled", "failed")
WATCH_S = 0.05  # a replica reports progress at least this often while a job runs


@dataclass
class Cancelled:
    """What the sampler returns for a job cancelled while it ran: the network call at which the
    replica learnt of the cancellation, and the last call that still computed the job."""
    seen_at_call: int
    last_call: int


@dataclass
class _Record:
    job_id: str
    owner: str
    steps: int
    calls: int  # network calls of the whole job (steps, Heun's second evaluations)
    created_at: float = field(default_factory=time.time)
    state: str = "queued"
    calls_done: int = 0
    cancel_requested: bool = False
    finished_at: Optional[float] = None
    result: Optional[dict] = None
    error: Optional[str] = None
    cancel: Optional[dict] = None
    version: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def step(self, calls: int) -> int:
        return min(self.steps, calls * self.steps // max(1, self.calls))

    def public(self, with_result: bool = True) -> dict:
        out = {"job_id": self.job_id, "state": self.state, "step": self.step(self.calls_done), "steps": self.steps,
               "created_at": self.created_at, "finished_at": self.finished_at, "version": self.version}
        if self.error:
            out["error"] = self.error
        if self.cancel:
            out["cancel"] = self.cancel
        if with_result and self.result is not None:
            out["result"] = self.result
        return out


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000)
class JobBoard:
    """Every job's state, for `ttl_s` after it finishes; at most `max_jobs` kept."""

    def __init__(self, ttl_s: float, max_jobs: int):
        self.ttl_s, self.max_jobs = ttl_s, max_jobs
        self.jobs: dict[str, _Record] = {}

    def _purge(self) -> None:
        now = time.time()
        for job_id in [j for j, r in self.jobs.items() if r.finished_at and now - r.finished_at > self.ttl_s]:
            del self.jobs[job_id]

    def _mine(self, job_id: str, owner: str) -> Optional[_Record]:
        self._purge()
        r = self.jobs.get(job_id)
        return r if r is not None and r.owner == owner else None  # another tenant's job does not exist

    @staticmethod
    def _changed(r: _Record) -> None:
        r.version += 1
        r.changed.set()
        r.changed = asyncio.Event()  # waiters hold the one just set

    async def create(self, job_id: str, owner: str, steps: int, calls: int) -> bool:
        """Register a queued job; False when the board is full."""
        self._purge()
        if len(self.jobs) >= self.max_jobs:
            return False
        self.jobs[job_id] = _Record(job_id, owner, steps, calls)
        return True

    async def get(self, job_id: str, owner: str, with_result: bool = True) -> Optional[dict]:
        r = self._mine(job_id, owner)
        return r and r.public(with_result)

    async def cancel(self, job_id: str, owner: str) -> Optional[dict]:
        """Cancel a queued or running job (a running one stops at its replica's next network call);
        a finished job is left as it is."""
        r = self._mine(job_id, owner)
        if r is None:
            return None
        if r.state in ACTIVE and not r.cancel_requested:
            r.cancel_requested = True
            if r.state == "queued":  # not on a replica yet: it never will compute
                r.state, r.finished_at, r.cancel = "cancelled", time.time(), {"seen_at_step": 0, "last_step": 0}
            self._changed(r)
        return r.public(with_result=False)

    async def watch(self, progress: dict[str, int]) -> list[str]:
        """A replica's long poll while it computes jobs: record their network calls so far, and return
        the ones cancelled, as soon as one is (or after WATCH_S with none)."""
        records = [self.jobs[j] for j in progress if j in self.jobs]
        for r in records:
            if r.state == "queued" or r.calls_done != progress[r.job_id]:
                r.state, r.calls_done = ("running" if r.state == "queued" else r.state), progress[r.job_id]
                self._changed(r)
        cancelled = [r.job_id for r in records if r.cancel_requested]
        if cancelled or not records:
            return cancelled
        waits = [asyncio.ensure_future(r.changed.wait()) for r in records]
        await asyncio.wait(waits, timeout=WATCH_S, return_when=asyncio.FIRST_COMPLETED)
        for w in waits:
            w.cancel()
        return [r.job_id for r in records if r.cancel_requested]

    async def finish(self, job_id: str, state: str, result: Optional[dict] = None, error: Optional[str] = None,
                     cancelled: Optional[Cancelled] = None) -> None:
        r = self.jobs.get(job_id)
        if r is None or r.state in FINISHED:
            return
        r.state, r.finished_at, r.result, r.error = state, time.time(), result, error
        if state == "done":
            r.calls_done = r.calls
        if cancelled is not None:
            r.calls_done = cancelled.last_call
            r.cancel = {"seen_at_step": r.step(cancelled.seen_at_call), "last_step": r.step(cancelled.last_call)}
        self._changed(r)

    async def next_change(self, job_id: str, owner: str, seen: int, timeout_s: float) -> Optional[dict]:
        """The job's state once its version passes `seen` (at most `timeout_s` later); None if gone."""
        r = self._mine(job_id, owner)
        if r is not None and r.version <= seen and r.state not in FINISHED:
            try:
                await asyncio.wait_for(r.changed.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
            r = self._mine(job_id, owner)
        return r and r.public(with_result=False)


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


async def watch_while(board: Any, rows: LiveRows, compute: asyncio.Future) -> None:
    """Report progress and take cancellations for `rows` until `compute` is done."""
    while not compute.done():
        progress = rows.progress()
        if not progress:
            return  # every job of the call is cancelled: nothing left to report
        try:
            cancelled = await board.watch.remote(progress)
        except Exception:  # the board is gone or busy: the jobs still finish, unreported
            await asyncio.sleep(WATCH_S)
            continue
        rows.cancel(cancelled)


def _event(state: dict) -> str:
    kind = "progress" if state["state"] not in FINISHED else state["state"]
    return f"id: {state['version']}\nevent: {kind}\ndata: {json.dumps(state)}\n\n"


async def follow(board: Any, job_id: str, owner: str, state: dict) -> AsyncIterator[str]:
    """A job's server-sent events from `state` on: one per change, until it finishes (or expires)."""
    yield _event(state)
    while state["state"] not in FINISHED:
        nxt = await board.next_change.remote(job_id, owner, state["version"], 15.0)
        if nxt is None:
            return
        if nxt["version"] == state["version"]:
            yield ": still running\n\n"  # a comment keeps proxies from closing an idle stream
            continue
        state = nxt
        yield _event(state)

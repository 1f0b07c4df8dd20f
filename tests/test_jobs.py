"""The pieces of asynchronous jobs without a cluster: the board's bookkeeping (owners, cancellation,
expiry, the replicas' long poll) and per-row cancellation inside one batched ODE solve."""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from dtrain.serving.jobs import WATCH_S, Cancelled, JobBoard, LiveRows

Board = JobBoard.func_or_class  # the class under the Serve deployment


def run(coro):
    return asyncio.run(coro)


def test_the_board_keeps_jobs_per_owner_and_cancels_queued_ones_at_once():
    async def go():
        board = Board(ttl_s=60, max_jobs=2)
        assert await board.create("a" * 32, "alice", steps=10, calls=10)
        assert await board.get("a" * 32, "bob") is None  # another tenant's job does not exist for it
        assert await board.cancel("a" * 32, "bob") is None
        state = await board.cancel("a" * 32, "alice")
        assert state["state"] == "cancelled" and state["cancel"] == {"seen_at_step": 0, "last_step": 0}
        assert await board.create("b" * 32, "alice", 10, 10)
        assert not await board.create("c" * 32, "alice", 10, 10)  # full: max_jobs kept
    run(go())


def test_a_running_job_reports_progress_and_its_cancel_reaches_the_replica_at_once():
    async def go():
        board = Board(ttl_s=60, max_jobs=10)
        await board.create("a" * 32, "x", steps=100, calls=100)
        assert await board.watch({"a" * 32: 25}) == []  # no cancel: returns after WATCH_S
        state = await board.get("a" * 32, "x")
        assert (state["state"], state["step"]) == ("running", 25)
        waiting = asyncio.ensure_future(board.watch({"a" * 32: 30}))
        await asyncio.sleep(WATCH_S / 5)
        started = time.perf_counter()
        await board.cancel("a" * 32, "x")
        assert await waiting == ["a" * 32] and time.perf_counter() - started < WATCH_S / 2  # the poll wakes
        await board.finish("a" * 32, "cancelled", cancelled=Cancelled(seen_at_call=30, last_call=31))
        state = await board.get("a" * 32, "x")
        assert state["state"] == "cancelled" and state["cancel"] == {"seen_at_step": 30, "last_step": 31}
    run(go())


def test_finished_jobs_expire_and_followers_see_every_change():
    async def go():
        board = Board(ttl_s=0.2, max_jobs=10)
        await board.create("a" * 32, "x", steps=4, calls=4)
        seen = (await board.get("a" * 32, "x"))["version"]
        follower = asyncio.ensure_future(board.next_change("a" * 32, "x", seen, 5.0))
        await asyncio.sleep(0.01)
        await board.finish("a" * 32, "done", result={"images": ["png"]})
        change = await follower
        assert change["state"] == "done" and change["version"] > seen and "result" not in change
        assert (await board.get("a" * 32, "x"))["result"] == {"images": ["png"]}
        await asyncio.sleep(0.3)
        assert await board.get("a" * 32, "x") is None  # expired
    run(go())


class CountingNet(torch.nn.Module):
    """A velocity that depends on each row alone; records the rows of every call."""
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.rows: list[int] = []

    def forward(self, x, t, c):
        self.rows.append(x.shape[0])
        return self.w * x + t.view(-1, 1, 1, 1) + c.view(-1, 1, 1, 1).float()


def test_a_cancelled_jobs_rows_stop_being_computed_while_the_rest_of_the_batch_runs_on(tiny_checkpoint):
    from dtrain.checkpoint import load_model
    from dtrain.generation import solve

    _, cfg = load_model(tiny_checkpoint)
    labels, seeds = torch.tensor([1, 1, 2, 3]), [5, 6, 7, 8]
    net = CountingNet()
    alone = solve(net, cfg, labels, seeds, steps=10, guidance=1.0)
    rows = LiveRows([("a" * 32, 2), (None, 1), ("b" * 32, 1)])
    real = rows.__call__

    def cancel_a_at_call_4():
        mask = real()
        if rows.calls == 4:
            rows.cancel(["a" * 32])
        return mask

    net.rows.clear()
    out = solve(net, cfg, labels, seeds, steps=10, guidance=1.0, live=cancel_a_at_call_4)
    assert net.rows == [4] * 4 + [2] * 6  # a's two images computed up to the call it was cancelled at
    assert torch.equal(out[2:], alone[2:])  # the others as if alone
    assert rows.outcome("a" * 32) == Cancelled(seen_at_call=4, last_call=4) and rows.outcome("b" * 32) is None
    assert rows.progress() == {"b" * 32: 10}


def test_quotas_count_images_over_a_minute_and_say_when_to_retry():
    from dtrain.serving.tenancy import Quotas

    q = Quotas()
    assert q.take("a", None, 10_000) is None  # no quota
    assert [q.take("a", 10, 4) for _ in range(3)][:2] == [None, None]
    wait = q.take("a", 10, 4)
    assert wait is not None and 1 <= wait <= 60
    assert q.take("b", 10, 4) is None  # per tenant
    assert q.take("c", 10, 11) is not None  # more than a whole minute's quota never fits


def test_the_gate_admits_waiters_by_tier_then_arrival():
    from dtrain.serving.tenancy import PriorityGate

    async def go():
        gate, order = PriorityGate(capacity=2), []

        async def request(name, tier, images=2, hold=0.01):
            await gate.acquire(tier, images)
            order.append(name)
            await asyncio.sleep(hold)
            gate.release(images)

        first = asyncio.ensure_future(request("first", "low", hold=0.05))
        await asyncio.sleep(0.01)
        tasks = [asyncio.ensure_future(request(n, t)) for n, t in
                 (("low1", "low"), ("std1", "standard"), ("low2", "low"), ("high1", "high"), ("std2", "standard"))]
        await asyncio.sleep(0)
        # one that gives up waiting leaves no hole
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(gate.acquire("high", 2), 0.01)
        await asyncio.gather(first, *tasks)
        assert order == ["first", "high1", "std1", "std2", "low1", "low2"] and gate.in_flight == 0
    run(go())

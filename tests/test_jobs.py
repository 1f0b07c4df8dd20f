"""The pieces of asynchronous jobs without a cluster: per-row cancellation inside one batched ODE solve,
the quotas' moving minute and the priority gate. The jobs' records, heartbeats and cancellations in the
state store are tests/test_serving_state.py's."""
from __future__ import annotations

import asyncio

import pytest
import torch

from dtrain.serving.jobs import Cancelled, LiveRows


def run(coro):
    return asyncio.run(coro)


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
    from limits.storage import MemoryStorage

    from dtrain.serving.tenancy import Quotas

    q = Quotas(MemoryStorage())  # the serving app's is its state store's (tests/test_serving_state.py)
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

"""Tenants of a deployment: per-tenant image quotas and priority tiers.

A tenant is named by its bearer token (`TOKEN NAME` in the tokens file, `TOKEN=NAME` in the
environment; see auth.py). A quota counts images over a moving minute (the `limits` library); a
request that would pass it gets 429 with the seconds until it fits. Tiers order the requests that wait
for the samplers: an ingress sends at most `admit_images` images to the samplers at a time, and a
freed slot goes to the highest tier waiting, first come first served within a tier.

Quotas are counted in the app's state store (dtrain.serving.store), so every ingress replica enforces the
same one; the gate is each ingress replica's own (with several, each admits its share).
"""
from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from typing import Optional

from limits import RateLimitItemPerMinute, strategies
from limits.storage import MovingWindowSupport

TIERS = {"high": 0, "standard": 1, "low": 2}  # lower is served first


class Quotas:
    """Images per tenant over a moving minute, counted in `storage` (the state store's `limits` storage:
    every Quotas on the same store shares the counts; acquiring is atomic there)."""

    def __init__(self, storage: MovingWindowSupport):
        self.limiter = strategies.MovingWindowRateLimiter(storage)

    def take(self, tenant: str, images_per_minute: Optional[int], images: int) -> Optional[int]:
        """Count `images` against the tenant's quota: None if they fit, else the seconds to wait (blocks: a
        store round trip)."""
        if images_per_minute is None:
            return None
        item = RateLimitItemPerMinute(images_per_minute)
        if images <= images_per_minute and self.limiter.hit(item, tenant, cost=images):
            return None
        reset = self.limiter.get_window_stats(item, tenant).reset_time
        return max(1, math.ceil(reset - time.time()))


class PriorityGate:
    """At most `capacity` images in flight; waiters are admitted by (tier, arrival)."""

    def __init__(self, capacity: int):
        self.capacity, self.in_flight = capacity, 0
        self.waiting: list[tuple[int, int, int, asyncio.Future]] = []
        self.order = itertools.count()

    def _admit(self) -> None:
        while self.waiting:
            _, _, images, future = self.waiting[0]
            if future.done():  # gave up waiting (timed out, disconnected)
                heapq.heappop(self.waiting)
                continue
            if self.in_flight and self.in_flight + images > self.capacity:
                return  # the head waits for room; nothing of a lower tier overtakes it
            heapq.heappop(self.waiting)
            self.in_flight += images
            future.set_result(None)

    async def acquire(self, tier: str, images: int) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self.waiting, (TIERS[tier], next(self.order), images, future))
        self._admit()
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():  # admitted just as it gave up: hand it on
                self.release(images)
            future.cancel()
            raise

    def release(self, images: int) -> None:
        self.in_flight -= images
        self._admit()

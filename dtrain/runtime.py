"""Connecting to Ray: a given cluster, or a local one started on demand (train and serve share it)."""
from __future__ import annotations

import os

import ray


def ensure_ray(address: str | None = None, num_cpus: float | None = None) -> None:
    """Connect to `address`, or start a local cluster with at least `num_cpus` logical CPUs."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)
    else:
        # "local": a new cluster of our own, even where `ray start` left one running on this machine.
        # The dashboard stays on: Ray Train V2 queries its state API to clean up placement groups.
        ray.init(address="local", num_cpus=max(num_cpus or 0, os.cpu_count() or 1))

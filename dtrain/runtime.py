"""Connecting to Ray: a given cluster, or a local one started on demand (train and serve share it);
and free loopback ports for the process groups and servers we start ourselves."""
from __future__ import annotations

import os
import socket

import ray


def ensure_ray(address: str | None = None, num_cpus: float | None = None, log_to_driver: bool = True) -> None:
    """Connect to `address`, or start a local cluster with at least `num_cpus` logical CPUs.
    log_to_driver=False keeps workers' output out of this process's stdout (for --json output)."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=log_to_driver)
    else:
        # "local": a new cluster of our own, even where `ray start` left one running on this machine.
        # The dashboard stays on: Ray Train V2 queries its state API to clean up placement groups.
        ray.init(address="local", num_cpus=max(num_cpus or 0, os.cpu_count() or 1), log_to_driver=log_to_driver)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous or an HTTP proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

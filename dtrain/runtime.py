"""Connecting to Ray: a given cluster, or a local one started on demand (train and serve share it);
and free loopback ports for the process groups and servers we start ourselves."""
from __future__ import annotations

import os
import socket
import sys
import time

import ray


def ensure_ray(address: str | None = None, num_cpus: float | None = None, log_to_driver: bool = True) -> None:
    """Connect to `address`, or start a local cluster with at least `num_cpus` logical CPUs.
    log_to_driver=False keeps workers' output out of this process's stdout (for --json output)."""
    if ray.is_initialized():
        return
    # Ray Train V2 both logs and (when another library wrapped stdout) echoes every print: each line twice.
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    if address:
        # Inside a Ray job the job's env_vars are already ours; naming one again is a conflict that
        # ray.init refuses (printing the job's whole runtime_env, secrets included).
        env = {k: v for k, v in env.items() if k not in os.environ}
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env={"env_vars": env} if env else None)
    else:
        # One machine has no spot preemption to watch for; Ray 2.60's watcher only logs an alarming
        # "constructor arguments in the object store" error at every start.
        env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
        # The controller polls its workers every 2 s by default, and a run's start and end each wait on
        # polls: a 2-step run took about 2.5 s longer to end (2-core AMD EPYC). Polls are cheap locally.
        env["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        os.environ.update(env)  # the controller and workers of a local cluster inherit the driver's env
        # "local": a new cluster of our own, even where `ray start` left one running on this machine.
        # The dashboard stays on: Ray Train V2 queries its state API to clean up placement groups.
        ray.init(address="local", num_cpus=max(num_cpus or 0, os.cpu_count() or 1), log_to_driver=log_to_driver,
                 runtime_env={"env_vars": env})


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous or an HTTP proxy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pin_threads(cpus: float | None = None) -> int:
    """Give this process exactly the threads of its CPUs: torch's intra-op pool and OpenMP/MKL for any
    library that starts later. `cpus` default: what Ray assigned to this worker or replica (else all).
    Two workers on two cores that each spin two threads run slower than with one each."""
    if cpus is None:
        cpus = (ray.get_runtime_context().get_assigned_resources().get("CPU") if ray.is_initialized() else None) \
            or os.cpu_count() or 1
    n = max(1, int(cpus))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)
    return n


def run_tasks(fn, args: list[tuple], desc: str, num_cpus: float = 1.0) -> list:
    """fn(*a) for every a in `args` as Ray tasks spread over the cluster (one CPU each by default),
    with a progress line per finished task; results in the order of `args`. Each task pins its threads
    to its CPUs. Ray retries a task whose
    worker died; an exception in `fn` is raised here."""
    from tqdm import tqdm

    def pinned(*a):  # a task runs as many threads as the CPUs it was given
        pin_threads(num_cpus)
        return fn(*a)

    remote = ray.remote(num_cpus=num_cpus)(pinned)
    refs = [remote.remote(*a) for a in args]
    index = {r: i for i, r in enumerate(refs)}
    results: list = [None] * len(refs)
    pending, began = list(refs), time.perf_counter()
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        results[index[done[0]]] = ray.get(done[0])
        meter = tqdm.format_meter(len(refs) - len(pending), len(refs), time.perf_counter() - began,
                                  ncols=90, prefix=desc)
        print(f"[dtrain] {meter}", file=sys.stderr, flush=True)  # stderr: stdout may carry --json
    return results

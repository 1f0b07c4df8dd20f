"""`dtrain submit`: run `dtrain train` as a Ray job on a remote cluster and follow it.

The project directory travels as the job's working_dir (Ray skips what .gitignore lists: data,
runs, .venv); the cluster must have dtrain's dependencies installed (the cluster/ images do).
Token authentication: the client reads the cluster's token from RAY_AUTH_TOKEN,
RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token.
"""
from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path

from ray.job_submission import JobStatus, JobSubmissionClient

TERMINAL = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def submit(address: str, config: str, overrides: list[str], working_dir: str = ".", follow: bool = True,
           out=sys.stdout) -> tuple[str, JobStatus]:
    """Submit, stream the job's logs to `out` until it ends, return (job id, final status)."""
    root = Path(working_dir).resolve()
    cfg_path = Path(config).resolve()
    if not cfg_path.is_relative_to(root):
        raise ValueError(f"config {config} must live inside the working directory {root} to travel with the job")
    entrypoint = shlex.join([
        "python", "-m", "dtrain.cli", "train", str(cfg_path.relative_to(root)), *overrides,
        "scaling.address=auto"])  # last: inside the job, join the cluster it runs on
    client = JobSubmissionClient(address)
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(root)},
                               metadata={"dtrain.config": str(cfg_path.relative_to(root))})
    print(f"submitted {job_id} to {address}: {entrypoint}", file=out, flush=True)
    if follow:
        asyncio.run(_stream(client, job_id, out))
    status = client.get_job_status(job_id)
    while follow and status not in TERMINAL:  # the log stream can end just before the status flips
        status = client.get_job_status(job_id)
    return job_id, status


async def _stream(client: JobSubmissionClient, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()

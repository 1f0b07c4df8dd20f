"""`dtrain submit`: run `dtrain train` as a Ray job on a remote cluster and follow it.

The project directory travels as the job's working_dir (Ray skips what .gitignore lists: data,
runs, .venv); the cluster must have dtrain's dependencies installed (the cluster/ images do).
Token authentication: the cluster's token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token. Ray's client sends it only in token mode, so where a token exists and
RAY_AUTH_MODE is unset, submit turns token mode on.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path


class SubmitError(RuntimeError):
    """The cluster could not be reached or refused the job."""


def _token_mode_if_token_exists() -> None:
    """Before Ray is imported: Ray reads RAY_AUTH_MODE once."""
    has_token = os.environ.get("RAY_AUTH_TOKEN") or os.environ.get("RAY_AUTH_TOKEN_PATH") or \
        (Path.home() / ".ray" / "auth_token").is_file()
    if has_token:
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def submit(address: str, config: str, overrides: list[str], working_dir: str = ".", follow: bool = True,
           out=sys.stdout) -> tuple[str, "JobStatus"]:
    """Submit, stream the job's logs to `out` until it ends, return (job id, final status)."""
    root = Path(working_dir).resolve()
    cfg_path = Path(config).resolve()
    if not cfg_path.is_relative_to(root):
        raise ValueError(f"config {config} must live inside the working directory {root} to travel with the job")
    entrypoint = shlex.join([
        "python", "-m", "dtrain.cli", "train", str(cfg_path.relative_to(root)), *overrides,
        "scaling.address=auto"])  # last: inside the job, join the cluster it runs on
    _token_mode_if_token_exists()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env={"working_dir": str(root)},
                                   metadata={"dtrain.config": str(cfg_path.relative_to(root))})
    except (ConnectionError, AuthenticationError) as e:
        raise SubmitError(f"{address}: {str(e).splitlines()[0]}") from None
    print(f"submitted {job_id} to {address}: {entrypoint}", file=out, flush=True)
    if follow:
        asyncio.run(_stream(client, job_id, out))
    status = client.get_job_status(job_id)
    # The log stream can end just before the status flips: poll briefly, not in a tight loop.
    while follow and status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    return job_id, status


async def _stream(client, job_id: str, out) -> None:
    async for chunk in client.tail_job_logs(job_id):
        out.write(chunk)
        out.flush()

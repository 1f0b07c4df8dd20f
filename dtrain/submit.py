"""`dtrain submit`: run `dtrain train` as a Ray job on a remote cluster and follow it.

The project directory travels as the job's working_dir (Ray skips what .gitignore lists: data,
runs, .venv); the cluster must have dtrain's dependencies installed (the cluster/ images do).
Token authentication: the cluster's token comes from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
~/.ray/auth_token. Ray's client sends it only in token mode, so where a token exists and
RAY_AUTH_MODE is unset, submit turns token mode on.

Secrets (W&B key, serve tokens, storage credentials) set in the submitter's shell travel sealed with
the cluster's token in the job's runtime_env (dtrain.secrets): never in clear, never on the command
line, never printed.
"""
from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from dtrain.errors import DtrainError
from dtrain.secrets import SEALED_VAR, SECRET_VARS, cluster_token, seal

if TYPE_CHECKING:
    from ray.job_submission import JobStatus


class SubmitError(DtrainError, RuntimeError):
    """The cluster could not be reached or refused the job."""


def _token_mode_if_token_exists() -> None:
    """Before Ray is imported: Ray reads RAY_AUTH_MODE once."""
    if cluster_token():
        os.environ.setdefault("RAY_AUTH_MODE", "token")


def job_runtime_env(root: Path, runtime_env_file: str | None = None, out=sys.stderr) -> dict:
    """The job's runtime_env: `runtime_env_file` (Ray's runtime_env schema, e.g. cluster/runtime_env.yaml),
    the project as working_dir, and the SECRET_VARS set here, sealed with the cluster's token."""
    env = {}
    if runtime_env_file:
        try:
            env = yaml.safe_load(Path(runtime_env_file).read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{runtime_env_file}: not YAML: {e}") from None
        if not isinstance(env, dict):
            raise ValueError(f"{runtime_env_file}: a runtime_env is a mapping (working_dir, env_vars, pip, ...)")
    leaked = sorted(set(env.get("env_vars") or {}) & {*SECRET_VARS, SEALED_VAR})
    if leaked:
        raise ValueError(f"{runtime_env_file}: {leaked} in env_vars would be logged in clear by Ray; "
                         "set them in your shell and `dtrain submit` seals them")
    env.setdefault("working_dir", str(root))
    secrets = {k: os.environ[k] for k in SECRET_VARS if os.environ.get(k)}
    token = cluster_token()
    if secrets and token:
        env["env_vars"] = {**(env.get("env_vars") or {}), SEALED_VAR: seal(secrets, token)}
    elif secrets:
        print(f"dtrain submit: not forwarding {sorted(secrets)}: without a Ray auth token they could only travel "
              "in clear, and Ray logs a job's env_vars; give them to the cluster's nodes instead", file=out)
    return env


def submit(address: str, config: str, overrides: list[str], working_dir: str = ".", follow: bool = True,
           out=sys.stdout, command: str = "train", runtime_env_file: str | None = None) -> tuple[str, JobStatus]:
    """Submit `dtrain <command> CONFIG OVERRIDES` (train or pipeline), stream the job's logs to `out` until it
    ends, return (job id, final status)."""
    root = Path(working_dir).resolve()
    cfg_path = Path(config).resolve()
    if not cfg_path.is_relative_to(root):
        raise ValueError(f"config {config} must live inside the working directory {root} to travel with the job")
    entrypoint = shlex.join([
        "python", "-m", "dtrain.cli", command, str(cfg_path.relative_to(root)), *overrides,
        "scaling.address=auto"])  # last: inside the job, join the cluster it runs on
    runtime_env = job_runtime_env(root, runtime_env_file)
    _token_mode_if_token_exists()
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
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

"""`dtrain submit` against a real head started with `ray start --head` (token authentication on)."""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

# Ports outside the worker-port range (10002-19999) of the test session's own cluster.
GCS, DASHBOARD = 26380, 28265
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def head_logs():
    """The head's own temp dir (short: Ray's socket paths have a length limit), so its logs can be read."""
    path = tempfile.mkdtemp(prefix="rh-", dir="/tmp")
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def token(head_logs):
    """The head's auth token, in a file of its own: `ray start` turns token auth on only where one exists."""
    path = head_logs.parent / f"{head_logs.name}.token"
    path.write_text(uuid.uuid4().hex)
    yield path
    path.unlink()


@pytest.fixture(scope="module")
def head(head_logs, token):
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}",  # the job's `python` is ours
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    proc = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--block", f"--temp-dir={head_logs}", f"--port={GCS}",
         f"--dashboard-port={DASHBOARD}",
         "--dashboard-agent-listen-port=28266", "--ray-client-server-port=28267", "--min-worker-port=30000",
         "--max-worker-port=30999", "--num-cpus=2", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{DASHBOARD}"
    deadline = time.time() + 90
    while time.time() < deadline and proc.poll() is None:
        try:  # the dashboard answers (401 without a token) once the head is up
            httpx.get(address, timeout=5)
            break
        except httpx.TransportError:
            time.sleep(1)
    else:
        proc.terminate()
        pytest.fail(f"ray head did not come up (exit code {proc.poll()})")
    time.sleep(3)
    yield address
    proc.terminate()  # `ray start --block` stops the processes it started...
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:  # ...gracefully, in about 30 s: a test head need not wait for that
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    # ...but leaves its address as "the current cluster", which a later `ray`/`serve` command on
    # this machine would try to join: remove it when it is this head's
    current = Path("/tmp/ray/ray_current_cluster")
    if current.is_file() and current.read_text().strip().endswith(f":{GCS}"):
        current.unlink()


def dtrain(*args, **env):
    return subprocess.run([sys.executable, "-m", "dtrain.cli", *args], capture_output=True, text=True,
                          timeout=400, env={**os.environ, **env})


def with_token(token: Path) -> dict:
    return {"RAY_AUTH_TOKEN_PATH": str(token)}


def test_submit_runs_training_as_a_ray_job_and_streams_its_logs(head, head_logs, token, digits_dir, tmp_path):
    # Secrets set in the submitter's shell reach the job sealed, and no log or file of the head or the run
    # shows them (Ray itself logs a job's env_vars in runtime_env_agent.log: that is why they are sealed)
    secrets = {"WANDB_API_KEY": f"wandb-{uuid.uuid4().hex}", "AWS_SECRET_ACCESS_KEY": f"aws-{uuid.uuid4().hex}"}
    r = dtrain("submit", "--address", head, "--runtime-env", "cluster/runtime_env.yaml", "configs/quickstart.yaml",
               "model.size=tiny", "model.hidden_size=0",
               "model.depth=0", "model.image_size=8", "train.steps=4", "train.ckpt_every=4", "train.log_every=2",
               f"data.train_shards={digits_dir}/train-{{000000..000003}}.tar", f"data.val_shards={digits_dir}/val-000000.tar",
               f"train.storage_path={tmp_path}",
               "train.run_name=submitted", "tracking.wandb=false", **secrets, **with_token(token))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout and "final checkpoint:" in r.stdout  # the job's own output, streamed
    assert (tmp_path / "submitted" / "checkpoint_00000004" / "model.safetensors").is_file()

    from dtrain.secrets import SEALED_VAR, unseal

    job_id = re.search(r"job (\S+): SUCCEEDED", r.stdout).group(1)
    job = httpx.get(f"{head}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token.read_text()}"}, timeout=30)
    env_vars = job.raise_for_status().json()["runtime_env"]["env_vars"]  # Ray's job REST API (no client state here)
    assert unseal(env_vars[SEALED_VAR], token.read_text()) == secrets  # the job had them (its driver unsealed them)
    files = [f for root in (head_logs, tmp_path) for f in root.rglob("*") if f.is_file()]
    assert len(files) > 20  # the head's logs (GCS, raylet, dashboard, job driver, workers) and the run's files
    leaked = [str(f) for f in files for v in secrets.values() if v.encode() in f.read_bytes()]
    assert not leaked and not any(v in r.stdout + r.stderr for v in secrets.values()), leaked


def test_submit_with_a_wrong_token_is_refused_clearly(head):
    r = dtrain("submit", "--address", head, "configs/quickstart.yaml", RAY_AUTH_TOKEN="not-the-token",
               RAY_AUTH_MODE="token")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "submit:" in r.stderr and ("auth" in r.stderr.lower() or "token" in r.stderr.lower()), r.stderr


def test_submit_without_any_token_is_refused(head, tmp_path):
    # no token anywhere: an empty HOME (no ~/.ray/auth_token), RAY_AUTH_* unset
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([sys.executable, "-m", "dtrain.cli", "submit", "--address", head, "configs/quickstart.yaml"],
                       capture_output=True, text=True, timeout=120, env={**env, "HOME": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "submitted" not in r.stdout
    assert "submit:" in r.stderr and ("auth" in r.stderr.lower() or "token" in r.stderr.lower()), r.stderr


def test_submit_rejects_a_bad_config_before_contacting_the_cluster():
    r = dtrain("submit", "--address", "http://127.0.0.1:1", "configs/quickstart.yaml", "train.stepz=3")
    assert r.returncode == 2 and "train.stepz" in r.stderr

"""`dtrain submit` against a real head started with `ray start --head` (token authentication on)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

# Ports outside the worker-port range (10002-19999) of the test session's own cluster.
GCS, DASHBOARD = 26380, 28265
VENV_BIN = str(Path(sys.executable).parent)


@pytest.fixture(scope="module")
def head():
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}  # the job's `python` is ours
    proc = subprocess.Popen(
        [f"{VENV_BIN}/ray", "start", "--head", "--block", f"--port={GCS}", f"--dashboard-port={DASHBOARD}",
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


def test_submit_runs_training_as_a_ray_job_and_streams_its_logs(head, digits_dir, tmp_path):
    r = dtrain("submit", "--address", head, "configs/quickstart.yaml", "model.size=tiny", "model.hidden_size=0",
               "model.depth=0", "model.image_size=8", "train.steps=4", "train.ckpt_every=4", "train.log_every=2",
               f"data.train_shards={digits_dir}/train-{{000000..000003}}.tar", f"data.val_shards={digits_dir}/val-000000.tar",
               f"train.storage_path={tmp_path}",
               "train.run_name=submitted", "tracking.wandb=false")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SUCCEEDED" in r.stdout and "final checkpoint:" in r.stdout  # the job's own output, streamed
    assert (tmp_path / "submitted" / "checkpoint_00000004" / "model.safetensors").is_file()


def test_submit_with_a_wrong_token_is_refused_clearly(head):
    r = dtrain("submit", "--address", head, "configs/quickstart.yaml", RAY_AUTH_TOKEN="not-the-token",
               RAY_AUTH_MODE="token")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "submit:" in r.stderr and ("auth" in r.stderr.lower() or "token" in r.stderr.lower()), r.stderr


def test_submit_rejects_a_bad_config_before_contacting_the_cluster():
    r = dtrain("submit", "--address", "http://127.0.0.1:1", "configs/quickstart.yaml", "train.stepz=3")
    assert r.returncode == 2 and "train.stepz" in r.stderr

"""`dtrain submit` against a real head started with `ray start --head`, token authentication on: what
it refuses. The job itself runs on a real 2-node cluster in tests/test_multinode.py."""
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx
import pytest

from tests.raynodes import node_env, start_node, stop_node, wait_until

pytestmark = pytest.mark.slow

# Ports outside the worker-port range (10002-19999) of the test session's own cluster.
GCS, DASHBOARD = 26380, 28265


@pytest.fixture(scope="module")
def head():
    root = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = root / "token"
    token.write_text(uuid.uuid4().hex)
    proc = start_node(["--head", f"--temp-dir={root}/ray", f"--port={GCS}", f"--dashboard-port={DASHBOARD}",
                       "--dashboard-agent-listen-port=28266", "--ray-client-server-port=28267",
                       "--min-worker-port=30000", "--max-worker-port=30999", "--num-cpus=1",
                       "--include-dashboard=true"], node_env(token))
    address = f"http://127.0.0.1:{DASHBOARD}"

    def answers():  # the dashboard answers (401 without a token) once the head is up
        try:
            return httpx.get(address, timeout=5) is not None
        except httpx.TransportError:
            return proc.poll() is not None  # died: stop waiting, the assert below says so

    try:
        wait_until(answers, 90, "ray head up", every=1)
        assert proc.poll() is None, f"ray head exited with {proc.returncode}"
        yield address, token
    finally:
        stop_node(proc, graceful_s=2)
        # `ray start` leaves its address as "the current cluster", which a later `ray`/`serve` command
        # on this machine would try to join: remove it when it is this head's
        current = Path("/tmp/ray/ray_current_cluster")
        if current.is_file() and current.read_text().strip().endswith(f":{GCS}"):
            current.unlink()
        shutil.rmtree(root, ignore_errors=True)


def dtrain(*args, **env):
    return subprocess.run([sys.executable, "-m", "dtrain.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **env})


def test_the_head_serves_its_token_only(head):
    address, token = head
    jobs = f"{address}/api/jobs/"
    assert httpx.get(jobs, headers={"Authorization": f"Bearer {token.read_text()}"}, timeout=30).status_code == 200
    assert httpx.get(jobs, timeout=30).status_code in (401, 403)
    assert httpx.get(jobs, headers={"Authorization": "Bearer nope"}, timeout=30).status_code in (401, 403)


def test_submit_with_a_wrong_token_is_refused_clearly(head):
    r = dtrain("submit", "--address", head[0], "configs/quickstart.yaml", RAY_AUTH_TOKEN="not-the-token",
               RAY_AUTH_MODE="token")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "submit:" in r.stderr and ("auth" in r.stderr.lower() or "token" in r.stderr.lower()), r.stderr


def test_submit_without_any_token_is_refused(head, tmp_path):
    # no token anywhere: an empty HOME (no ~/.ray/auth_token), RAY_AUTH_* unset
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([sys.executable, "-m", "dtrain.cli", "submit", "--address", head[0], "configs/quickstart.yaml"],
                       capture_output=True, text=True, timeout=120, env={**env, "HOME": str(tmp_path)})
    assert r.returncode == 2 and "Traceback" not in r.stderr and "submitted" not in r.stdout
    assert "submit:" in r.stderr and ("auth" in r.stderr.lower() or "token" in r.stderr.lower()), r.stderr


def test_submit_rejects_a_bad_config_before_contacting_the_cluster():
    r = dtrain("submit", "--address", "http://127.0.0.1:1", "configs/quickstart.yaml", "train.stepz=3")
    assert r.returncode == 2 and "train.stepz" in r.stderr

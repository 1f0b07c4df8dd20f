"""`dtrain submit` against a real head started with `ray start --head`, token authentication on: what
it refuses. The job itself runs on a real 2-node cluster in tests/test_multinode.py."""
import os
import subprocess
import sys

import httpx
import pytest

pytestmark = pytest.mark.slow


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

"""`serve run serve/digits.yaml` works as the README says: from a directory holding the quickstart's
runs, Ray Serve's own CLI starts a local cluster, builds the app from the YAML (checkpoint paths
resolved where it is built, not in a replica's working directory) and serves every version over HTTP."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from dtrain.checkpoint import read_config
from dtrain.runtime import free_port
from tests.conftest import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_serve_run_of_the_repository_config_serves_every_version(tiny_checkpoint, tmp_path):
    shards = read_config(tiny_checkpoint).data.val_shards
    for i, stage in enumerate(("pretrain", "reflow", "distill")):  # the quickstart's run directories
        write_tiny_checkpoint(tmp_path / "runs" / f"quickstart-{stage}" / "checkpoint_00000010", shards, seed=i)
    config = yaml.safe_load((ROOT / "serve" / "digits.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port  # the only change: a free port instead of 8000
    config["applications"][0]["args"]["replica_cpus"] = 0.5
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "digits.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # its own cluster, not the session's
    serve_cli = str(Path(sys.executable).with_name("serve"))
    proc = subprocess.Popen([serve_cli, "run", "serve/digits.yaml"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        url, deadline, models = f"http://127.0.0.1:{port}", time.time() + 180, None
        while time.time() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"{url}/v1/models", timeout=5)
                if r.status_code == 200:
                    models = r.json()["models"]
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        assert models, f"serve run never answered: exit {proc.poll()}"
        (digits,) = models
        assert digits["default"] == "reflow" and digits["fallback"]["version"] == "distill"
        for v in digits["versions"]:  # absolute, resolved to the newest checkpoint of each run
            assert v["checkpoint"] == str(tmp_path / "runs" / f"quickstart-{v['version']}" / "checkpoint_00000010")
        for version in ("pretrain", "reflow", "distill"):
            r = httpx.post(f"{url}/v1/generate", json={"class_label": 3, "version": version, "steps": 2}, timeout=60)
            assert r.status_code == 200 and r.json()["version"] == version, r.text
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: serve run shuts the app and its cluster down
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    assert proc.returncode is not None
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)

"""`serve run serve/digits.yaml` works as the README says: from a directory holding the quickstart's
runs, Ray Serve's own CLI starts a local cluster, builds the app from the YAML (checkpoint paths
resolved where it is built, not in a replica's working directory) and serves every version over HTTP;
and `serve deploy` of the same YAML, with absolute paths, onto a running cluster."""
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
from tests.raynodes import node_env, wait_until

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


@pytest.mark.slow
def test_serve_deploy_onto_a_running_cluster_with_absolute_paths(head, tiny_checkpoint, tmp_path):
    """`serve deploy serve/digits.yaml` as the README says, onto a head started with `ray start` (token
    auth on): the YAML with absolute checkpoint paths; the app is built on the cluster and serves."""
    address, token = head
    shards = read_config(tiny_checkpoint).data.val_shards
    config = yaml.safe_load((ROOT / "serve" / "digits.yaml").read_text())
    app = config["applications"][0]
    for i, stage in enumerate(("pretrain", "reflow", "distill")):
        path = tmp_path / "runs" / f"quickstart-{stage}"
        write_tiny_checkpoint(path / "checkpoint_00000010", shards, seed=i)
        app["args"]["models"]["digits"]["versions"][stage] = str(path)  # absolute: the README's advice
    port = free_port()
    config["http_options"]["port"] = port
    app["args"]["replica_cpus"] = 0.5
    app["args"]["autoscaling"] = {"min_replicas": 1, "max_replicas": 1}
    (tmp_path / "digits.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in node_env(token).items()  # the head's token, nothing of the session's cluster
           if not k.startswith("RAY_") or k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    serve_cli = str(Path(sys.executable).with_name("serve"))
    r = subprocess.run([serve_cli, "deploy", str(tmp_path / "digits.yaml"), "--address", address], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    try:
        def generates():
            try:
                answer = httpx.post(f"http://127.0.0.1:{port}/v1/generate", json={"class_label": 3, "steps": 2},
                                    timeout=30)
                return answer if answer.status_code == 200 else None
            except httpx.HTTPError:
                return None

        answer = wait_until(generates, 240, "the deployed app answers", every=3).json()
        assert answer["model"] == "digits" and answer["version"] == "reflow"
    finally:
        subprocess.run([serve_cli, "shutdown", "-y", "--address", address], env=env, capture_output=True,
                       timeout=120)

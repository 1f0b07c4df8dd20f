"""A real 2-node Ray cluster on this machine: the head and a worker node in network namespaces of their
own, with their own addresses on a veth pair, token auth on. `dtrain submit` runs a ZeRO-3 job with one
training worker on each node; the worker node dies mid-run (its raylet and workers killed together)
and comes back; the job resumes from its last checkpoint as its FailureConfig says, and every
checkpoint left behind loads. Skipped, saying why, where namespaces cannot be made (no root)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.raynodes import VethPair, kill_node, node_env, start_node, stop_node, wait_until

pytestmark = pytest.mark.slow

STEPS, CKPT_EVERY = 60, 10


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2 (`ip`)")
    pair = VethPair(f"dt{os.getpid() % 100000}")
    try:
        pair.create()
    except OSError as e:
        pytest.skip(f"cannot make network namespaces here: {e}")
    root = Path(tempfile.mkdtemp(prefix="mn-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = root / "token"
    token.write_text(uuid.uuid4().hex)
    env = node_env(token, GLOO_SOCKET_IFNAME=VethPair.IFNAME,  # gloo between nodes: the veth, not loopback
                   # a dead node known in about 2 s, not 15 (GCS health checks: 5 misses 3 s apart by default),
                   # and its lost worker seen by Ray Train's controller within 0.5 s, not 2
                   RAY_health_check_period_ms="500", RAY_health_check_failure_threshold="4",
                   RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")
    c = {"pair": pair, "root": root, "token": token, "env": env, "procs": []}

    def start_worker():
        c["worker"] = start_node([f"--address={pair.ip_a}:6379", f"--node-ip-address={pair.ip_b}", "--num-cpus=1"],
                                 env, netns=pair.b, log=root / "worker.log")
        c["procs"].append(c["worker"])

    c["start_worker"] = start_worker
    try:
        c["procs"].append(start_node(["--head", f"--node-ip-address={pair.ip_a}", "--port=6379", "--num-cpus=1",
                                      f"--temp-dir={root}/ray", "--include-dashboard=true"],
                                     env, netns=pair.a, log=root / "head.log"))
        wait_until(lambda: alive_nodes(c) >= 1, 90, "head node up", every=2)
        start_worker()
        wait_until(lambda: alive_nodes(c) >= 2, 90, "worker node joined", every=2)
        yield c
    finally:
        for proc in c["procs"]:
            stop_node(proc, graceful_s=2)
        pair.remove()
        shutil.rmtree(root, ignore_errors=True)


def in_head_ns(c, *cmd, timeout=60, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", c["pair"].a, *cmd], capture_output=True, text=True,
                          timeout=timeout, env={**c["env"], **env})


def alive_nodes(c) -> int:
    """Nodes the GCS counts as alive, asked from inside the head's namespace."""
    r = in_head_ns(c, sys.executable, "-c", "import ray; ray.init(address='auto', logging_level='ERROR'); "
                   "print(sum(n['Alive'] for n in ray.nodes()))", RAY_ADDRESS=f"{c['pair'].ip_a}:6379")
    return int(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else 0


def latest_step(run: Path) -> int:
    """The newest checkpoint Ray Train has registered (every rank reported it), 0 before any."""
    snapshot = run / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError):  # not written yet, or being replaced
        return 0
    return int((latest.get("metrics") or {}).get("step", 0))


def test_zero3_job_across_two_nodes_resumes_after_losing_a_node(cluster, digits_dir, tmp_path):
    c, pair = cluster, cluster["pair"]
    secrets = {"WANDB_API_KEY": f"wandb-{uuid.uuid4().hex}", "AWS_SECRET_ACCESS_KEY": f"aws-{uuid.uuid4().hex}"}
    run, out = tmp_path / "mn", tmp_path / "submit.log"
    cmd = [sys.executable, "-m", "dtrain.cli", "submit", "--address", "http://127.0.0.1:8265",  # the dashboard: loopback
           "--runtime-env", "cluster/runtime_env.yaml", "configs/quickstart.yaml",
           "model.size=tiny", "model.hidden_size=0", "model.depth=0", "model.image_size=8", "train.zero_stage=3",
           f"train.steps={STEPS}", f"train.ckpt_every={CKPT_EVERY}", "train.log_every=5", "train.max_failures=2",
           "scaling.num_workers=2", "scaling.cpus_per_worker=1",  # one CPU per node: one worker on each
           f"data.train_shards={digits_dir}/train-{{000000..000003}}.tar", f"data.val_shards={digits_dir}/val-000000.tar",
           f"train.storage_path={tmp_path}", "train.run_name=mn", "tracking.wandb=false"]
    with open(out, "w") as log:
        job = subprocess.Popen(["ip", "netns", "exec", pair.a, *cmd], stdout=log, stderr=subprocess.STDOUT,
                               env={**c["env"], **secrets})
    try:
        wait_until(lambda: latest_step(run) >= CKPT_EVERY or job.poll() is not None, 300, "first checkpoint")
        assert job.poll() is None, out.read_text()[-3000:]
        lost_at = latest_step(run)
        kill_node(c["worker"])  # the worker node dies mid-run: raylet, object store, training worker
        c["start_worker"]()  # ...and a node comes back at the same address
        job.wait(timeout=360)
    finally:
        if job.poll() is None:
            job.kill()
    text = out.read_text()
    assert job.returncode == 0 and "SUCCEEDED" in text, text[-4000:]
    assert "final checkpoint:" in text  # the job's own output, streamed back by `dtrain submit`

    first_group = re.findall(r"\(ip=([\d.]+), pid=\d+\) world_rank=(\d)", text)[:2]
    assert {ip for ip, _ in first_group} == {pair.ip_a, pair.ip_b}, first_group  # one rank on each node
    assert "[FailurePolicy] RETRY" in text  # Ray Train saw the lost worker and restarted the group
    starts = [int(s) for s in re.findall(rf"steps (\d+)->{STEPS}", text)]
    assert 0 in starts and max(starts) >= lost_at > 0, (starts, lost_at)  # resumed, not restarted from 0

    from dtrain.checkpoint import load_model, read_meta

    ckpts = sorted(run.glob("checkpoint_0*"))
    assert ckpts and ckpts[-1].name == f"checkpoint_{STEPS:08d}"
    for ckpt in ckpts:  # nothing half-written was left behind, and it all loads
        load_model(ckpt)
        meta = read_meta(ckpt)
        assert meta["step"] == int(ckpt.name.split("_")[1]) and meta["zero_stage"] == 3

    # The secrets reached the job sealed (its driver unsealed them: it would have failed otherwise),
    # and no log of either node, no file of the run and no output shows them
    assert "not forwarding" not in text
    files = [f for d in (c["root"], run) for f in d.rglob("*") if f.is_file()]
    assert len(files) > 20
    leaked = [str(f) for f in files for v in secrets.values() if v.encode() in f.read_bytes()]
    assert not leaked and not any(v in text for v in secrets.values()), leaked

"""Ctrl-C keeps the work: `dtrain train` saves a checkpoint at the next step and exits 130; the rerun
resumes from it. The CLI runs in a subprocess that joins the session's Ray cluster."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtrain.checkpoint import read_meta
from dtrain.config import load_config
from dtrain.precision import choose
from dtrain.train.driver import fit, run_dir
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_sigint_saves_a_checkpoint_and_the_rerun_resumes(ray_cluster, digits_dir, tmp_path):
    overrides = tiny_overrides(digits_dir, tmp_path) + [
        "train.run_name=int", "train.steps=100000", "train.ckpt_every=100000", "train.log_every=1000",
        f"scaling.address={ray_cluster.get_runtime_context().gcs_address}"]
    proc = subprocess.Popen([str(Path(sys.executable).parent / "dtrain"), "train", "configs/quickstart.yaml",
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines, deadline = [], time.time() + 240
    for line in proc.stdout:  # wait until training has really started
        lines.append(line)
        if "first step done" in line or time.time() > deadline:
            break
    assert any("first step done" in line for line in lines), "".join(lines[-30:])
    time.sleep(1)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=180)
    log = "".join(lines) + out
    assert proc.returncode == 130, log[-3000:]
    assert "interrupted by SIGINT: saved step" in log and "rerun the same command" in log

    cfg = load_config("configs/quickstart.yaml", overrides[:-1])  # the rerun starts where the save left off
    saved = sorted(run_dir(cfg).glob("checkpoint_0*"))
    assert len(saved) == 1, saved
    meta = read_meta(saved[0])
    step = meta["step"]
    assert 1 <= step < 100000 and meta["interrupted"] is True
    assert meta["precision"] == choose("auto").precision and meta["precision_reason"]  # tiny_overrides keep auto
    assert not (run_dir(cfg) / ".stop_requested").exists()

    # Resume and finish 3 steps later; ckpt_every is far away, so only the clock checkpoints in between.
    cfg = load_config("configs/quickstart.yaml", overrides[:-1] + [
        f"train.steps={step + 3}", "train.ckpt_every_minutes=0.0001"])
    final = fit(cfg)
    assert read_meta(final)["step"] == step + 3 and read_meta(final)["interrupted"] is False
    kept = sorted(int(p.name.split("_")[1]) for p in run_dir(cfg).glob("checkpoint_0*"))
    assert kept == [step + 2, step + 3]  # time-based checkpoints (2 kept), none from ckpt_every
    steps = [json.loads(line)["step"] for line in (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == step + 3 and all(s <= step for s in steps[:-1])  # nothing logged past the save survives

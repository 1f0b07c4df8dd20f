"""Shared fixtures: one Ray cluster per test session, tiny shards, tiny configs."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("WANDB_SILENT", "true")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Object-store tests use a moto S3 server on loopback (s3_bucket). Its address and test credentials
# go into the environment now, before the session's Ray cluster starts, so its workers inherit them;
# no test ever talks to a real cloud.
S3_PORT = _free_port()
os.environ.update({"AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}", "AWS_ACCESS_KEY_ID": "testing",
                   "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
for _var in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_var, None)

# Serving watermarks and signs by default with a key and test credentials it creates in the user's
# home on first use: the tests' deployments use session ones in a temporary directory instead.
import tempfile  # noqa: E402

_keys = tempfile.mkdtemp(prefix="dtrain-keys-")
os.environ["DTRAIN_WATERMARK_KEY_FILE"] = os.path.join(_keys, "watermark.key")
os.environ["DTRAIN_PROVENANCE_DIR"] = os.path.join(_keys, "c2pa-test")
# A fixed key, so detection on the tests' fixed seeds gives the same answers every run (a random key
# matches 1% of plain images by chance, by design of the 1% false-positive threshold).
with open(os.environ["DTRAIN_WATERMARK_KEY_FILE"], "w") as _f:
    _f.write("# dtrain test watermark key\n" + bytes(range(100, 132)).hex() + "\n")


@pytest.fixture(scope="session")
def watermark_key():
    """The key every test deployment watermarks with (the serving default, $DTRAIN_WATERMARK_KEY_FILE)."""
    from dtrain.watermark import key_for_serving

    return key_for_serving(None)


@pytest.fixture(scope="session")
def s3_bucket():
    """s3://dtrain-test on moto's S3 server, for the whole session."""
    import pyarrow.fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    pyarrow.fs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True).create_dir(
        "dtrain-test")
    yield "s3://dtrain-test"
    server.stop()


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for every real-stack test (train, serve) of the session."""
    import ray

    from dtrain.runtime import ensure_ray

    ensure_ray(num_cpus=4)  # logical CPUs: 2 train workers + serve replicas fit side by side
    yield ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def serve_url(ray_cluster):
    """Ray Serve's HTTP proxy on a free loopback port, one per session (HTTP options are fixed at first start)."""
    from ray import serve

    from dtrain.runtime import free_port

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    from dtrain.data.digits import write_digits

    out = tmp_path_factory.mktemp("digits")
    write_digits(out, image_size=8, train_shards=4, val_per_class=5)
    return out


@pytest.fixture(scope="session")
def shapes_recogniser():
    """The shapes world's recogniser at 32 pixels, from the user's cache (trained there once, ~90 s on
    one thread, when the code that decides its weights changed)."""
    from dtrain.eval.recogniser import shapes_recogniser

    return shapes_recogniser(32)


def tiny_overrides(digits_dir, tmp_path) -> list[str]:
    """Overrides for a DiT small enough to train in seconds on 8x8 digits."""
    return [
        "model.size=tiny", "model.image_size=8", "model.patch_size=2",
        f"data.train_shards={digits_dir}/train-{{000000..000003}}.tar",
        f"data.val_shards={digits_dir}/val-000000.tar",
        "data.batch_size=16", "data.shuffle_buffer=64",
        f"train.storage_path={tmp_path}/runs", "train.warmup_steps=2", "train.log_every=2",
        "tracking.wandb=false", "sample.steps=4", "sample.per_class=2",
    ]


def write_tiny_checkpoint(path, val_shard: str, seed: int = 0):
    """An untrained tiny DiT's inference checkpoint at `path`. DiT zero-initialises its output layer
    (adaLN-Zero), so a fresh net's velocity is 0 everywhere: every weight is perturbed (by `seed`) so
    the untrained net bends its paths like a real one."""
    import torch

    from dtrain.checkpoint import write_inference_files
    from dtrain.config import load_config
    from dtrain.models import build_model

    cfg = load_config(None, ["model.size=tiny", "model.image_size=8", "model.patch_size=2",
                             f"data.val_shards={val_shard}", "sample.guidance=2.0", "sample.steps=4"])
    torch.manual_seed(seed)  # the init and the perturbation both
    weights = {k: v + 0.1 * torch.randn_like(v) for k, v in build_model(cfg.model).state_dict().items()}
    write_inference_files(path, weights, cfg, {"step": 0})
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """`<root>/tiny/ckpt`: a tiny untrained checkpoint, labelled digits as its val shards."""
    from dtrain.data.digits import write_digits

    root = tmp_path_factory.mktemp("tiny")
    shards = write_digits(root / "digits", image_size=8, train_shards=1, val_per_class=10)
    return write_tiny_checkpoint(root / "tiny" / "ckpt", shards["val"][0])


@pytest.fixture(scope="session")
def versions(tiny_checkpoint):
    """Two versions of the model "tiny": its checkpoint `ckpt`, and `v2` with other weights."""
    from dtrain.checkpoint import read_config

    v2 = write_tiny_checkpoint(tiny_checkpoint.parent / "v2", read_config(tiny_checkpoint).data.val_shards, seed=1)
    return {"ckpt": tiny_checkpoint, "v2": v2}


def registry(versions: dict, **spec) -> dict:
    """A serving registry of the model "tiny" with these versions and spec fields (default, canary, ...)."""
    return {"tiny": {"versions": {v: str(p) for v, p in versions.items()}, **spec}}


# Ports outside the worker-port range (10002-19999) of the test session's own cluster.
HEAD_GCS, HEAD_DASHBOARD = 26380, 28265


@pytest.fixture(scope="module")
def head():
    """A Ray head started with `ray start --head`, token auth on, beside the session's cluster: (dashboard
    address, token file)."""
    import shutil
    import tempfile
    import uuid
    from pathlib import Path

    import httpx

    from tests.raynodes import node_env, start_node, stop_node, wait_until

    root = Path(tempfile.mkdtemp(prefix="rh-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    token = root / "token"
    token.write_text(uuid.uuid4().hex)
    proc = start_node(["--head", f"--temp-dir={root}/ray", f"--port={HEAD_GCS}",
                       f"--dashboard-port={HEAD_DASHBOARD}", "--dashboard-agent-listen-port=28266",
                       "--ray-client-server-port=28267",
                       "--min-worker-port=30000", "--max-worker-port=30999", "--num-cpus=1",
                       "--include-dashboard=true"], node_env(token))
    address = f"http://127.0.0.1:{HEAD_DASHBOARD}"

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
        if current.is_file() and current.read_text().strip().endswith(f":{HEAD_GCS}"):
            current.unlink()
        shutil.rmtree(root, ignore_errors=True)

"""Runs on object storage, against a real S3 server (moto's, on loopback, started by the test
session): Ray Train uploads checkpoints in the background and a rerun resumes from the bucket;
sampling, export and serving read only checkpoints Ray Train registered (every rank's upload done)."""
from __future__ import annotations

import json

import pyarrow.fs
import pytest

from dtrain.checkpoint import CheckpointError, export, load_model, read_meta, resolve
from dtrain.checkpoint import SNAPSHOT, checkpoint_uri, registered_checkpoints
from tests.conftest import tiny_overrides, write_tiny_checkpoint


def upload(local, uri):
    fs, path = pyarrow.fs.FileSystem.from_uri(uri)
    pyarrow.fs.copy_files(str(local), path, destination_filesystem=fs)


def write_snapshot(run_uri, names):
    fs, path = pyarrow.fs.FileSystem.from_uri(run_uri)
    with fs.open_output_stream(f"{path}/{SNAPSHOT}") as f:
        f.write(json.dumps({"checkpoint_results": [{"checkpoint_dir_name": n} for n in names]}).encode())


@pytest.fixture(scope="module")
def hand_run(s3_bucket, digits_dir, tmp_path_factory):
    """A run in the bucket: checkpoint 2 registered, checkpoint 4 uploaded whole but never registered
    (as when a rank's upload died before Ray Train registered it)."""
    tmp = tmp_path_factory.mktemp("hand")
    run = f"{s3_bucket}/hand/run"
    for step, seed in ((2, 0), (4, 1)):
        upload(write_tiny_checkpoint(tmp / f"checkpoint_{step:08d}", f"{digits_dir}/val-000000.tar", seed),
               f"{run}/checkpoint_{step:08d}")
    write_snapshot(run, ["checkpoint_00000002"])
    return run


def test_a_run_in_the_bucket_resolves_to_its_newest_registered_checkpoint(hand_run):
    assert checkpoint_uri(hand_run) == f"{hand_run}/checkpoint_00000002"
    local = resolve(hand_run)
    assert (local / "source").read_text() == f"{hand_run}/checkpoint_00000002"
    load_model(hand_run)  # fetched once, loaded from the cache
    assert resolve(hand_run) == local


def test_an_unregistered_checkpoint_is_never_loaded(hand_run):
    with pytest.raises(CheckpointError, match="not a registered checkpoint"):
        resolve(f"{hand_run}/checkpoint_00000004")


def test_a_bucket_path_without_a_run_is_refused_clearly(s3_bucket):
    with pytest.raises(CheckpointError, match="no registered checkpoint"):
        resolve(f"{s3_bucket}/nothing/here")


def test_a_local_run_resolves_to_registered_checkpoints_only(tmp_path, digits_dir):
    for step in (2, 4):
        write_tiny_checkpoint(tmp_path / f"checkpoint_{step:08d}", f"{digits_dir}/val-000000.tar")
    assert resolve(tmp_path).name == "checkpoint_00000004"  # no snapshot: the newest complete one
    write_snapshot(str(tmp_path), ["checkpoint_00000002"])  # 4 still uploading
    assert resolve(tmp_path).name == "checkpoint_00000002"


def test_serving_pins_a_bucket_version_to_its_registered_checkpoint(hand_run):
    from dtrain.serving.config import ServeArgs

    args = ServeArgs(models={"digits": {"versions": {"v1": hand_run}}}).resolved()
    assert args.models["digits"].versions["v1"] == f"{hand_run}/checkpoint_00000002"  # every replica fetches it
    single = ServeArgs(checkpoint=hand_run).resolved()
    assert single.models == {"run": single.models["run"]}
    assert single.models["run"].versions == {"checkpoint_00000002": f"{hand_run}/checkpoint_00000002"}


@pytest.fixture(scope="module")
def bucket_digits(s3_bucket, digits_dir):
    """The digits shards, copied into the bucket."""
    upload(digits_dir, f"{s3_bucket}/data/digits")
    return f"{s3_bucket}/data/digits"


def test_shards_in_the_bucket_read_and_resume_as_local_ones(bucket_digits, digits_dir):
    from itertools import islice

    import torch

    from dtrain.data.shards import DataError, expand_urls, load_images, shard_count, train_batches

    local, remote = (f"{d}/train-{{000000..000003}}.tar" for d in (digits_dir, bucket_digits))
    assert [shard_count(u) for u in expand_urls(remote)] == [shard_count(u) for u in expand_urls(local)]
    ref = list(islice(train_batches(local, 0, 2, 0, 16, 32), 12))
    got = list(islice(train_batches(remote, 0, 2, 0, 16, 32), 12))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(ref, got))
    # a resume deep into the data skips whole shards by their counts, as locally: the same batches follow
    deep = len(ref) + 60
    assert torch.equal(next(train_batches(remote, 0, 2, 0, 16, 32, skip=deep))[0],
                       next(islice(train_batches(local, 0, 2, 0, 16, 32), deep, None))[0])
    x, y = load_images(f"{bucket_digits}/val-000000.tar")
    x0, y0 = load_images(f"{digits_dir}/val-000000.tar")
    assert torch.equal(x, x0) and torch.equal(y, y0)
    with pytest.raises(DataError, match="1 shard.*not found.*train-000004.tar"):
        expand_urls(f"{bucket_digits}/train-{{000003..000004}}.tar")


@pytest.fixture(scope="module")
def bucket_run(ray_cluster, s3_bucket, digits_dir, tmp_path_factory):
    """4 steps to the bucket, then the same run continued to 6 (a rerun resumes from the bucket)."""
    from dtrain.config import load_config
    from dtrain.train.driver import fit

    tmp = tmp_path_factory.mktemp("s3run")
    base = tiny_overrides(digits_dir, tmp) + [f"train.storage_path={s3_bucket}/runs", "train.run_name=s3run",
                                              "train.ckpt_every=2"]
    first = fit(load_config("configs/quickstart.yaml", base + ["train.steps=4"]))
    cfg = load_config("configs/quickstart.yaml", base + ["train.steps=6"])
    return cfg, first, fit(cfg)


@pytest.mark.slow
def test_training_writes_to_the_bucket_and_resumes_from_it(bucket_run, s3_bucket):
    from dtrain.train.driver import run_dir

    cfg, first, final = bucket_run
    run = f"{s3_bucket}/runs/s3run"
    assert (first, final) == (f"{run}/checkpoint_00000004", f"{run}/checkpoint_00000006")
    assert registered_checkpoints(run) == ["checkpoint_00000004", "checkpoint_00000006"]  # num_to_keep=2
    fs, path = pyarrow.fs.FileSystem.from_uri(f"{final}/deepspeed")
    shards = [i.path for i in fs.get_file_info(pyarrow.fs.FileSelector(path, recursive=True))]
    assert any("zero_pp_rank_0" in s for s in shards) and any("zero_pp_rank_1" in s for s in shards)
    assert read_meta(final)["step"] == 6
    logged = [json.loads(line)["step"] for line in (run_dir(cfg) / "metrics.jsonl").read_text().splitlines()]
    assert logged == [2, 4, 6]  # the rerun went on from step 4: it did not train 0-4 again
    assert not list(run_dir(cfg).glob("checkpoint_*"))  # checkpoints live in the bucket only


@pytest.mark.slow
def test_sample_and_export_read_a_run_in_the_bucket(bucket_run, s3_bucket, tmp_path):
    from click.testing import CliRunner

    from dtrain.cli import main

    run = f"{s3_bucket}/runs/s3run"
    r = CliRunner().invoke(main, ["sample", run, "--out", str(tmp_path / "grid.png"), "--steps", "2"])
    assert r.exit_code == 0 and (tmp_path / "grid.png").stat().st_size > 0, r.output
    out = export(run, tmp_path / "model.safetensors")
    assert read_meta(out)["step"] == 6


@pytest.mark.slow
def test_a_pipeline_runs_in_the_bucket_and_resumes_from_it(ray_cluster, s3_bucket, bucket_digits, tmp_path, capsys):
    """Data, runs, reflow pairs, the pipeline's state and its evaluation all in the bucket; nothing
    of it in the working directory."""
    from dtrain.eval.pipeline import evaluate_pipeline
    from dtrain.storage import exists, read_text
    from dtrain.train.pipeline import load_pipeline, run_pipeline, state_path

    root = f"{s3_bucket}/pipe"
    overrides = tiny_overrides(bucket_digits, tmp_path) + [f"train.storage_path={root}", "train.steps=4",
                                                           "train.ckpt_every=4", "tracking.wandb=true"]
    (tmp_path / "exp.yaml").write_text(open("configs/quickstart.yaml").read())
    path = tmp_path / "p.yaml"
    path.write_text("name: s3\nconfig: exp.yaml\noverrides: " + json.dumps(overrides) + "\nstages:\n"
                    "  - kind: pretrain\n  - kind: reflow\n    pairs: {count: 32, per_shard: 16, steps: 2, sampler: euler}\n"
                    "    overrides: [train.steps=2, sample.guidance=1.0]\n"
                    "eval: {steps: [2], samples_per_class: 2, audit: false}\n")
    p = load_pipeline(path)
    state = run_pipeline(p)
    pre, ref = state["stages"]["pretrain"]["checkpoint"], state["stages"]["reflow"]["checkpoint"]
    assert pre == f"{root}/s3-pretrain/checkpoint_00000004" and ref == f"{root}/s3-reflow/checkpoint_00000002"
    meta = read_meta(ref)
    assert meta["parent"] == meta["teacher"] == pre and meta["pairs"] == f"{root}/s3-reflow-pairs"
    assert json.loads(read_text(f"{root}/s3-reflow-pairs/pairs.json"))["teacher"] == pre
    assert all(exists(f"{root}/s3-reflow-pairs/pairs-{i:06d}.tar") for i in (0, 1))
    assert json.loads(read_text(state_path(p)))["stages"]["reflow"]["checkpoint"] == ref
    assert not (tmp_path / "runs").exists()

    capsys.readouterr()
    assert run_pipeline(p) == state  # the rerun finds every stage done in the bucket
    out = capsys.readouterr().out
    assert "stage pretrain done" in out and "stage reflow done" in out

    result = evaluate_pipeline(p, state, log=lambda s: None)
    assert json.loads(read_text(f"{root}/s3-eval/eval.json"))["stages"]["reflow"]["teacher"] == pre
    assert exists(f"{root}/s3-eval/fd_vs_nfe.png") and [r["stage"] for r in result["rows"]] == ["pretrain", "reflow"]

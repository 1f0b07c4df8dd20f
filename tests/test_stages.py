"""Stages, reflow pairs and the pipeline config: pairs written and read back with their seeds, the same
on any worker count, resumable; lineage a reflow stage records; pipeline files checked up front."""
import json
import os

import pytest
import torch

from dtrain.checkpoint import write_inference_files
from dtrain.config import ConfigError, load_config
from dtrain.train.pipeline import load_pipeline, stage_config
from dtrain.data.shards import CorruptShards, DataError, train_batches
from dtrain.diffusion.samplers import initial_noise
from dtrain.generation import solve
from dtrain.models import build_model
from dtrain.train.pairs import generate_pairs, shard_urls, write_pair_shard
from dtrain.train.stages import build_stage, check_stage


@pytest.fixture
def teacher(tmp_path):
    cfg = load_config(None, ["model.size=tiny", "model.image_size=8", "model.patch_size=2"])
    torch.manual_seed(0)
    net = build_model(cfg.model)
    for p in net.parameters():  # random weights: the zero-initialised output layer would give plain noise
        p.data.add_(0.1 * torch.randn_like(p))
    write_inference_files(tmp_path / "teacher", net.state_dict(), cfg, {"step": 7, "stage": "pretrain"})
    return tmp_path / "teacher", net.eval(), cfg


def _pairs(urls):
    """Every (x, label, noise) of some pair shards, with their seeds, in shard order."""
    import webdataset as wds

    from dtrain.data.shards import expand_urls

    return [(int(s["seed"]), s) for s in wds.DataPipeline(wds.SimpleShardList(expand_urls(urls)),
                                                        wds.tarfile_to_samples())]


def test_a_pair_shard_holds_the_teachers_ode_solution_for_its_seeds(teacher, tmp_path):
    path, net, cfg = teacher
    shard = write_pair_shard(str(path), str(tmp_path), index=1, per_shard=6, steps=3, sampler="heun", guidance=1.0)
    x, y, noise = next(train_batches(shard, 0, 1, seed=0, batch_size=6, shuffle_buffer=1))
    seeds = [seed for seed, _ in _pairs(shard)]
    assert sorted(seeds) == list(range(6, 12))  # shard 1 of 6: seeds 6..11
    order = torch.tensor(seeds).argsort()  # the one-sample buffer keeps shard order, but be explicit
    x, y, noise = x[order], y[order], noise[order]
    assert torch.equal(y, torch.arange(6, 12) % 10)
    assert torch.equal(noise, initial_noise((1, 8, 8), list(range(6, 12))))
    want = solve(net, cfg, torch.arange(6, 12) % 10, list(range(6, 12)), 3, 1.0, "fp32", "heun")
    assert torch.allclose(x, want, atol=1e-5)
    assert not list(tmp_path.glob(".*.tmp"))


def test_pairs_job_matches_one_process_and_resumes_only_missing_shards(ray_cluster, teacher, tmp_path):
    path, _, _ = teacher
    out = tmp_path / "pairs"
    shards = generate_pairs(str(path), out, count=8, per_shard=4, steps=2, sampler="euler")
    assert [os.path.basename(s) for s in shards] == ["pairs-000000.tar", "pairs-000001.tar"]
    alone = write_pair_shard(str(path), str(tmp_path), 1, 4, 2, "euler", 1.0)  # one process, no Ray
    a = {k: s["x.npy"] for k, s in _pairs(shards[1])}
    assert a == {k: s["x.npy"] for k, s in _pairs(alone)}  # the same bytes whoever made them
    info = json.loads((out / "pairs.json").read_text())
    assert info["teacher"] == str(path.resolve()) and info["teacher_reflow_k"] == 1 and info["sampler"] == "euler"

    kept = os.stat(shards[0]).st_mtime_ns
    os.remove(shards[1])  # a job killed before its second shard was finished
    generate_pairs(str(path), out, count=8, per_shard=4, steps=2, sampler="euler")
    assert os.stat(shards[0]).st_mtime_ns == kept  # finished shards are not made again
    assert {k: s["x.npy"] for k, s in _pairs(shards[1])} == a
    with pytest.raises(DataError, match="other settings"):
        generate_pairs(str(path), out, count=8, per_shard=4, steps=3, sampler="euler")


def test_reflow_stage_records_its_lineage_and_needs_pairs(teacher, tmp_path, digits_dir):
    path, _, _ = teacher
    out = tmp_path / "p"
    write_pair_shard(str(path), str(out), 0, 4, 2, "euler", 1.0)
    (out / "pairs.json").write_text(json.dumps({"teacher": str(path), "teacher_reflow_k": 2}))
    cfg = load_config(None, ["stage.name=reflow", f"stage.init_from={path}", f"data.train_shards={shard_urls(out, 4, 4)}",
                             "data.batch_size=4", "data.shuffle_buffer=4", "model.image_size=8"])
    stage = build_stage(cfg)
    meta = stage.meta()
    assert meta["stage"] == "reflow" and meta["reflow_k"] == 3 and meta["teacher"] == str(path)
    assert meta["parent"] == str(path.resolve())
    assert set(stage.initial_weights()) == set(build_model(cfg.model).state_dict())
    batch = next(stage.batches(cfg, 0, 1, 0, CorruptShards()))
    assert set(batch) == {"x", "cond", "noise"} and batch["noise"].shape == batch["x"].shape == (4, 1, 8, 8)
    with pytest.raises(DataError, match="dtrain pairs"):
        build_stage(load_config(None, ["stage.name=reflow", f"data.train_shards={digits_dir}/train-000000.tar"]))
    with pytest.raises(ConfigError, match="rectified_flow"):
        check_stage(load_config(None, ["stage.name=reflow", "objective.name=ddpm"]))


def test_pipeline_file_names_stages_and_checks_every_stage_first(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text("train:\n  steps: 5\n")
    good = tmp_path / "p.yaml"
    good.write_text("name: demo\nconfig: exp.yaml\nstages:\n  - kind: pretrain\n  - kind: reflow\n"
                    "  - kind: reflow\n    overrides: [train.steps=3]\n")
    p = load_pipeline(good, ["train.lr=0.01"])
    assert [s.name for s in p.stages] == ["pretrain", "reflow", "reflow2"]
    c = stage_config(p, p.stages[2])
    assert c.stage.name == "reflow" and c.train.steps == 3 and c.train.lr == 0.01
    bad = tmp_path / "bad.yaml"
    bad.write_text("config: exp.yaml\nstages:\n  - kind: pretrain\n  - kind: reflow\n    overrides: [train.stepz=3]\n")
    with pytest.raises(ConfigError, match="stage 'reflow'.*stepz"):
        load_pipeline(bad)
    first = tmp_path / "first.yaml"
    first.write_text("config: exp.yaml\nstages:\n  - kind: reflow\n")
    with pytest.raises(ConfigError, match="stages.0..kind: reflow is taught by an earlier stage"):
        load_pipeline(first)
    later = tmp_path / "later.yaml"  # a parent must be an earlier stage
    later.write_text("config: exp.yaml\nstages:\n  - kind: pretrain\n  - kind: reflow\n    parent: distill\n"
                     "  - kind: distill\n")
    with pytest.raises(ConfigError, match="stages\\[1\\].parent.*'distill' is not a stage before 'reflow'"):
        load_pipeline(later)


def test_the_shipped_quickstart_pipeline_loads():
    p = load_pipeline("configs/pipeline.yaml")
    assert [(s.kind, s.name) for s in p.stages] == [("pretrain", "pretrain"), ("reflow", "reflow"),
                                                    ("consistency_distill", "distill")]
    assert stage_config(p, p.stages[2], ["stage.teacher=x"]).sample.sampler == "consistency"


def test_the_larger_preset_loads_with_a_flow_map_of_the_pretrained_stage():
    p = load_pipeline("configs/pipeline-large.yaml")
    assert [(s.kind, s.name, s.parent) for s in p.stages] == [
        ("pretrain", "pretrain", ""), ("reflow", "reflow", ""), ("consistency_distill", "distill", ""),
        ("consistency_distill", "distill_direct", "pretrain"), ("flow_map_distill", "flowmap", "pretrain")]
    fm = stage_config(p, p.stages[4], ["stage.teacher=x"])
    assert fm.model.flow_map and fm.objective.name == "mean_flow" and fm.sample.sampler == "flow_map"

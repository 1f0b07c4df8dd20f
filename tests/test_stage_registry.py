"""A new stage kind is one class in one file: this one registers `one_class` (flow matching on the images
of a single class, a toy of a fine-tuning stage) and trains it through the pipeline on the real stack,
without an edit anywhere else."""
from __future__ import annotations

import json
import sys

import pytest
import ray.cloudpickle
import torch

from dtrain.checkpoint import read_meta
from dtrain.config import ConfigError, load_config
from dtrain.train.pipeline import load_pipeline, run_pipeline
from dtrain.train.stages import STAGES, Stage, check_stage, register
from tests.conftest import tiny_overrides

ONLY = 3  # the class the toy stage trains on


@register
class OneClass(Stage):
    """Rectified flow on the images of class ONLY alone."""
    name = "one_class"

    @classmethod
    def check(cls, cfg) -> None:
        if cfg.model.class_dropout != 0.0:
            raise ConfigError("model.class_dropout: one_class trains one label, so it needs 0 (no null label)")

    @classmethod
    def build(cls, cfg) -> Stage:
        stage = super().build(cfg)
        stage.lineage["only_class"] = ONLY
        return stage

    def batches(self, cfg, rank, world, skip, on_corrupt):
        for batch in super().batches(cfg, rank, world, skip, on_corrupt):
            keep = batch["cond"] == ONLY
            if keep.any():
                yield {"x": batch["x"][keep], "cond": batch["cond"][keep]}


# Ray workers unpickle the class the driver hands them: by value, since they cannot import this test file
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_a_registered_kind_is_checked_by_its_own_rules():
    assert STAGES["one_class"] is OneClass
    with pytest.raises(ConfigError, match="class_dropout"):
        check_stage(load_config(None, ["stage.name=one_class"]))
    check_stage(load_config(None, ["stage.name=one_class", "model.class_dropout=0.0"]))
    with pytest.raises(ConfigError, match="stage.name: 'two_class' is not one of"):
        check_stage(load_config(None, ["stage.name=two_class"]))


def test_batches_of_the_toy_kind_hold_its_class_only(digits_dir, tmp_path):
    from dtrain.data.shards import CorruptShards
    from dtrain.train.stages import build_stage

    cfg = load_config(None, tiny_overrides(digits_dir, tmp_path) + ["stage.name=one_class", "model.class_dropout=0.0"])
    batch = next(build_stage(cfg).batches(cfg, 0, 1, 0, CorruptShards()))
    assert len(batch["cond"]) > 0 and bool((batch["cond"] == ONLY).all())


@pytest.mark.slow
def test_a_kind_registered_in_a_test_file_trains_through_the_pipeline(ray_cluster, digits_dir, tmp_path):
    overrides = tiny_overrides(digits_dir, tmp_path) + ["train.steps=4", "train.ckpt_every=4", "model.class_dropout=0.0"]
    (tmp_path / "exp.yaml").write_text("{}\n")
    path = tmp_path / "toy.yaml"
    path.write_text("name: toy\nconfig: exp.yaml\noverrides: " + json.dumps(overrides)
                    + "\nstages:\n  - kind: one_class\n")
    state = run_pipeline(load_pipeline(path))
    assert state["stages"]["one_class"]["kind"] == "one_class"
    meta = read_meta(state["stages"]["one_class"]["checkpoint"])
    assert meta["stage"] == "one_class" and meta["only_class"] == ONLY and meta["step"] == 4
    assert torch.isfinite(torch.tensor(json.loads((tmp_path / "runs" / "toy.pipeline.json").read_text())
                                       ["stages"]["one_class"]["seconds"]))


def test_a_rerun_with_a_changed_model_is_refused_before_any_worker_starts(tmp_path, tiny_checkpoint):
    """The same run_name resumes its newest checkpoint: another model cannot load it, so fit says which
    fields changed instead of every worker failing in load_state_dict."""
    from dtrain.config import ConfigError, load_config
    from dtrain.train.driver import check_resumable
    from tests.conftest import write_tiny_checkpoint

    val = str(tiny_checkpoint.parent.parent / "digits" / "val-000000.tar")
    write_tiny_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint_000010", val)
    same = ["model.size=tiny", "model.image_size=8", "model.patch_size=2", "train.run_name=tiny",
            f"train.storage_path={tmp_path}/runs"]
    check_resumable(load_config(None, same))  # the same model resumes
    with pytest.raises(ConfigError, match=r"model.depth 0 -> 3.*new train.run_name"):
        check_resumable(load_config(None, same + ["model.depth=3"]))
    check_resumable(load_config(None, same + ["model.depth=3", "train.run_name=other"]))  # a new run starts afresh


def test_a_local_gpu_run_on_a_machine_without_cuda_is_refused_at_once():
    """Ray would otherwise wait for GPUs that never come; a cluster address defers to the workers' nodes."""
    from dtrain.train.driver import check_devices

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(ConfigError, match="scaling.use_gpu=true, but this machine has no CUDA device"):
        check_devices(load_config(None, ["scaling.use_gpu=true"]))
    check_devices(load_config(None, ["scaling.use_gpu=true", "scaling.address=ray://head:10001"]))
    check_devices(load_config(None, []))

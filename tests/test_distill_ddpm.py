"""Distillation stages on the real stack beyond the pipeline's: a consistency student of a DDPM teacher (its
eps predictions on a VP path read as velocities on the student's linear path), and a flow map (MeanFlow)
distilled from a velocity teacher."""
from __future__ import annotations

import pytest
import torch

from dtrain.checkpoint import load_model, read_meta, write_inference_files
from dtrain.config import load_config
from dtrain.generation import render
from dtrain.models import build_model
from dtrain.train.driver import fit
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow


def test_a_ddpm_teacher_distils_into_a_one_step_student(ray_cluster, digits_dir, tmp_path):
    teacher_cfg = load_config(None, ["model.size=tiny", "model.image_size=8", "model.patch_size=2",
                                     "objective.name=ddpm", "objective.prediction=eps", "objective.schedule=cosine",
                                     "sample.sampler=ddim"])
    torch.manual_seed(0)
    weights = {k: v + 0.05 * torch.randn_like(v) for k, v in build_model(teacher_cfg.model).state_dict().items()}
    teacher = tmp_path / "ddpm" / "ckpt"
    write_inference_files(teacher, weights, teacher_cfg, {"step": 0})
    cfg = load_config("configs/quickstart.yaml", tiny_overrides(digits_dir, tmp_path) + [
        "model.hidden_size=0", "model.depth=0", "stage.name=consistency_distill", f"stage.teacher={teacher}",
        "train.steps=2", "train.ckpt_every=2", "train.run_name=ddpm-distill", "stage.intervals=[2,4]",
        "sample.sampler=consistency", "sample.steps=1", "sample.guidance=1.0"])
    ckpt = fit(cfg)
    meta = read_meta(ckpt)
    assert meta["stage"] == "consistency_distill" and meta["teacher"] == str(teacher.resolve()) and meta["step"] == 2
    net, loaded = load_model(ckpt)
    x = render(net, loaded, meta, torch.arange(4), [0, 1, 2, 3], steps=1, guidance=1.0, sampler="consistency")
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_a_flow_map_distils_from_a_velocity_teacher(ray_cluster, digits_dir, tmp_path, tiny_checkpoint):
    cfg = load_config("configs/quickstart.yaml", tiny_overrides(digits_dir, tmp_path) + [
        "model.hidden_size=0", "model.depth=0", "stage.name=flow_map_distill", f"stage.teacher={tiny_checkpoint}",
        f"stage.init_from={tiny_checkpoint}", "model.flow_map=true", "objective.name=mean_flow",
        "train.steps=2", "train.ckpt_every=2", "train.run_name=mf-distill", "sample.sampler=flow_map",
        "sample.steps=1", "sample.guidance=1.0"])
    ckpt = fit(cfg)
    meta = read_meta(ckpt)
    assert meta["stage"] == "flow_map_distill" and meta["jvp"] == "forward" and meta["objective"] == "mean_flow"
    net, loaded = load_model(ckpt)
    x = render(net, loaded, meta, torch.arange(4), [0, 1, 2, 3], steps=1, guidance=1.0, sampler="flow_map")
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_a_consistency_distillation_killed_mid_run_resumes_exactly(ray_cluster, digits_dir, tmp_path, tiny_checkpoint):
    """The last rank dies after step 5; Ray Train restarts from the step-4 checkpoint, which carries the EMA
    target network (stage.safetensors): the final weights equal an uninterrupted run's (and do not when the
    target restarts from the parent, as it did before)."""
    from dtrain.checkpoint import STAGE_STATE_FILE, read_weights
    from dtrain.train.driver import run_dir

    common = tiny_overrides(digits_dir, tmp_path) + [
        "model.hidden_size=0", "model.depth=0", "stage.name=distill", f"stage.teacher={tiny_checkpoint}",
        f"stage.init_from={tiny_checkpoint}", "stage.target_decay=0.5", "stage.intervals=[2,4]",
        "train.steps=6", "train.ckpt_every=2", "train.precision=fp32", "train.ema_decay=0.0", "train.warmup_steps=0",
        "sample.sampler=consistency"]  # raw weights (no EMA), full learning rate: the target's state matters
    clean = fit(load_config("configs/quickstart.yaml", common + ["train.run_name=cd-clean"]))
    crashed_cfg = load_config("configs/quickstart.yaml", common + ["train.run_name=cd-crash", "train.fault_drill_step=5",
                                                                   "train.max_failures=1"])
    crashed = fit(crashed_cfg)
    assert (run_dir(crashed_cfg) / ".fault_drill_done").exists()  # it really died and resumed
    assert (crashed / STAGE_STATE_FILE).is_file()
    a, b = read_weights(clean), read_weights(crashed)
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-6), k

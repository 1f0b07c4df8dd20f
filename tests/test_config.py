import subprocess
import sys

import pytest

from dtrain.config import Config, ConfigError, from_yaml, load_config, to_yaml


def test_defaults_validate_and_round_trip_through_yaml():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert from_yaml(to_yaml(cfg)) == cfg


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 7\n  lr: 0.01\nmodel:\n  size: mini\n")
    cfg = load_config(path, ["train.steps=9", "scaling.num_workers=3"])
    assert (cfg.train.steps, cfg.train.lr, cfg.model.size, cfg.scaling.num_workers) == (9, 0.01, "mini", 3)


@pytest.mark.parametrize("override, names", [
    ("train.stepz=5", "train.stepz"),
    ("trian.steps=5", "trian"),
    ("train.steps=abc", "train.steps"),
    ("train.zero_stage=4", "train.zero_stage"),
    ("model.size=huge", "model.size"),
    ("model.image_size=15", "model.image_size"),
    ("train.precision=fp8", "train.precision"),
    ("objective.name=gan", "objective.name"),
    ("train.offload_params=true", "train.offload_params"),  # ZeRO-3 only
    ("train.precision=fp16", "train.precision"),  # GPU only
    ("train.grad_accum_steps=0", "train.grad_accum_steps"),
    ("data.on_corrupt=ignore", "data.on_corrupt"),
    ("train.fault_drill_in_save=true", "train.fault_drill_in_save"),  # needs a checkpoint step
    ("train.ckpt_every_minutes=-1", "train.ckpt_every_minutes"),
    ("train.val_every=-5", "train.val_every"),
])
def test_bad_override_names_the_key(override, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        load_config(None, [override])


def test_unknown_key_in_yaml_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stpes: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "bad.yaml" in str(e.value) and "train.stpes" in str(e.value)


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_cli_prints_resolved_config_and_rejects_bad_keys(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "dtrain.cli", "config", "configs/quickstart.yaml", "train.steps=3"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "steps: 3" in ok.stdout and "zero_stage: 2" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "dtrain.cli", "config", "configs/quickstart.yaml", "train.nope=1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "train.nope" in bad.stderr and "Traceback" not in bad.stderr


def test_deepspeed_config_follows_the_typed_config():
    from dtrain.train.deepspeed_glue import deepspeed_config, lr_lambda

    cfg = load_config(None, ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true",
                             "train.grad_accum_steps=4", "data.batch_size=8", "train.precision=fp32"])
    ds = deepspeed_config(cfg, world_size=2)
    assert ds["train_batch_size"] == 8 * 4 * 2 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"]["offload_optimizer"] == {"device": "cpu"}
    assert ds["zero_optimization"]["offload_param"] == {"device": "cpu"}
    assert ds["optimizer"]["type"] == "AdamW" and not ds["bf16"]["enabled"]  # offload needs DeepSpeed's CPU Adam
    plain = deepspeed_config(load_config(None, ["train.zero_stage=1", "train.precision=bf16"]), world_size=2)
    assert "optimizer" not in plain and plain["zero_allow_untested_optimizer"] and plain["bf16"]["enabled"]
    # reduce buckets are kept small: the default is a 2 GB fp32 buffer per rank
    assert plain["zero_optimization"]["reduce_bucket_size"] <= 5e6
    f = lr_lambda(load_config(None, ["train.steps=100", "train.warmup_steps=10"]))
    assert f(0) == 0.1 and f(9) == 1.0 and abs(f(99) - 0.1) < 1e-3 and f(50) < f(20)


@pytest.mark.parametrize("override, choices", [
    ("sample.sampler=dpm", "euler, heun, ddim, consistency, flow_map"),
    ("objective.jvp=reverse", "auto, forward, double_backward, finite_difference"),
    ("objective.schedule=linear", "cosine, vp_linear"),
    ("objective.prediction=score", "eps, v, x0"),
    ("objective.time_sampling=beta", "uniform, logit_normal"),
    ("stage.teacher_solver=rk4", "euler, heun"),
    ("tracking.mode=cloud", "auto, online, offline, disabled"),
    ("model.arch=unet", "dit, ssm, mlp"),
])
def test_a_choice_outside_its_set_is_refused_by_the_type_naming_key_and_choices(override, choices):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')}'?: Invalid value .*expected one of \[{choices}\]"):
        load_config(None, [override])


def test_choices_load_as_plain_strings_and_round_trip():
    cfg = load_config(None, ["sample.sampler=heun", "objective.name=ddpm", "train.precision=fp32"])
    assert type(cfg.sample.sampler) is str and type(cfg.objective.name) is str and cfg.train.precision == "fp32"
    assert from_yaml(to_yaml(cfg)) == cfg


def test_a_pipeline_file_with_a_sampler_outside_the_registry_is_refused(tmp_path):
    from dtrain.config import read_pipeline

    (tmp_path / "exp.yaml").write_text("{}\n")
    path = tmp_path / "p.yaml"
    path.write_text("config: exp.yaml\nstages:\n  - kind: pretrain\neval:\n  samplers: [euler, dpm]\n")
    with pytest.raises(ConfigError, match=r"eval.samplers.*dpm"):
        read_pipeline(path)

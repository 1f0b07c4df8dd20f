"""The driver: a Ray Train TorchTrainer that runs train_func on N workers (gloo on CPU)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dtrain.config import Config, to_yaml
from dtrain.data.shards import absolute_urls, expand_urls
from dtrain.runtime import ensure_ray
from dtrain.train.deepspeed_glue import deepspeed_config
from dtrain.train.loop import train_func


def run_dir(cfg: Config) -> Path:
    return Path(cfg.train.storage_path).resolve() / cfg.train.run_name


def fit(cfg: Config) -> Path:
    """Train (or resume: the same run_name continues from its latest checkpoint); returns the final
    checkpoint directory."""
    s = cfg.scaling
    deepspeed_config(cfg, s.num_workers)  # config errors here, not in a worker
    cfg = replace(cfg, data=replace(cfg.data, train_shards=absolute_urls(cfg.data.train_shards),
                                    val_shards=absolute_urls(cfg.data.val_shards)))
    if not s.address:
        expand_urls(cfg.data.train_shards)  # missing local shards fail here too
    out = run_dir(cfg)
    ensure_ray(s.address, s.num_workers * s.cpus_per_worker)
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"yaml": to_yaml(cfg), "run_dir": str(out)},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=str(out.parent),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.train.run_name} finished without a checkpoint")
    return Path(result.checkpoint.path)

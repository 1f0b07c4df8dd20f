"""Typed experiment config: the only reader of YAML files and `key=value` overrides.

A config is a tree of dataclasses. YAML files and CLI overrides merge onto the defaults in struct
mode, so an unknown or mistyped key fails with an error that names it, before any worker starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key."""


@dataclass
class ModelConfig:
    arch: str = "dit"  # backbone family, a key of dtrain.models.BACKBONES: dit | ssm (SSM-hybrid) | mlp (vectors)
    size: str = "tiny"  # named size in that family's registry (tiny, S, B, L, XL, ...)
    image_size: int = 16  # side of the (square) input in pixels or latent cells
    in_channels: int = 1  # 1 for grayscale digits, 4 for SD-VAE latents
    patch_size: int = 2  # side of a patch token
    num_classes: int = 10  # class labels; index num_classes is the "null" label for CFG
    class_dropout: float = 0.1  # probability of dropping the label in training (enables CFG)
    hidden_size: int = 0  # 0 = take from the named size
    depth: int = 0  # 0 = take from the named size
    num_heads: int = 0  # 0 = take from the named size
    mlp_ratio: float = 4.0  # MLP width / hidden size
    qk_norm: bool = False  # RMS-normalise queries and keys (stabilises large models in bf16)
    attn_every: int = -1  # ssm only: every k-th block is attention, 0 = pure SSM, -1 = the size's own


@dataclass
class DataConfig:
    train_shards: str = "data/digits/train-{000000..000003}.tar"  # WebDataset URL(s), brace syntax
    val_shards: str = "data/digits/val-000000.tar"  # validation shards (class-balanced)
    batch_size: int = 64  # per worker
    shuffle_buffer: int = 512  # in-memory sample shuffle buffer per worker
    loader_workers: int = 0  # torch DataLoader processes per Ray worker (0 = in the training process)
    on_corrupt: str = "skip"  # a shard that cannot be read: skip (warn and count) | fail


@dataclass
class ObjectiveConfig:
    name: str = "rectified_flow"  # a key of dtrain.diffusion.OBJECTIVES
    time_sampling: str = "logit_normal"  # how t is drawn in training: uniform | logit_normal (SD3)


@dataclass
class TrainConfig:
    run_name: str = "quickstart"  # Ray Train run name; rerunning the same name resumes
    storage_path: str = "runs"  # where runs and checkpoints live (local dir or shared FS / URI)
    steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 50  # linear LR warmup
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    ema_decay: float = 0.999  # EMA of weights used for sampling and serving
    grad_accum_steps: int = 1  # micro-batches per optimizer step (global batch = batch_size x this x workers)
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    # auto = bf16 where the hardware runs it natively (AMX/AVX512-BF16 CPUs, bf16 GPUs), else fp32 (fp16 on
    # older GPUs); see dtrain.precision. bf16 | fp32 | fp16 (GPU only) force one.
    precision: str = "auto"
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state and step on the CPU (DeepSpeedCPUAdam)
    offload_params: bool = False  # ZeRO-3: parameters live in CPU memory between uses
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile the model inside the DeepSpeed engine (cold compile: tens of seconds)
    seed: int = 0
    log_every: int = 10  # steps between metric reports
    val_every: int = 0  # steps between validation losses on data.val_shards (fixed noise and times; 0 = off)
    ckpt_every: int = 250  # steps between checkpoints (and one at the end)
    ckpt_every_minutes: float = 0.0  # also checkpoint when this much wall time passed since the last one (0 = off)
    max_failures: int = 0  # worker failures Ray Train recovers from by restarting the group
    fault_drill_step: int = 0  # fault drill: the last rank exits abruptly after this many steps, once per run dir (0 = off)
    fault_drill_in_save: bool = False  # ...instead inside the checkpoint at that step, its own shard written, before it reports


@dataclass
class ScalingConfig:
    num_workers: int = 2  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    address: Optional[str] = None  # Ray cluster address; None starts a local cluster


@dataclass
class TrackingConfig:
    wandb: bool = True  # W&B run on rank 0 (offline when WANDB_API_KEY is unset)
    project: str = "dtrain"
    mode: str = "auto"  # auto | online | offline | disabled
    sample_every: int = 0  # steps between sample grids logged to W&B (0 = only at the end)


@dataclass
class SampleConfig:
    steps: int = 16  # Euler steps (network evaluations without guidance)
    guidance: float = 2.0  # classifier-free guidance scale (1 = off)
    per_class: int = 8  # samples per class in a grid


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    num_replicas: int = 1  # sampler replicas
    replica_cpus: float = 1.0  # CPUs reserved per sampler replica
    max_batch_size: int = 16  # dynamic batching: images per model call
    batch_wait_timeout_s: float = 0.01
    max_steps: int = 100  # largest step count a request may ask for
    max_images: int = 16  # largest num_images a request may ask for


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad key '{key}': {str(e).splitlines()[0]}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then validated. Returns a typed Config."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        cfg = _merge(cfg, OmegaConf.load(path), str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    typed: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(typed)
    return typed


def from_yaml(text: str) -> Config:
    """Rebuild a Config from the YAML a checkpoint carries (see to_yaml)."""
    cfg = _merge(OmegaConf.structured(Config), OmegaConf.create(text), "checkpoint config")
    typed: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(typed)
    return typed


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Semantic checks that types alone cannot express. Runs in the driver, before any worker."""
    from dtrain.diffusion import OBJECTIVES
    from dtrain.models import BACKBONES
    from dtrain.precision import PRECISIONS

    m, t = cfg.model, cfg.train
    _check(m.arch in BACKBONES, "model.arch", f"'{m.arch}' is not one of {sorted(BACKBONES)}")
    sizes = BACKBONES[m.arch].SIZES
    _check(m.size in sizes, "model.size", f"'{m.size}' is not a {m.arch} size: {sorted(sizes)}")
    _check(m.image_size % m.patch_size == 0, "model.image_size",
           f"{m.image_size} is not divisible by model.patch_size={m.patch_size}")
    _check(m.attn_every >= -1, "model.attn_every", "must be -1 (size default), 0 (pure SSM) or a block period")
    _check(0.0 <= m.class_dropout < 1.0, "model.class_dropout", "must be in [0, 1)")
    _check(cfg.objective.name in OBJECTIVES, "objective.name",
           f"'{cfg.objective.name}' is not one of {sorted(OBJECTIVES)}")
    _check(cfg.objective.time_sampling in ("uniform", "logit_normal"), "objective.time_sampling",
           "must be uniform or logit_normal")
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"{t.zero_stage} is not 0, 1, 2 or 3")
    _check(t.precision in PRECISIONS, "train.precision", f"'{t.precision}' is not one of {', '.join(PRECISIONS)}")
    _check(t.precision != "fp16" or cfg.scaling.use_gpu, "train.precision",
           "fp16 needs scaling.use_gpu=true (its loss scaler is a GPU path); use bf16 on CPU")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be at least 1")
    _check(not t.offload_params or t.zero_stage == 3, "train.offload_params",
           f"needs train.zero_stage=3 (got {t.zero_stage}): only ZeRO-3 partitions parameters")
    _check(not t.offload_optimizer or t.zero_stage >= 1, "train.offload_optimizer",
           "needs train.zero_stage >= 1: ZeRO-0 does not partition optimizer state")
    _check(cfg.data.on_corrupt in ("skip", "fail"), "data.on_corrupt", "must be skip or fail")
    _check(t.steps > 0, "train.steps", "must be positive")
    _check(t.lr > 0, "train.lr", "must be positive")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    _check(t.log_every > 0 and t.ckpt_every > 0, "train.log_every/ckpt_every", "must be positive")
    _check(t.ckpt_every_minutes >= 0, "train.ckpt_every_minutes", "must be >= 0 (0 = off)")
    _check(t.val_every >= 0, "train.val_every", "must be >= 0 (0 = off)")
    _check(not t.fault_drill_in_save or (t.fault_drill_step > 0 and (t.fault_drill_step % t.ckpt_every == 0
                                                                      or t.fault_drill_step == t.steps)),
           "train.fault_drill_in_save", f"train.fault_drill_step={t.fault_drill_step} is not a checkpoint step")
    _check(cfg.data.batch_size > 0, "data.batch_size", "must be positive")
    _check(cfg.scaling.num_workers > 0, "scaling.num_workers", "must be positive")
    _check(cfg.tracking.mode in ("auto", "online", "offline", "disabled"), "tracking.mode",
           "must be auto, online, offline or disabled")
    _check(cfg.sample.steps > 0, "sample.steps", "must be positive")

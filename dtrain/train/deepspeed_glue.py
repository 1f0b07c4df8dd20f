"""The one named distributed step: our typed config -> a DeepSpeed config -> a DeepSpeed engine."""
from __future__ import annotations

import math
import os

import torch

from dtrain.config import Config


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict:
    """A pure function of the (validated) config; the driver builds it before any worker starts.
    `load_universal`: the engine will resume from a universal checkpoint (another worker count).
    train.precision `auto` is resolved on the workers (dtrain.precision); the driver's check reads it as fp32."""
    t = cfg.train
    zero: dict = {
        "stage": t.zero_stage,
        # DeepSpeed's default buckets are 5e8 elements: a 2 GB fp32 buffer per rank. Keep them small.
        "reduce_bucket_size": 5e6,
        "allgather_bucket_size": 5e6,
        "overlap_comm": False,
    }
    if t.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=5e6, stage3_param_persistence_threshold=0,
                    stage3_gather_16bit_weights_on_model_save=False)
    if t.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if t.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    ds = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "train_batch_size": cfg.data.batch_size * t.grad_accum_steps * world_size,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0},  # 0: dynamic loss scaling
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if t.offload_optimizer:  # offloading needs DeepSpeed's own CPU Adam (a JIT-built op)
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.betas),
                                                       "weight_decay": t.weight_decay}}
    else:  # torch's AdamW as a client optimizer: no fused op to compile on CPU machines
        ds["zero_allow_untested_optimizer"] = True
    return ds


def lr_lambda(cfg: Config):
    """Linear warmup, then cosine decay to 10% of the peak (a multiplier of train.lr)."""
    t = cfg.train

    def f(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def wrap_deepspeed(net: torch.nn.Module, cfg: Config, world_size: int, load_universal: bool = False):
    """Returns the DeepSpeed engine; it reuses the process group Ray Train already made."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    t = cfg.train
    ds = deepspeed_config(cfg, world_size, load_universal)
    opt = None if "optimizer" in ds else torch.optim.AdamW(
        net.parameters(), lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=net, optimizer=opt, config=ds, dist_init_required=False,
        lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lr_lambda(cfg)))
    return engine


def prebuild_cpu_ops() -> None:
    """JIT-build DeepSpeed's CPU shared-memory op in the driver, once, before any worker starts, so on a
    fresh machine the workers load it instead of compiling it side by side during worker-group start.
    Later runs load it from ~/.cache/torch_extensions in a second."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None and deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        builder.load(verbose=False)


def frozen_engine(net: torch.nn.Module, cfg: Config, world_size: int, dtype: torch.dtype):
    """A frozen network beside the student (a teacher, a consistency target), sharded like it: under
    ZeRO-3 a DeepSpeed engine without an optimizer partitions its parameters (the reference-model
    pattern of DeepSpeed-Chat), so a model that only fits partitioned still distils; under ZeRO 0-2
    every rank holds it whole in the training precision. Forward only, eval mode."""
    net.requires_grad_(False)
    if cfg.train.zero_stage != 3:
        return net.to(dtype).eval()
    import deepspeed

    ds = {k: v for k, v in deepspeed_config(cfg, world_size).items() if k not in ("optimizer", "gradient_clipping")}
    engine, _, _, _ = deepspeed.initialize(model=net, config=ds, dist_init_required=False)
    engine.eval()  # DeepSpeed's eval() returns None, not the engine
    return engine

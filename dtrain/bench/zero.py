"""`dtrain bench zero`: model-state bytes per parameter on each rank at ZeRO stages 0-3, measured
on real DeepSpeed engines under Ray Train, against the ZeRO paper's formula.

How the bytes are counted (`model_state_bytes`), on every rank, after `steps` optimizer steps (so
Adam state exists) and one more backward pass, the first micro-batch of the next step (gradients
live; that step is not taken). With 2 micro-batches per step (the default) this is mid-accumulation,
where each stage holds the gradients it keeps between micro-batches: stage 1 the full gradients,
as the paper's formula assumes. With one micro-batch per step DeepSpeed's stage 1 reduces them
into partitions at the step boundary and holds what stage 2 does.

- params: each module parameter's local storage: `p.ds_tensor` under ZeRO-3 (this rank's
  partition), else the parameter itself (under ZeRO 1/2 a view into DeepSpeed's flat bf16 buffer).
- grads: each parameter's `.grad`, then every tensor reachable from `engine.optimizer` whose path
  names a gradient ("grad") or that is a `.grad`.
- buffers: DeepSpeed's reduce buckets (`ipg_buckets`: `reduce_bucket_size` elements, whatever the
  model size). The ZeRO paper (Sec. 3.2) counts such fused communication buffers as residual
  state, not model state, so they are reported beside the total, not in it.
- optimizer: every other tensor reachable from `engine.optimizer` (fp32 master copies, Adam
  moments, step counters, flat buffers), walking DeepSpeed and torch.optim objects, lists, tuples
  and dicts (keys too: torch optimizers key their state by parameter) to a depth limit.

A storage is counted once, at its full size (`untyped_storage().nbytes()`), in the category where
it is first met, in the order above: a view into a buffer already counted adds nothing.
"""
from __future__ import annotations

import resource
import tempfile
from dataclasses import replace

import ray.train
import torch
import torch.distributed as dist
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dtrain.config import Config, from_yaml, load_config, to_yaml
from dtrain.diffusion import build_objective
from dtrain.models import build_model
from dtrain.runtime import ensure_ray, pin_threads
from dtrain.precision import DTYPES, choose, in_precision
from dtrain.train.deepspeed_glue import deepspeed_config, wrap_deepspeed

# The ZeRO paper's model-state accounting (Rajbhandari et al. 2020, Sec. 3.1 and Fig. 1): per
# parameter, P bytes of weights, P of gradients and K of optimizer state. Mixed-precision Adam:
# P = 2 (bf16/fp16), K = 12 (fp32 master, momentum, variance). Plain fp32 Adam: P = 4, K = 8
# (DeepSpeed's ZeRO 1-3 keep an fp32 master partition even in fp32, so they measure above that).
PAPER_BYTES = {"bf16": (2, 12), "fp16": (2, 12), "fp32": (4, 8)}

DEFAULTS = ["model.arch=dit", "model.size=S", "model.image_size=16", "model.in_channels=1",
            "model.patch_size=2", "data.batch_size=8",  # DiT-S/2 on 16x16: 32.5M params
            "train.grad_accum_steps=2"]  # measured mid-accumulation (see the module docstring)
MAX_DEPTH = 6


def paper_bytes_per_param(stage: int, world: int, precision: str = "bf16") -> float:
    """Model-state bytes per parameter per rank: stage 0 P+P+K, 1 P+P+K/N, 2 P+(P+K)/N, 3 (P+P+K)/N."""
    p, k = PAPER_BYTES[precision]
    return [p + p + k, p + p + k / world, p + (p + k) / world, (p + p + k) / world][stage]


def model_state_bytes(module: torch.nn.Module, optimizer) -> dict[str, int]:
    """{params, grads, optimizer, buffers} bytes held by this process (see the module docstring)."""
    seen: set[int] = set()
    out = {"params": 0, "grads": 0, "optimizer": 0, "buffers": 0}

    def add(t: torch.Tensor | None, kind: str) -> None:
        if t is None:
            return
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            out[kind] += s.nbytes()

    params = list(module.parameters())
    for p in params:
        add(getattr(p, "ds_tensor", p), "params")
    for p in params:
        add(p.grad, "grads")

    visited: set[int] = set()

    def walk(obj, kind: str, depth: int) -> None:
        if depth > MAX_DEPTH or id(obj) in visited or isinstance(obj, torch.nn.Module):
            return  # modules (the engine, the model) are counted above, through their parameters
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            add(obj, kind)
            if obj.is_leaf:  # only leaves keep a .grad (reading it elsewhere warns)
                walk(obj.grad, "grads", depth + 1)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(key, kind, depth + 1)
                walk(value, _kind(key, kind), depth + 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                walk(value, kind, depth + 1)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            for name, value in vars(obj).items():
                walk(value, _kind(name, kind), depth + 1)

    walk(optimizer, "optimizer", 0)
    return out


def _kind(key, parent: str) -> str:
    """The category of what sits under attribute or dict key `key`: a path keeps the first it names."""
    if parent != "optimizer" or not isinstance(key, str):
        return parent
    key = key.lower()
    return "buffers" if "ipg" in key else "grads" if "grad" in key else parent


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def zero_worker(cfg_dict: dict) -> list[dict] | None:
    """One Ray Train worker: build, wrap, `steps` steps on random data, measure, gather to rank 0 (whose
    return value is `Result.return_value`; `Result.metrics` would carry rank 0's numbers only)."""
    cfg = from_yaml(cfg_dict["yaml"])
    world = ray.train.get_context().get_world_size()
    pin_threads(cfg.scaling.cpus_per_worker)
    m = cfg.model
    torch.manual_seed(cfg.train.seed)
    net = build_model(m)
    n_params = sum(p.numel() for p in net.parameters())
    engine = wrap_deepspeed(net, cfg, world)
    loss_fn = build_objective(cfg.objective)
    dtype = DTYPES[cfg.train.precision]
    x = torch.randn(cfg.data.batch_size, m.in_channels, m.image_size, m.image_size)
    y = torch.randint(0, m.num_classes, (cfg.data.batch_size,))
    micro_batches = cfg_dict["steps"] * cfg.train.grad_accum_steps
    for micro in range(micro_batches + 1):  # DeepSpeed steps the optimizer at each step's last micro-batch
        loss = loss_fn(in_precision(engine, dtype), {"x": x, "cond": y}).mean()
        engine.backward(loss)
        if micro < micro_batches:
            engine.step()
    mine = {**model_state_bytes(engine.module, engine.optimizer), "n_params": n_params,
            "peak_rss_mb": peak_rss_mb(), "optimizer_class": type(engine.optimizer).__name__}
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return gathered if dist.get_rank() == 0 else None


def measure(cfg: Config, num_workers: int, steps: int = 2) -> list[dict]:
    """Per-rank measurements of one short Ray Train run (a fresh worker group, so RSS is its own)."""
    ensure_ray(cfg.scaling.address, num_workers * cfg.scaling.cpus_per_worker)
    with tempfile.TemporaryDirectory() as storage:
        from dtrain.train.driver import LocalTorchTrainer

        trainer = (TorchTrainer if cfg.scaling.address else LocalTorchTrainer)(
            zero_worker, train_loop_config={"yaml": to_yaml(cfg), "steps": steps},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=num_workers,
                                         resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
            run_config=RunConfig(name=f"bench-zero{cfg.train.zero_stage}", storage_path=storage))
        return trainer.fit().return_value


def run(stages: tuple[int, ...] = (0, 1, 2, 3), num_workers: int = 2, precision: str = "bf16",
        steps: int = 2, overrides: tuple[str, ...] | list[str] = ()) -> tuple[list[dict], dict]:
    """One row per stage. `overrides` are dtrain config `key=value`s on top of DEFAULTS (DiT-S/2,
    16x16x1). Per-rank figures are the largest rank's: the one that has to fit in memory."""
    base = load_config(None, DEFAULTS + [f"train.precision={precision}", *overrides])
    precision = choose(base.train.precision).precision  # an override may have changed it; auto -> this CPU's
    base = replace(base, train=replace(base.train, precision=precision))
    rows, info, stage0 = [], {}, None
    for stage in sorted(stages):
        ranks = measure(replace(base, train=replace(base.train, zero_stage=stage)), num_workers, steps)
        n = ranks[0]["n_params"]
        per = {k: max(r[k] for r in ranks) / n for k in ("params", "grads", "optimizer", "buffers")}
        total = max(r["params"] + r["grads"] + r["optimizer"] for r in ranks) / n
        stage0 = total if stage == 0 else stage0
        paper = paper_bytes_per_param(stage, num_workers, precision) / paper_bytes_per_param(0, num_workers, precision)
        ratio = total / stage0 if stage0 else None  # only when stage 0 was measured in this run
        rows.append({"stage": stage, "params_B": round(per["params"], 3), "grads_B": round(per["grads"], 3),
                     "optimizer_B": round(per["optimizer"], 3), "total_B": round(total, 3),
                     "buffers_B": round(per["buffers"], 3),
                     "ratio": ratio and round(ratio, 4), "paper_ratio": round(paper, 4),
                     "rel_dev": ratio and round(ratio / paper - 1, 4),
                     "peak_rss_mb": round(max(r["peak_rss_mb"] for r in ranks), 1)})
        info[f"optimizer_stage{stage}"] = ranks[0]["optimizer_class"]
        info["params"] = n
    m = base.model
    summary = {"unit": "bytes per parameter per rank (largest rank); total = params + grads + optimizer",
               "workers": num_workers, "precision": precision,
               "model": f"{m.arch}-{m.size}/{m.patch_size} {m.image_size}x{m.image_size}x{m.in_channels}",
               "micro_batches_per_step": base.train.grad_accum_steps,
               "reduce_bucket_elems": deepspeed_config(base, num_workers)["zero_optimization"]["reduce_bucket_size"],
               **info}
    return rows, summary

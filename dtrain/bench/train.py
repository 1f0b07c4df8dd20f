"""`dtrain bench train`: training throughput of dtrain against plain PyTorch on the same work.

Four runs of the same model, per-worker batch, objective, optimizer and data:
- plain: one process, one thread, no framework (the per-worker limit);
- torch DDP: 2 processes (gloo, one thread each);
- dtrain with 1 and with 2 Ray Train workers (`dtrain.train.driver.fit`).

Fairness: every run reads the same digits shards through `dtrain.data.shards.train_batches`
(PNG decode in the training process, as dtrain does with loader_workers=0), seeds each step the
same way, updates the same EMA and clips gradients. In bf16 the baselines do DeepSpeed's arithmetic by
hand: bf16 module weights and gradients, an fp32 master copy that AdamW steps, copied back to bf16.
Throughput is steady state: the first `warmup` steps are not timed, and neither is dtrain's
final checkpoint (it comes after the last log window).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.config import Config, from_yaml, load_config, to_yaml
from dtrain.data.digits import write_digits
from dtrain.data.shards import train_batches
from dtrain.diffusion import build_objective
from dtrain.models import build_model, count_params
from dtrain.runtime import ensure_ray, free_port
from dtrain.precision import choose, in_precision
from dtrain.train.deepspeed_glue import lr_lambda
from dtrain.train.driver import fit, run_dir
from dtrain.train.ema import EMA
from dtrain.train.loop import step_seed

TARGET = 0.95  # the goal: dtrain per worker >= 0.95x the plain loop

# The quickstart model (configs/quickstart.yaml) on 16x16 digits.
DEFAULTS = ["model.arch=dit", "model.size=mini", "model.hidden_size=128", "model.depth=4", "model.image_size=16",
            "model.in_channels=1", "model.patch_size=2", "data.batch_size=64", "train.zero_stage=2",
            "train.precision=auto", "tracking.wandb=false"]


def torch_worker(rank: int, world: int, cfg_yaml: str, warmup: int, port: int, queue) -> None:
    """The plain loop (world 1) or one DDP rank: loop.py's work without Ray or DeepSpeed."""
    torch.set_num_threads(1)
    cfg = from_yaml(cfg_yaml)
    t, bs = cfg.train, cfg.data.batch_size
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(t.seed)
    dtype = choose(t.precision).dtype  # `auto` -> what this CPU runs fast
    net = build_model(cfg.model).to(dtype)
    net.grad_checkpointing = t.activation_checkpointing
    params = list(net.parameters())
    master = [p.detach().float().requires_grad_() for p in params] if dtype != torch.float32 else params
    opt = torch.optim.AdamW(master, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    ema = EMA(net, t.ema_decay)
    loss_fn = build_objective(cfg.objective)
    batches = train_batches(cfg.data.train_shards, rank, world, t.seed, bs, cfg.data.shuffle_buffer,
                            cfg.data.loader_workers)

    model_fn = in_precision(model, dtype)

    window_loss = torch.zeros(())
    for step in range(t.steps):
        if step == warmup:
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
        torch.manual_seed(step_seed(t.seed, rank, step))
        x, y = next(batches)
        loss = loss_fn(model_fn, {"x": x, "cond": y}).mean()
        loss.backward()
        if master is not params:
            for m, p in zip(master, params):
                m.grad = p.grad.float()
                p.grad = None
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(master, t.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if master is not params:
            with torch.no_grad():
                torch._foreach_copy_(params, master)
        ema.update(step)
        window_loss += loss.detach()
        if (step + 1) % t.log_every == 0:  # dtrain's per-window loss reduction, a sync point
            if world > 1:
                dist.all_reduce(window_loss)
            window_loss.item()
            window_loss = torch.zeros(())
    elapsed = time.perf_counter() - start
    if rank == 0:
        queue.put((t.steps - warmup) * bs * world / elapsed)
    if world > 1:
        dist.destroy_process_group()


def torch_samples_per_s(cfg: Config, world: int, warmup: int) -> float:
    """Total samples/s of `world` fresh processes (fresh even at world 1: the caller's thread
    settings and any Ray state stay out of the measurement)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(torch_worker, args=(world, to_yaml(cfg), warmup, free_port(), queue), nprocs=world)
    return queue.get()


def steady_samples_per_s(metrics_jsonl: Path, warmup: int) -> float:
    """Samples over seconds of the log windows that end after `warmup` steps."""
    samples = seconds = 0.0
    prev = 0
    for line in metrics_jsonl.read_text().splitlines():
        row = json.loads(line)
        n, prev = row["step"] - prev, row["step"]
        if row["step"] > warmup:
            seconds += n * row["step_time_s"]
            samples += n * row["step_time_s"] * row["samples_per_s"]
    return samples / seconds


def dtrain_samples_per_s(cfg: Config, workers: int, warmup: int) -> float:
    cfg = replace(cfg, scaling=replace(cfg.scaling, num_workers=workers),
                  train=replace(cfg.train, run_name=f"bench-train-{workers}w"))
    fit(cfg)
    return steady_samples_per_s(run_dir(cfg) / "metrics.jsonl", warmup)


def run(steps: int = 100, warmup: int = 20, log_every: int = 10,
        overrides: tuple[str, ...] | list[str] = (), log_to_driver: bool = True) -> tuple[list[dict], dict]:
    """Rows: plain, torch DDP x2, dtrain x1, dtrain x2, with samples/s in total and per worker and
    the per-worker ratio to the plain loop. `overrides` are dtrain config `key=value`s on top of
    DEFAULTS (the quickstart model); the data are always the bundled digits, so in_channels is 1."""
    if warmup % log_every or steps <= warmup:
        raise ValueError(f"warmup ({warmup}) must be a multiple of log_every ({log_every}) and below steps ({steps})")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, DEFAULTS + [*overrides, f"train.steps={steps}", f"train.log_every={log_every}",
                                            f"train.ckpt_every={steps}", f"train.storage_path={tmp}/runs"])
        cfg = replace(cfg, train=replace(cfg.train, precision=choose(cfg.train.precision).precision))
        if cfg.train.precision == "fp16" or cfg.train.grad_accum_steps != 1:
            raise ValueError("the torch baselines do one micro-batch per step in bf16 or fp32 on CPU: "
                             "set train.grad_accum_steps=1 and train.precision=bf16|fp32")
        n_shards = 4
        write_digits(Path(tmp) / "digits", image_size=cfg.model.image_size, train_shards=n_shards)
        cfg = replace(cfg, data=replace(cfg.data, train_shards=f"{tmp}/digits/train-{{000000..{n_shards - 1:06d}}}.tar",
                                        val_shards=f"{tmp}/digits/val-000000.tar"))
        # The torch baselines first, before this process starts (or uses) Ray.
        runs = [("plain", 1, torch_samples_per_s(cfg, 1, warmup)),
                ("torch DDP", 2, torch_samples_per_s(cfg, 2, warmup))]
        name = f"dtrain ZeRO-{cfg.train.zero_stage}"
        ensure_ray(None, 2 * cfg.scaling.cpus_per_worker, log_to_driver=log_to_driver)
        runs += [(name, w, dtrain_samples_per_s(cfg, w, warmup)) for w in (1, 2)]
    plain = runs[0][2]
    rows = [{"run": run_name, "workers": w, "samples_per_s": round(sps, 1), "per_worker": round(sps / w, 1),
             "vs_plain": round(sps / w / plain, 3)} for run_name, w, sps in runs]
    m = cfg.model
    summary = {"target_vs_plain": TARGET,
               "meets_target": all(r["vs_plain"] >= TARGET for r in rows if r["run"] == name),
               "model": f"{m.arch}-{m.size} {m.image_size}x{m.image_size}x{m.in_channels}",
               "params": count_params(build_model(m)), "batch_per_worker": cfg.data.batch_size,
               "precision": cfg.train.precision, "steps": steps, "timed_steps": steps - warmup,
               "data": "digits shards via dtrain.data.shards.train_batches (all runs)",
               "threads_per_worker": 1}
    return rows, summary


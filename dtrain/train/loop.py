"""The per-worker training loop: one function, read top to bottom.

Ray Train runs `train_func(cfg_dict)` on every worker. Parallelism is applied in one named step
(wrap_deepspeed); the stage (dtrain.train.stages) brings the objective, the batches, the initial weights
and the lineage its checkpoints record; EMA, tracking and checkpoints sit around it.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import psutil
import ray.train
import torch
import torch.distributed as dist

from dtrain import checkpoint as ckpt_io
from dtrain.config import from_yaml, to_dict
from dtrain.data.captions import caption_encoder
from dtrain.data.shards import CorruptShards, DataError, load_images
from dtrain.generation import grid_from_weights
from dtrain.models import build_model, count_params
from dtrain.precision import Choice, choose, in_precision
from dtrain.runtime import pin_threads
from dtrain.secrets import unseal_into_environ
from dtrain.storage import is_uri
from dtrain.tracking import make_tracker
from dtrain.train.control import StepControl
from dtrain.train.deepspeed_glue import wrap_deepspeed
from dtrain.train.ema import EMA
from dtrain.train.stages import stage_kind
from dtrain.train.universal import convert, needs_universal


def step_seed(seed: int, rank: int, step: int) -> int:
    """Every step draws its randomness from (seed, rank, step): a resumed or restarted run draws
    exactly what an uninterrupted one would, with no RNG state to carry in the checkpoint."""
    return (seed * 1_000_003 + rank * 10_007 + step) % 2**63


def agreed_precision(requested: str, device: str, rank: int) -> Choice:
    """Rank 0 resolves `auto` (or checks an explicit choice) on its hardware; every rank uses its verdict,
    so a timing probe that happens to differ between ranks can never split the run."""
    box = [choose(requested, device) if rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(box, src=0)
    return box[0]


def train_func(cfg_dict: dict) -> None:
    unseal_into_environ()  # W&B key, storage credentials of a submitted job (dtrain.secrets)
    cfg = from_yaml(cfg_dict["yaml"])
    run_dir = Path(cfg_dict["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # DeepSpeed 0.19 calls a deprecated torch collective: one FutureWarning per worker per step, not ours to fix
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)
    threads = pin_threads(cfg.scaling.cpus_per_worker)
    precision = agreed_precision(cfg.train.precision, "cuda" if cfg.scaling.use_gpu else "cpu", rank)
    t = cfg.train  # checkpoints keep the config as asked (`auto` decides again on resume); meta records the choice
    stage = (cfg_dict.get("stage_kind") or stage_kind(cfg)).build(cfg)

    with ExitStack() as stack:  # the resume checkpoint stays open (downloaded, if remote) until loaded
        resume = ray.train.get_checkpoint()
        ckpt = Path(stack.enter_context(resume.as_directory())) if resume else None
        universal = ckpt is not None and needs_universal(ckpt, world)
        if universal:  # written at another worker count: re-partition its ZeRO shards once per node
            if ctx.get_local_rank() == 0:
                convert(ckpt)
            dist.barrier()

        torch.manual_seed(t.seed)  # identical initial weights on every rank
        net = build_model(cfg.model)
        if ckpt is None and stage.parent:
            stage.load_parent(net)  # a later stage starts from its parent's EMA weights
        n_params = count_params(net)  # before ZeRO-3 empties the partitioned tensors
        net.grad_checkpointing = t.activation_checkpointing
        resolved = replace(cfg, train=replace(t, precision=precision.precision))
        engine = wrap_deepspeed(net, resolved, world, load_universal=universal)
        if t.compile:
            engine.compile()  # DeepSpeed's own hook keeps parameter names (and so checkpoints) unchanged
        ema = EMA(engine.module, t.ema_decay, engine=engine)
        start, samples_seen = _restore(engine, ema, ckpt, universal) if ckpt else (0, 0)
        dtype = precision.dtype
        # frozen nets (a teacher, a target) beside the student; a resumed stage restores its own state
        stage.attach(engine, resolved, world, dtype, start, resume=ckpt)
    loss_fn = stage.objective
    accum, global_batch = t.grad_accum_steps, cfg.data.batch_size * t.grad_accum_steps * world

    model_fn = in_precision(engine, dtype)  # the objective sees fp32 in and out, whatever the precision

    if universal and rank == 0:
        print(f"[dtrain] resumed at step {start} on {world} workers from a universal checkpoint; "
              f"global batch now {global_batch}", flush=True)
    tracker = make_tracker(cfg, rank, run_dir, to_dict(cfg), resume_step=start)
    if rank == 0:
        print(f"[dtrain] {cfg.model.arch}/{cfg.model.size}: {n_params / 1e6:.2f}M params, {world} workers x "
              f"{threads} thread(s), ZeRO-{t.zero_stage}, {precision.precision}, stage {stage.name}, "
              f"steps {start}->{t.steps}", flush=True)
        print(f"[dtrain] precision {precision.precision}: {precision.reason}", flush=True)

    upload = ray.train.CheckpointUploadMode.ASYNC if is_uri(t.storage_path) else ray.train.CheckpointUploadMode.SYNC
    corrupt = CorruptShards(fail=cfg.data.on_corrupt == "fail")
    # skip as many samples as were consumed, counted in batches at this run's worker count
    batches = stage.batches(cfg, rank, world, samples_seen // (cfg.data.batch_size * world), corrupt)
    tokenizer = cfg_dict.get("tokenizer")  # a text model's (JSON, resolved by the driver): captions -> token ids
    m = cfg.model
    encoder = caption_encoder(m.text_encoder, m.max_tokens, tokenizer) if m.conditioning == "text" else None
    if encoder is not None:  # captions -> ids or embeddings (precomputed embeddings arrive as a tensor)
        batches = (b if isinstance(b["cond"], torch.Tensor) else {**b, "cond": encoder(b["cond"])} for b in batches)
    val = _val_split(cfg.data.val_shards, rank, world, encoder) if t.val_every else None
    progress = Progress(rank, start, t.steps)
    drill_step = t.fault_drill_step if rank == world - 1 else 0  # in a fault drill the last rank dies
    control = StepControl(run_dir, t.ckpt_every_minutes, rank, engine.device)
    engine.train()
    window_start, window_loss = time.perf_counter(), torch.zeros((), device=engine.device)
    for step in range(start, t.steps):
        if drill_step and step == drill_step and not t.fault_drill_in_save:
            _fault_drill(run_dir)
        for micro in range(accum):  # DeepSpeed steps the optimizer after the last micro-batch only
            torch.manual_seed(step_seed(t.seed, rank, step * accum + micro))
            batch = {k: v.to(engine.device) for k, v in next(batches).items()}
            loss = loss_fn(model_fn, batch).mean()
            engine.backward(loss)
            engine.step()
            window_loss += loss.detach() / accum
        ema.update(step)
        stage.after_step(step)
        done, samples_seen = step + 1, samples_seen + global_batch
        stop, clock_due = control.poll()  # Ctrl-C / SIGTERM in the driver, or train.ckpt_every_minutes

        val_loss = None
        if val is not None and (done % t.val_every == 0 or done == t.steps):
            began = time.perf_counter()
            val_loss = _val_loss(engine, model_fn, loss_fn, val, cfg.data.batch_size, t.seed)
            window_start += time.perf_counter() - began  # validation is not training throughput
        if done % t.log_every == 0 or done == t.steps:
            n = done - max(start, (done - 1) // t.log_every * t.log_every)  # steps in this window
            dist.all_reduce(window_loss)
            elapsed = time.perf_counter() - window_start
            metrics = {"loss": window_loss.item() / (n * world), "lr": engine.get_lr()[0],
                       "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                       "samples_per_s": n * cfg.data.batch_size * accum * world / elapsed, "step_time_s": elapsed / n,
                       "rss_mb": psutil.Process().memory_info().rss / 2**20, "corrupt_shards": corrupt.count}
            tracker.log(metrics if val_loss is None else {**metrics, "val_loss": val_loss}, done)
            progress.step(done, metrics["loss"], metrics["samples_per_s"])
            window_start, window_loss = time.perf_counter(), torch.zeros((), device=engine.device)
        else:
            if val_loss is not None:
                tracker.log({"val_loss": val_loss}, done)
            if done == start + 1:
                progress.step(done)  # a sign of life before the first metrics window

        if done % t.ckpt_every == 0 or done == t.steps or stop or clock_due:
            weights = ema.full_state_dict()  # a collective where the EMA is sharded (ZeRO-3; ZeRO-1/2 in bf16)
            stage_state = stage.state_dict()  # a collective too where the stage's nets are partitioned
            # Written locally, then Ray Train copies it to storage and deletes it; to an object store the
            # upload runs in the background while training goes on. Ray registers the checkpoint only
            # once every rank's upload finished: a partial one is never resumed from or loaded.
            tmp = tempfile.mkdtemp(prefix="dtrain-ckpt-")
            try:
                engine.save_checkpoint(str(Path(tmp) / ckpt_io.DEEPSPEED_DIR), tag=ckpt_io.DEEPSPEED_TAG,
                                      client_state={"step": done, "samples_seen": samples_seen})
                if drill_step and done == drill_step and t.fault_drill_in_save:
                    _fault_drill(run_dir)
                if rank == 0:
                    meta = {"step": done, **stage.meta(), "objective": cfg.objective.name,
                            "weights": "ema", "ema_decay": t.ema_decay, "world_size": world, "zero_stage": t.zero_stage,
                            "precision": precision.precision, "precision_reason": precision.reason,
                            "latents": cfg_dict.get("latents"), "interrupted": stop and done < t.steps}
                    ckpt_io.write_inference_files(tmp, weights, cfg, meta, tokenizer)
                    if stage_state:
                        ckpt_io.write_stage_state(tmp, stage_state)
                    images = cfg.model.image_size > 1  # vector data (a mixture) has no image to show
                    if images and (done == t.steps or (cfg.tracking.sample_every and done % cfg.tracking.sample_every == 0)):
                        on_cpu = "fp32" if precision.precision == "fp16" else precision.precision  # drawn on the CPU
                        tracker.log_image("samples", grid_from_weights(weights, cfg, meta, precision=on_cpu,
                                                                       prompts=cfg_dict.get("prompts"),
                                                                       tokenizer=tokenizer), done)
                ray.train.report({"step": done}, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=f"checkpoint_{done:08d}", checkpoint_upload_mode=upload,
                                 delete_local_checkpoint_after_upload=True)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            control.saved()
            window_start = time.perf_counter()  # checkpoint time is not training throughput
        if stop:
            if rank == 0:
                print(f"[dtrain] stop requested: saved step {done} of {t.steps}", flush=True)
            break
    tracker.finish()


def _val_split(urls: str, rank: int, world: int, encoder=None) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of the validation set; every rank gets as many samples (under ZeRO-3 each
    forward pass is a collective, so all ranks must make the same number). encoder: a text model's
    captions -> token ids (None: class labels)."""
    x, y = load_images(urls, captions=encoder is not None)
    y = encoder(y) if isinstance(y, list) else y
    n = len(x) // world * world
    if n == 0:
        raise DataError(f"{urls} holds {len(x)} validation samples, fewer than the {world} workers")
    return x[rank:n:world], y[rank:n:world]


@torch.no_grad()
def _val_loss(engine, model_fn, loss_fn, val: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int) -> float:
    """Mean objective over the validation set with the same noise and times every time it is measured
    (a generator seeded by `seed`), so values at different steps are comparable; averaged over ranks."""
    engine.eval()  # no label dropout
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    total = torch.zeros(2, dtype=torch.float64, device=engine.device)
    for i in range(0, len(val[0]), batch_size):
        x, y = val[0][i:i + batch_size].to(engine.device), val[1][i:i + batch_size].to(engine.device)
        total += torch.stack([loss_fn(model_fn, {"x": x, "cond": y}, generator=g).sum().double(),
                              torch.tensor(float(len(x)), dtype=torch.float64, device=engine.device)])
    engine.train()
    dist.all_reduce(total)
    return (total[0] / total[1]).item()


def _restore(engine, ema: EMA, d: Path, universal: bool) -> tuple[int, int]:
    """Load engine (weights, optimizer, scheduler) and EMA state from checkpoint `d`; returns
    (step, samples consumed so far)."""
    state_dir = d / (ckpt_io.UNIVERSAL_DIR if universal else ckpt_io.DEEPSPEED_DIR)
    _, client = engine.load_checkpoint(str(state_dir), tag=ckpt_io.DEEPSPEED_TAG)
    ema.load_full_state_dict(ckpt_io.read_weights(d))
    if "samples_seen" in client:
        return client["step"], client["samples_seen"]
    saved = ckpt_io.read_config(d)  # older checkpoints: count with the batch layout they were trained at
    per_step = saved.data.batch_size * saved.train.grad_accum_steps * ckpt_io.read_meta(d)["world_size"]
    return client["step"], client["step"] * per_step


def _fault_drill(run_dir: Path) -> None:
    """Die like a lost node: no exception, no cleanup. Once per run directory, so the restarted
    worker group gets past this step."""
    marker = run_dir / ".fault_drill_done"
    if not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        print("[dtrain] fault drill: this rank exits abruptly", flush=True)
        os._exit(1)


class Progress:
    """Rank 0's progress as log lines (a tqdm meter, printed, not redrawn): a bar redrawn in place
    interleaves with the workers' log lines under Ray, and sat at 0 until the first metrics window."""

    def __init__(self, rank: int, start: int, total: int):
        self.on, self.start, self.total, self.began = rank == 0, start, total, time.perf_counter()

    def step(self, done: int, loss: float | None = None, samples_per_s: float | None = None) -> None:
        if not self.on:
            return
        from tqdm import tqdm

        postfix = f"loss {loss:.4f}, {samples_per_s:.0f} samples/s" if loss is not None else "first step done"
        meter = tqdm.format_meter(done - self.start, self.total - self.start, time.perf_counter() - self.began,
                                  ncols=100, prefix=f"train step {done}/{self.total}", postfix=postfix)
        print(f"[dtrain] {meter}", flush=True)

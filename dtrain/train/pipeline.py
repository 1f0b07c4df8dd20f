"""`dtrain pipeline FILE`: stages in order on one Ray cluster, each a Ray Train run that starts from
the stage before it (reflow stages first have it write their pairs; distill stages have it as their
teacher), then every stage evaluated.

Runs are `<storage>/<pipeline>-<stage>`; the pipeline's state, `<storage>/<pipeline>.pipeline.json`,
records each finished stage's final checkpoint and is rewritten atomically after each one. Rerunning
the command skips finished stages and resumes the first unfinished one from its own last checkpoint
(its run name is the same); unfinished pair shards are the only ones made again. Every checkpoint
records its stage, parent and teacher; W&B puts the stages in one group named after the pipeline.
`<storage>` may be a URI (s3://...): runs, pairs and the state file then all live in the bucket.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from dtrain import checkpoint as ckpt_io
from dtrain import storage
from dtrain.config import PipelineConfig, stage_config
from dtrain.runtime import ensure_ray
from dtrain.train.pairs import generate_pairs, shard_urls


def storage_root(p: PipelineConfig) -> str:
    """Where the pipeline's runs live: an absolute directory or a URI."""
    return storage.absolute(stage_config(p, p.stages[0]).train.storage_path)


def state_path(p: PipelineConfig) -> str:
    return f"{storage_root(p)}/{p.name}.pipeline.json"


def read_state(p: PipelineConfig) -> dict:
    path = state_path(p)
    return json.loads(storage.read_text(path)) if storage.exists(path) else {"name": p.name, "stages": {}}


def _finished(ckpt: str) -> bool:
    """A stage's final checkpoint is still there whole (in a bucket: registered by Ray Train)."""
    if not storage.is_uri(ckpt):
        return ckpt_io.is_complete(Path(ckpt))
    try:
        return storage.checkpoint_uri(ckpt) == ckpt
    except ckpt_io.CheckpointError:
        return False


def run_pipeline(p: PipelineConfig) -> dict:
    """Train every unfinished stage in order; returns the state {name, stages: {stage: {kind, checkpoint,
    parent, ...}}}. Raises what a stage's training raises (dtrain.train.driver.Interrupted on Ctrl-C)."""
    from dtrain.train.driver import fit

    base = stage_config(p, p.stages[0])
    root, path = storage_root(p), state_path(p)
    if not storage.is_uri(root):
        Path(root).mkdir(parents=True, exist_ok=True)
    state = read_state(p)
    ensure_ray(base.scaling.address, base.scaling.num_workers * base.scaling.cpus_per_worker)
    previous = None
    for i, spec in enumerate(p.stages):
        parent = state["stages"][spec.parent]["checkpoint"] if spec.parent else previous
        done = state["stages"].get(spec.name)
        if done and _finished(done["checkpoint"]):
            print(f"[dtrain] pipeline {p.name}: stage {spec.name} done ({done['checkpoint']})", flush=True)
            previous = done["checkpoint"]
            continue
        print(f"[dtrain] pipeline {p.name}: stage {i + 1}/{len(p.stages)} {spec.name} ({spec.kind})"
              + (f" from {parent}" if parent else ""), flush=True)
        extra = [f"train.run_name={p.name}-{spec.name}", f"tracking.group={p.name}"]
        if parent:
            extra.append(f"stage.init_from={parent}")
        if spec.kind == "distill":
            extra.append(f"stage.teacher={parent}")
        pairs = None
        if spec.kind == "reflow":
            pairs = f"{root}/{p.name}-{spec.name}-pairs"
            generate_pairs(parent, pairs, **asdict(spec.pairs))
            extra.append(f"data.train_shards={shard_urls(pairs, spec.pairs.count, spec.pairs.per_shard)}")
        began = time.perf_counter()
        final = fit(stage_config(p, spec, extra))
        state["stages"][spec.name] = {"kind": spec.kind, "checkpoint": str(final), "parent": parent,
                                      "pairs": pairs,
                                      "seconds": round(time.perf_counter() - began, 1)}
        storage.write_bytes(path, json.dumps(state, indent=2).encode())
        previous = str(final)
    return state

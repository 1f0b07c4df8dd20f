"""`dtrain pipeline FILE`: stages in order on one Ray cluster, each a Ray Train run that starts from
the stage before it (reflow stages first have it write their pairs; distill stages have it as their
teacher), then every stage evaluated.

Runs are `<storage>/<pipeline>-<stage>`; the pipeline's state, `<storage>/<pipeline>.pipeline.json`,
records each finished stage's final checkpoint and is rewritten atomically after each one. Rerunning
the command skips finished stages and resumes the first unfinished one from its own last checkpoint
(its run name is the same); unfinished pair shards are the only ones made again. Every checkpoint
records its stage, parent and teacher; W&B puts the stages in one group named after the pipeline.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from dtrain import checkpoint as ckpt_io
from dtrain.config import ConfigError, PipelineConfig, stage_config
from dtrain.runtime import ensure_ray
from dtrain.storage import is_uri
from dtrain.train.pairs import generate_pairs, shard_urls


def state_path(p: PipelineConfig) -> Path:
    return Path(stage_config(p, p.stages[0]).train.storage_path).resolve() / f"{p.name}.pipeline.json"


def read_state(p: PipelineConfig) -> dict:
    path = state_path(p)
    return json.loads(path.read_text()) if path.is_file() else {"name": p.name, "stages": {}}


def _write_state(path: Path, state: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, path)


def run_pipeline(p: PipelineConfig) -> dict:
    """Train every unfinished stage in order; returns the state {name, stages: {stage: {kind, checkpoint,
    parent, ...}}}. Raises what a stage's training raises (dtrain.train.driver.Interrupted on Ctrl-C)."""
    from dtrain.train.driver import fit

    base = stage_config(p, p.stages[0])
    if is_uri(base.train.storage_path):
        raise ConfigError(f"train.storage_path={base.train.storage_path}: a pipeline keeps its state and reflow "
                          "pairs on a filesystem path (local or shared); object-store URIs work for `dtrain train`")
    storage, path = Path(base.train.storage_path).resolve(), state_path(p)
    storage.mkdir(parents=True, exist_ok=True)
    state = read_state(p)
    ensure_ray(base.scaling.address, base.scaling.num_workers * base.scaling.cpus_per_worker)
    previous = None
    for i, spec in enumerate(p.stages):
        parent = state["stages"][spec.parent]["checkpoint"] if spec.parent else previous
        done = state["stages"].get(spec.name)
        if done and ckpt_io.is_complete(Path(done["checkpoint"])):
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
            pairs = storage / f"{p.name}-{spec.name}-pairs"
            generate_pairs(parent, pairs, **asdict(spec.pairs))
            extra.append(f"data.train_shards={shard_urls(pairs, spec.pairs.count, spec.pairs.per_shard)}")
        began = time.perf_counter()
        final = fit(stage_config(p, spec, extra))
        state["stages"][spec.name] = {"kind": spec.kind, "checkpoint": str(final), "parent": parent,
                                      "pairs": str(pairs) if pairs else None,
                                      "seconds": round(time.perf_counter() - began, 1)}
        _write_state(path, state)
        previous = str(final)
    return state

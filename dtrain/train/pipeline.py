"""`dtrain pipeline FILE`: stages in order on one Ray cluster, each a Ray Train run that starts from
its parent (the stage before, unless it names another), then every stage evaluated. Each stage's kind
(dtrain.train.stages) checks its config and, in its prelude, binds what it needs: a reflow stage has its
parent write its pairs, a distillation has its parent as its teacher. A stage is conditioned as its
parent is (checked up front): a text stage (model.conditioning=text) takes its parent's tokenizer, and a
text teacher's pairs carry the captions it was asked for (dtrain.train.pairs).

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
from pathlib import Path

from dtrain import checkpoint as ckpt_io
from dtrain import storage
from dtrain.config import (Config, ConfigError, ModelConfig, PipelineConfig, StageSpec, current_stage_kind, load_config,
                           read_pipeline)
from dtrain.runtime import ensure_ray
from dtrain.train.stages import STAGES, PipelineStep, check_stage


def load_pipeline(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """A pipeline file and `key=value` overrides (onto the experiment config of every stage) -> the
    pipeline, with its root resolved and every stage's config checked by its kind before the first trains."""
    p = read_pipeline(path)
    p.overrides = [*p.overrides, *overrides]
    p.root = storage.absolute(stage_config(p, p.stages[0]).train.storage_path)
    models: dict[str, ModelConfig] = {}  # stage name -> its model config
    for i, spec in enumerate(p.stages):
        try:
            if spec.kind == "distill":  # a pipeline file from before the kinds were split
                spec.kind = current_stage_kind(spec.kind, stage_config(p, spec).objective.name)
            if spec.kind not in STAGES:
                raise ConfigError(f"stages[{i}].kind: '{spec.kind}' is not one of {sorted(STAGES)}")
            if i == 0 and STAGES[spec.kind].needs_teacher:
                raise ConfigError(f"stages[0].kind: {spec.kind} is taught by an earlier stage: it cannot come first")
            dry = PipelineStep(spec, parent="previous-stage" if i else None, root=p.root, pipeline=p.name, dry=True)
            cfg = stage_config(p, spec, STAGES[spec.kind].prelude(dry))
            check_stage(cfg)
            if i:
                parent = spec.parent or p.stages[i - 1].name
                _check_condition(cfg.model, models[parent], parent)
            models[spec.name] = cfg.model
        except ConfigError as e:
            raise ConfigError(f"{path}: stage '{spec.name}': {e}") from None
    return p


def _check_condition(model: ModelConfig, parent: ModelConfig, parent_name: str) -> None:
    """A stage is conditioned as its parent is: a text stage reads token ids with its parent's tokenizer
    (dtrain.train.driver.run_tokenizer), a class stage its parent's labels."""
    if model.conditioning != parent.conditioning:
        raise ConfigError(f"model.conditioning: {model.conditioning}, but its parent '{parent_name}' is conditioned "
                          f"on {parent.conditioning}: a stage learns from its parent, so both must be the same")
    if model.conditioning == "text" and model.tokenizer != parent.tokenizer:
        raise ConfigError(f"model.tokenizer: a text stage encodes prompts with its parent's tokenizer; "
                          f"'{model.tokenizer}' differs from parent '{parent_name}''s '{parent.tokenizer}'")


def stage_config(pipeline: PipelineConfig, spec: StageSpec, extra: list[str] | tuple[str, ...] = ()) -> Config:
    """The experiment Config of one pipeline stage: the pipeline's config and overrides, the stage's own,
    its kind, then `extra` (run name, parent, what its prelude decided at run time)."""
    return load_config(pipeline.config, [*pipeline.overrides, *spec.overrides, f"stage.name={spec.kind}", *extra])


def state_path(p: PipelineConfig) -> str:
    return f"{p.root}/{p.name}.pipeline.json"


def read_state(p: PipelineConfig) -> dict:
    path = state_path(p)
    return json.loads(storage.read_text(path)) if storage.exists(path) else {"name": p.name, "stages": {}}


def _finished(ckpt: str) -> bool:
    """A stage's final checkpoint is still there whole (in a bucket: registered by Ray Train)."""
    if not storage.is_uri(ckpt):
        return ckpt_io.is_complete(Path(ckpt))
    try:
        return ckpt_io.checkpoint_uri(ckpt) == ckpt
    except ckpt_io.CheckpointError:
        return False


def run_pipeline(p: PipelineConfig) -> dict:
    """Train every unfinished stage in order; returns the state {name, stages: {stage: {kind, checkpoint,
    parent, ...}}}. Raises what a stage's training raises (dtrain.train.driver.Interrupted on Ctrl-C)."""
    from dtrain.train.driver import fit

    base = stage_config(p, p.stages[0])
    root, path = p.root, state_path(p)
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
        extra += STAGES[spec.kind].prelude(PipelineStep(spec, parent=parent, root=root, pipeline=p.name))
        began = time.perf_counter()
        final = fit(stage_config(p, spec, extra))
        shards = [e.split("=", 1)[1] for e in extra if e.startswith("data.train_shards=")]
        state["stages"][spec.name] = {"kind": spec.kind, "checkpoint": str(final), "parent": parent,
                                      "pairs": storage.parent(shards[0]) if shards else None,
                                      "seconds": round(time.perf_counter() - began, 1)}
        storage.write_bytes(path, json.dumps(state, indent=2).encode())
        previous = str(final)
    return state

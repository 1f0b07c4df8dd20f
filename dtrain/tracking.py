"""Trackers: W&B on rank 0 (offline without an API key), a metrics.jsonl always, null elsewhere."""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Protocol

import numpy as np


class Tracker(Protocol):
    def log(self, metrics: dict, step: int) -> None: ...
    def log_image(self, key: str, image: np.ndarray, step: int) -> None: ...
    def finish(self) -> None: ...


class NullTracker:
    def log(self, metrics, step): pass
    def log_image(self, key, image, step): pass
    def finish(self): pass


class JsonlTracker(NullTracker):
    """One JSON object per log call, appended, so a resumed run continues the same file. Lines past
    the step a run resumes from (logged after its last checkpoint, then lost) are dropped first,
    so the logged steps stay contiguous."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))

    def log(self, metrics, step):
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")


STEP_KEY = "train_step"  # the x axis of every W&B chart


def stable_run_id(run_dir: Path) -> str:
    """The W&B run id of a run directory: made once and kept in it (`wandb_id`), so a restarted or
    resumed run keeps writing to the same W&B run even when the directory has moved."""
    path = run_dir / "wandb_id"
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".wandb_id.tmp")
        tmp.write_text(uuid.uuid4().hex[:16])
        os.replace(tmp, path)
    return path.read_text().strip()


class WandbTracker(NullTracker):
    def __init__(self, project: str, run_name: str, run_dir: Path, mode: str, config: dict, group: str | None = None):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_name, id=stable_run_id(run_dir), resume="allow",
                              dir=str(run_dir), group=group, mode=mode, config=config,
                              settings=wandb.Settings(silent=True))
        # Charts use our step as their x axis, not W&B's own step: a run restarted from an earlier
        # checkpoint logs steps W&B has seen again, and W&B drops anything logged at a step below its own.
        self.run.define_metric(STEP_KEY)
        self.run.define_metric("*", step_metric=STEP_KEY)

    def log(self, metrics, step):
        self.run.log({**metrics, STEP_KEY: step})

    def log_image(self, key, image, step):
        self.run.log({key: self.wandb.Image(image), STEP_KEY: step})

    def finish(self):
        self.run.finish()


class MultiTracker(NullTracker):
    def __init__(self, *trackers):
        self.trackers = trackers

    def log(self, metrics, step):
        for t in self.trackers:
            t.log(metrics, step)

    def log_image(self, key, image, step):
        for t in self.trackers:
            t.log_image(key, image, step)

    def finish(self):
        for t in self.trackers:
            t.finish()


def wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def make_tracker(cfg, rank: int, run_dir: Path, config_dict: dict, resume_step: int = 0) -> Tracker:
    """Rank 0 tracks; every other rank gets a null tracker (one W&B run per training run)."""
    if rank != 0:
        return NullTracker()
    trackers = [JsonlTracker(run_dir / "metrics.jsonl", resume_step)]
    mode = wandb_mode(cfg.tracking.mode)
    if cfg.tracking.wandb and mode != "disabled":
        trackers.append(WandbTracker(cfg.tracking.project, cfg.train.run_name, run_dir, mode, config_dict,
                                     cfg.tracking.group))
    return MultiTracker(*trackers)


def log_eval(ckpt: str | Path, cfg, result: dict, images: dict[str, Path] | None = None) -> bool:
    """Add an evaluation's rows (a W&B table and eval/<metric>@<sampler>-<steps> summaries) and
    `images` (name -> PNG) to the W&B run that trained checkpoint `ckpt`, at its step. Only where
    that run used W&B (its run directory keeps a `wandb_id`); returns whether it logged."""
    from dtrain.storage import is_uri, local_run_dir

    # a run in a bucket keeps its W&B files (and wandb_id) in the driver's local run directory
    run_dir = local_run_dir(cfg.train.storage_path, cfg.train.run_name) if is_uri(ckpt) else Path(ckpt).parent
    mode = wandb_mode(cfg.tracking.mode)
    if not (run_dir / "wandb_id").is_file() or not cfg.tracking.wandb or mode == "disabled":
        return False
    import wandb

    run = wandb.init(project=cfg.tracking.project, id=stable_run_id(run_dir), resume="allow", dir=str(run_dir),
                     mode=mode, group=cfg.tracking.group, settings=wandb.Settings(silent=True))
    rows = result["rows"]
    columns = sorted({k for r in rows for k in r if not isinstance(r[k], (dict, list))})
    logged = {"eval/table": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in rows]),
              STEP_KEY: result.get("step") or 0}
    for r in rows:
        for k in ("fd", "class_acc", "straightness", "tv", "log_lik_gap"):
            if r.get(k) is not None:
                logged[f"eval/{k}@{r['sampler']}-{r['steps']}"] = r[k]
    logged.update({f"eval/{name}": wandb.Image(str(p)) for name, p in (images or {}).items()})
    run.log(logged)
    run.finish()
    return True

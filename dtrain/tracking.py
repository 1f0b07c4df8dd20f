"""Trackers: W&B on rank 0 (offline without an API key), a metrics.jsonl always, null elsewhere."""
from __future__ import annotations

import hashlib
import json
import os
import time
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


class WandbTracker(NullTracker):
    def __init__(self, project: str, run_name: str, run_dir: Path, mode: str, config: dict):
        import wandb

        self.wandb = wandb
        # One id per run directory: a restarted or resumed run keeps writing to the same W&B run.
        run_id = f"{run_name}-{hashlib.sha1(str(run_dir).encode()).hexdigest()[:8]}"
        self.run = wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(run_dir),
                              mode=mode, config=config, settings=wandb.Settings(silent=True))

    def log(self, metrics, step):
        self.run.log(metrics, step=step)

    def log_image(self, key, image, step):
        self.run.log({key: self.wandb.Image(image)}, step=step)

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
        trackers.append(WandbTracker(cfg.tracking.project, cfg.train.run_name, run_dir, mode, config_dict))
    return MultiTracker(*trackers)

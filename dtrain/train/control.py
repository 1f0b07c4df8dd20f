"""When to stop early and when to checkpoint by the clock: decided on rank 0, agreed by all ranks.

The driver turns Ctrl-C or SIGTERM into a file in the run directory (`request_stop`); the workers
cannot see the driver's signals, but they share the run directory with it (checkpoints live there).
Rank 0 looks for that file and at the time since the last checkpoint, and one tiny broadcast per step
makes every rank take the same decision at the same step (a checkpoint is a collective).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

STOP_FILE = ".stop_requested"


def request_stop(run_dir: Path, signal_name: str) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / STOP_FILE).write_text(signal_name)


def clear_stop(run_dir: Path) -> None:
    (run_dir / STOP_FILE).unlink(missing_ok=True)


def stop_requested(run_dir: Path) -> str | None:
    """The name of the signal that asked this run to stop, or None."""
    try:
        return (run_dir / STOP_FILE).read_text() or "stop"
    except FileNotFoundError:
        return None


def clock_due(now: float, last_save: float, every_minutes: float) -> bool:
    """A time-based checkpoint is due (every_minutes = 0 turns it off)."""
    return every_minutes > 0 and now - last_save >= every_minutes * 60


class StepControl:
    """`poll()` after every optimizer step -> (stop, checkpoint_due), identical on every rank."""

    def __init__(self, run_dir: Path, every_minutes: float, rank: int, device: torch.device | str = "cpu",
                 clock=time.monotonic):
        self.run_dir, self.every_minutes, self.rank, self.clock = run_dir, every_minutes, rank, clock
        self.flags = torch.zeros(2, dtype=torch.int32, device=device)
        self.last_save = clock()

    def poll(self) -> tuple[bool, bool]:
        if self.rank == 0:
            self.flags[0] = int(stop_requested(self.run_dir) is not None)
            self.flags[1] = int(clock_due(self.clock(), self.last_save, self.every_minutes))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(self.flags, src=0)
        stop, due = self.flags.tolist()
        return bool(stop), bool(due)

    def saved(self) -> None:
        self.last_save = self.clock()

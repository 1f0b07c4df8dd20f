"""Resuming at another worker count, through DeepSpeed's universal checkpoint.

ZeRO 1-3 split the optimizer state (and at stage 3 the weights) by data-parallel rank, so shards
written by N workers cannot be loaded by M. DeepSpeed's `ds_to_universal` rewrites them as one file
per parameter (fp32 weights, Adam moments), which any worker count loads with
`checkpoint.load_universal`. ZeRO-0 keeps the whole state in one rank-independent file and needs no
conversion. The driver converts once per checkpoint, before the workers start, into a temporary
directory renamed into place, so an interrupted conversion is redone rather than half-used.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from dtrain.checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG, UNIVERSAL_DIR, CheckpointError, read_meta


def needs_universal(ckpt: Path, world_size: int) -> bool:
    """True when `ckpt` holds ZeRO-partitioned state written by a different number of workers."""
    sharded = any((ckpt / DEEPSPEED_DIR / DEEPSPEED_TAG).glob("*_optim_states.pt"))
    return sharded and read_meta(ckpt)["world_size"] != world_size


def universal_dir(ckpt: Path) -> Path:
    """Where load_checkpoint(..., tag=DEEPSPEED_TAG) finds the universal form of `ckpt`."""
    u = ckpt / UNIVERSAL_DIR
    if not (u / DEEPSPEED_TAG).is_dir():
        raise CheckpointError(f"{ckpt} was written by {read_meta(ckpt)['world_size']} workers and has no "
                              f"{UNIVERSAL_DIR}/ to resume at another count; `dtrain train` makes it before starting workers")
    return u


def convert(ckpt: Path) -> Path:
    """Write the universal form of `ckpt` next to its shards (once; later calls reuse it)."""
    target = ckpt / UNIVERSAL_DIR
    if (target / DEEPSPEED_TAG).is_dir():
        return target
    tmp = ckpt / f".{UNIVERSAL_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted conversion
    workers = str(min(4, os.cpu_count() or 1))
    # DeepSpeed's own converter, in a fresh process: its worker pool must not fork this one, whose
    # Ray threads would deadlock the children. The driver may have no GPU; conversion is file work.
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
           "--input_folder", str(ckpt / DEEPSPEED_DIR / DEEPSPEED_TAG), "--output_folder", str(tmp / DEEPSPEED_TAG),
           "--num_extract_workers", workers, "--num_merge_workers", workers,
           "--inject_missing_state"]  # our saves carry no Megatron-style universal_checkpoint_info
    done = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"},
                          capture_output=True, text=True)
    if done.returncode:
        raise CheckpointError(f"converting {ckpt} to a universal checkpoint failed:\n{done.stderr[-3000:]}")
    os.replace(tmp, target)
    return target

"""Resuming at another worker count, through DeepSpeed's universal checkpoint.

ZeRO 1-3 split the optimizer state (and at stage 3 the weights) by data-parallel rank, so shards
written by N workers cannot be loaded by M. DeepSpeed's `ds_to_universal` rewrites them as one file
per parameter (fp32 weights, Adam moments), which any worker count loads with
`checkpoint.load_universal`. ZeRO-0 keeps the whole state in one rank-independent file and needs no
conversion. The first worker on each node converts the checkpoint Ray Train resumes from, into a
temporary directory renamed into place, so an interrupted conversion is redone, never half-used.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from dtrain.checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG, UNIVERSAL_DIR, CheckpointError, read_meta

SHARD_RANK = re.compile(r"zero_pp_rank_(\d+)_")


def needs_universal(ckpt: Path, world_size: int) -> bool:
    """True when `ckpt` holds ZeRO-partitioned state written by a different number of workers."""
    sharded = any((ckpt / DEEPSPEED_DIR / DEEPSPEED_TAG).glob("*_optim_states.pt"))
    return sharded and read_meta(ckpt)["world_size"] != world_size


def convert(ckpt: Path) -> Path:
    """Write the universal form of `ckpt` into `ckpt/UNIVERSAL_DIR` (once; later calls reuse it)."""
    target = ckpt / UNIVERSAL_DIR
    if (target / DEEPSPEED_TAG).is_dir():
        return target
    world = read_meta(ckpt)["world_size"]
    tmp = ckpt / f".{UNIVERSAL_DIR}.{socket.gethostname()}.{os.getpid()}.tmp"  # nodes may share the directory
    with tempfile.TemporaryDirectory() as staging:
        # Only the shards of the ranks that wrote this save: a save retried at another worker count
        # in the same directory can leave more, and the converter counts ranks from the files.
        for f in (ckpt / DEEPSPEED_DIR / DEEPSPEED_TAG).iterdir():
            m = SHARD_RANK.search(f.name)
            if m is None or int(m.group(1)) < world:
                os.symlink(f.resolve(), Path(staging) / f.name)
        workers = str(min(4, os.cpu_count() or 1))
        # DeepSpeed's own converter, in a fresh process: its worker pool must not fork this one,
        # whose Ray threads would deadlock the children. Conversion is file work: no GPU needed.
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", staging,
               "--output_folder", str(tmp / DEEPSPEED_TAG), "--num_extract_workers", workers,
               "--num_merge_workers", workers,
               "--inject_missing_state"]  # our saves carry no Megatron-style universal_checkpoint_info
        done = subprocess.run(cmd, env={**os.environ, "DS_ACCELERATOR": "cpu"}, capture_output=True, text=True)
    if done.returncode:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"converting {ckpt} to a universal checkpoint failed:\n{done.stderr[-3000:]}")
    try:
        os.replace(tmp, target)
    except OSError:  # another node converted the same shared directory first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / DEEPSPEED_TAG).is_dir():
            raise
    return target

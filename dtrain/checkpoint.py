"""Self-describing checkpoints: the weights travel with the resolved config, so sampling, serving
and export rebuild the model from the checkpoint alone.

A checkpoint directory holds
    config.yaml         resolved Config as YAML (never a pickle)
    model.safetensors   EMA weights, consolidated (what sampling and serving load)
    meta.json           step, stage, parent checkpoint, what the weights are
    deepspeed/          each rank's ZeRO shard + optimizer and scheduler state (for resume only)
Inference files are written to temporary names and renamed, so a crash never leaves a half file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dtrain.config import Config, ConfigError, from_yaml, to_yaml

CONFIG_FILE, WEIGHTS_FILE, META_FILE, DEEPSPEED_DIR = "config.yaml", "model.safetensors", "meta.json", "deepspeed"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match its config."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_inference_files(directory: str | Path, weights: dict[str, torch.Tensor], cfg: Config, meta: dict) -> None:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    _atomic_write(d / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(d / CONFIG_FILE, lambda p: p.write_text(to_yaml(cfg)))
    _atomic_write(d / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))  # written last


def is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in (CONFIG_FILE, WEIGHTS_FILE, META_FILE))


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory -> its newest complete checkpoint."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {p}")
    if is_complete(p):
        return p
    found = sorted(c for c in p.glob("checkpoint_*") if is_complete(c))
    if not found:
        raise CheckpointError(f"{p} holds no complete checkpoint (needs {CONFIG_FILE}, {WEIGHTS_FILE}, {META_FILE})")
    return found[-1]


def read_config(ckpt: str | Path) -> Config:
    d = resolve(ckpt)
    try:
        return from_yaml((d / CONFIG_FILE).read_text())
    except ConfigError as e:
        raise CheckpointError(f"{d / CONFIG_FILE}: {e}") from None


def read_meta(ckpt: str | Path) -> dict:
    return json.loads((resolve(ckpt) / META_FILE).read_text())


def read_weights(d: str | Path) -> dict[str, torch.Tensor]:
    path = Path(d) / WEIGHTS_FILE
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def load_model(ckpt: str | Path) -> tuple[torch.nn.Module, Config]:
    """Rebuild the network from the checkpoint alone: fp32, eval mode, on CPU. Never unpickles."""
    from dtrain.models import build_model

    d = resolve(ckpt)
    cfg = read_config(d)
    net = build_model(cfg.model)
    state = read_weights(d)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    got = {k: v.shape for k, v in state.items()}
    if expected != got:
        wrong = [k for k in expected.keys() & got.keys() if expected[k] != got[k]]
        raise CheckpointError(f"{d / WEIGHTS_FILE} does not match {cfg.model.arch}/{cfg.model.size} in {d / CONFIG_FILE}: "
                              f"missing {sorted(expected.keys() - got.keys())[:3]}, unexpected "
                              f"{sorted(got.keys() - expected.keys())[:3]}, wrong shape {sorted(wrong)[:3]}")
    net.load_state_dict(state)
    return net.eval(), cfg

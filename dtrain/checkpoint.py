"""Self-describing checkpoints: the weights travel with the resolved config, so sampling, serving
and export rebuild the model from the checkpoint alone.

A checkpoint directory holds
    config.yaml         resolved Config as YAML (never a pickle)
    model.safetensors   EMA weights, consolidated (what sampling and serving load)
    meta.json           step, stage, parent checkpoint, what the weights are
    tokenizer.json      a text model's tokenizer (Hugging Face `tokenizers` JSON), how prompts become ids
    deepspeed/          each rank's ZeRO shard + optimizer and scheduler state (for resume only)
    stage.safetensors   a stage's own networks, where it has any (a consistency target; resume only)
    deepspeed_universal/  made only when the run resumes at another worker count: the same state
                        as one file per parameter (DeepSpeed's universal checkpoint)
`dtrain export` folds the first three into one .safetensors file (config and meta in its header),
which loads anywhere a checkpoint directory does.
Inference files are written to temporary names and renamed, so a crash never leaves a half file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dtrain.errors import DtrainError
from dtrain import storage
from dtrain.config import Config, ConfigError, from_yaml, to_yaml

CONFIG_FILE, WEIGHTS_FILE, META_FILE, DEEPSPEED_DIR = "config.yaml", "model.safetensors", "meta.json", "deepspeed"
INFERENCE_FILES = (CONFIG_FILE, WEIGHTS_FILE, META_FILE)  # what sampling and serving read (and fetch from a URI)
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's registered checkpoints
STAGE_STATE_FILE = "stage.safetensors"  # a stage's own networks (a consistency target), for exact resume
UNIVERSAL_DIR, DEEPSPEED_TAG = "deepspeed_universal", "state"  # DeepSpeed's per-save subdirectory name
EXPORT_CONFIG_KEY, EXPORT_META_KEY, EXPORT_TOKENIZER_KEY = "dtrain.config", "dtrain.meta", "dtrain.tokenizer"
TOKENIZER_FILE = "tokenizer.json"  # a text model's only: fetched and exported with the inference files


class CheckpointError(DtrainError, ValueError):
    """A checkpoint that is missing, incomplete or does not match its config."""


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_stage_state(directory: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    """A stage's own networks beside the weights (STAGE_STATE_FILE), read back on resume."""
    save_file(tensors, str(Path(directory) / STAGE_STATE_FILE))


def write_inference_files(directory: str | Path, weights: dict[str, torch.Tensor], cfg: Config, meta: dict,
                          tokenizer: str | None = None) -> None:
    """Weights, config, a text model's tokenizer (its JSON) and, last, the meta that completes them."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in weights.items()}
    _atomic_write(d / WEIGHTS_FILE, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(d / CONFIG_FILE, lambda p: p.write_text(to_yaml(cfg)))
    if tokenizer is not None:
        _atomic_write(d / TOKENIZER_FILE, lambda p: p.write_text(tokenizer))
    _atomic_write(d / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2)))  # written last


def is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in INFERENCE_FILES)


def locate(path: str | Path) -> str:
    """The checkpoint `path` names, as lineage records it and other machines find it: a URI's
    registered checkpoint (never the local cache it is fetched into), else resolve()'s absolute path."""
    return checkpoint_uri(str(path)) if storage.is_uri(path) else str(resolve(path).resolve())


def resolve(path: str | Path) -> Path:
    """An exported .safetensors file, a checkpoint directory, or a run directory -> its newest
    complete checkpoint; where Ray Train keeps a snapshot of the run's checkpoints, only a registered
    one (every rank's upload done). A URI (s3://...) is fetched into a local cache first."""
    if storage.is_uri(path):
        return fetch_checkpoint(str(path))
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {p}")
    if p.is_file() or is_complete(p):
        return p
    found = sorted(c for c in p.glob("checkpoint_*") if is_complete(c))
    snapshot = p / SNAPSHOT
    if snapshot.is_file():
        registered = set(registered_checkpoints(str(p.resolve())) or [])
        found = [c for c in found if c.name in registered]
    if not found:
        raise CheckpointError(f"{p} holds no complete checkpoint (needs {CONFIG_FILE}, {WEIGHTS_FILE}, {META_FILE})")
    return found[-1]


def _exported_metadata(path: Path) -> dict:
    """An exported file carries its config and meta in the safetensors header."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    if EXPORT_CONFIG_KEY not in meta:
        raise CheckpointError(f"{path} has no '{EXPORT_CONFIG_KEY}' metadata: not exported by `dtrain export`")
    return meta


def read_config(ckpt: str | Path) -> Config:
    p = resolve(ckpt)
    source = p if p.is_file() else p / CONFIG_FILE
    text = _exported_metadata(p)[EXPORT_CONFIG_KEY] if p.is_file() else source.read_text()
    try:
        return from_yaml(text)
    except ConfigError as e:
        raise CheckpointError(f"{source}: {e}") from None


def read_meta(ckpt: str | Path) -> dict:
    p = resolve(ckpt)
    return json.loads(_exported_metadata(p)[EXPORT_META_KEY] if p.is_file() else (p / META_FILE).read_text())


def read_tokenizer(ckpt: str | Path) -> str | None:
    """A text model's tokenizer JSON, or None for a checkpoint without one (a class model). A text model's
    checkpoint without it cannot encode prompts: CheckpointError."""
    p = resolve(ckpt)
    text = _exported_metadata(p).get(EXPORT_TOKENIZER_KEY) if p.is_file() else \
        ((p / TOKENIZER_FILE).read_text() if (p / TOKENIZER_FILE).is_file() else None)
    m = read_config(p).model
    if text is None and m.conditioning == "text" and not m.text_encoder:  # a frozen encoder has its own
        raise CheckpointError(f"{p} is a text model's checkpoint without its {TOKENIZER_FILE}: it cannot encode prompts")
    return text


def read_weights(ckpt: str | Path) -> dict[str, torch.Tensor]:
    p = Path(ckpt)
    path = p if p.is_file() else p / WEIGHTS_FILE
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own types for truncated or corrupt files
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def export(ckpt: str | Path, out: str | Path) -> Path:
    """One self-describing .safetensors file for inference: EMA weights + config + meta."""
    d = resolve(ckpt)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", EXPORT_CONFIG_KEY: to_yaml(read_config(d)),
                EXPORT_META_KEY: json.dumps({**read_meta(d), "exported_from": str(d)})}
    tokenizer = read_tokenizer(d)
    if tokenizer is not None:
        metadata[EXPORT_TOKENIZER_KEY] = tokenizer
    _atomic_write(out, lambda p: save_file(read_weights(d), str(p), metadata=metadata))
    return out


def load_model(ckpt: str | Path) -> tuple[torch.nn.Module, Config]:
    """Rebuild the network from the checkpoint alone: fp32, eval mode, on CPU. Never unpickles."""
    from dtrain.models import build_model

    p = resolve(ckpt)
    cfg = read_config(p)
    net = build_model(cfg.model)
    state = read_weights(p)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    got = {k: v.shape for k, v in state.items()}
    if expected != got:
        wrong = [k for k in expected.keys() & got.keys() if expected[k] != got[k]]
        raise CheckpointError(f"weights in {p} do not match {cfg.model.arch}/{cfg.model.size} of its config: "
                              f"missing {sorted(expected.keys() - got.keys())[:3]}, unexpected "
                              f"{sorted(got.keys() - expected.keys())[:3]}, wrong shape {sorted(wrong)[:3]}")
    net.load_state_dict(state)
    return net.eval(), cfg


# ---- checkpoints on object storage ----
# A checkpoint counts once Ray Train registered it in the run's `checkpoint_manager_snapshot.json`, which it
# writes only after every rank reported, so after every rank's upload: `resolve` never picks a checkpoint
# still being uploaded, or one whose upload died. Readers fetch a remote checkpoint's inference files
# (config, weights, meta) once into a local cache and load them from there.

def registered_checkpoints(run_uri: str) -> list[str] | None:
    """The checkpoint directory names Ray Train registered in a run (oldest first), or None where
    the run has no snapshot (written by hand, or by an older dtrain)."""
    fs, path = storage.filesystem(run_uri)
    try:
        with fs.open_input_stream(f"{path.rstrip('/')}/{SNAPSHOT}") as f:
            snapshot = json.loads(f.read())
    except FileNotFoundError:
        return None
    return [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]


def checkpoint_uri(uri: str) -> str:
    """A remote run (-> its newest registered checkpoint), checkpoint (only a registered one) or exported
    .safetensors file -> the URI of what to load. This is what a serving registry pins a version to."""
    uri = uri.rstrip("/")
    if uri.endswith(".safetensors"):
        return uri
    run, name = uri.rsplit("/", 1)
    if name.startswith("checkpoint_"):
        registered = registered_checkpoints(run)
        if registered is not None and name not in registered:
            raise CheckpointError(f"{uri} is not a registered checkpoint of its run (an upload that did not "
                                  f"finish?); registered: {registered[-3:]}")
        return uri
    registered = registered_checkpoints(uri)
    if not registered:
        raise CheckpointError(f"{uri} holds no registered checkpoint ({SNAPSHOT} missing or empty)")
    return f"{uri}/{registered[-1]}"


def fetch_checkpoint(uri: str) -> Path:
    """checkpoint_uri(uri), fetched once into the local cache (keyed by that URI): a local exported file
    or checkpoint directory of its inference files."""
    uri = checkpoint_uri(uri)
    fs, path = storage.filesystem(uri)
    if path.endswith(".safetensors"):
        return storage.download_once(fs, {path: Path(path).name}, uri) / Path(path).name
    files = {f"{path}/{f}": f for f in INFERENCE_FILES}
    missing = [name for f, name in files.items() if fs.get_file_info(f).type.name == "NotFound"]
    if missing:
        raise CheckpointError(f"{uri} lacks {missing}: not a dtrain checkpoint")
    if fs.get_file_info(f"{path}/{TOKENIZER_FILE}").type.name != "NotFound":
        files[f"{path}/{TOKENIZER_FILE}"] = TOKENIZER_FILE
    return storage.download_once(fs, files, uri)

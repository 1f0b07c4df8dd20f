"""The driver: a Ray Train TorchTrainer that runs train_func on N workers (gloo on CPU).

Ctrl-C or SIGTERM asks the workers to checkpoint at the next step and stop (dtrain.train.control);
a second Ctrl-C aborts without saving.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dtrain.checkpoint import CheckpointError, read_config, read_meta, read_tokenizer, resolve
from dtrain.config import Config, ConfigError, to_dict, to_yaml
from dtrain.data.captions import TOKENIZER_FILE, distinct_captions, from_json, read_tokenizer_file, tokenizer_for
from dtrain.data.latents import latents_meta
from dtrain.data.shards import absolute_urls, expand_urls
from dtrain.runtime import ensure_ray
from dtrain.storage import is_uri, local_run_dir
from dtrain.train.control import clear_stop, request_stop, stop_requested
from dtrain.train.deepspeed_glue import deepspeed_config, prebuild_cpu_ops
from dtrain.train.loop import train_func
from dtrain.train.stages import parent_of, stage_kind


class Interrupted(Exception):
    """The run stopped early on a signal, after saving `checkpoint` (rerun the command to resume)."""

    def __init__(self, checkpoint: Path, step: int, signal_name: str):
        super().__init__(f"{signal_name}: saved step {step} to {checkpoint}")
        self.checkpoint, self.step, self.signal_name = checkpoint, step, signal_name


def run_dir(cfg: Config) -> Path:
    """The run's local directory: metrics.jsonl, W&B files, the stop request, and its checkpoints
    unless train.storage_path is a URI (then they go to the object store)."""
    return local_run_dir(cfg.train.storage_path, cfg.train.run_name)


def storage_root(cfg: Config) -> str:
    """Where Ray Train writes the run's checkpoints: the URI, or the absolute storage directory."""
    s = cfg.train.storage_path
    return s.rstrip("/") if is_uri(s) else str(Path(s).resolve())


@contextmanager
def _stop_on_signals(out: Path):
    """While training, SIGINT/SIGTERM become a stop request the workers act on; a second one aborts."""
    def handler(signum, frame):
        name = signal.Signals(signum).name
        if stop_requested(out):
            raise KeyboardInterrupt
        request_stop(out, name)
        print(f"\n[dtrain] {name}: saving a checkpoint at the end of this step, then stopping "
              "(press Ctrl-C again to abort without saving)", flush=True)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _fit_off_main_thread(trainer: TorchTrainer):
    """trainer.fit() in a daemon thread: on the main thread Ray Train replaces our SIGINT handler with
    one that aborts the run without a checkpoint. The main thread waits and keeps handling signals."""
    box: dict = {}

    def target():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the main thread
            box["error"] = e

    thread = threading.Thread(target=target, name="dtrain-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(timeout=0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


class LocalTorchTrainer(TorchTrainer):
    """TorchTrainer without Ray 2.60's placement-group cleaner, for a cluster this process started and
    owns (its placement groups go when the driver's Ray shuts down). The cleaner is a detached actor
    that polls the dashboard's state API; on a busy 2-core machine its GCS client timed out at every
    start (a traceback) and stopping it waited out a 12 s timeout at every run's end (another one)."""

    def _create_default_callbacks(self):
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

        return [c for c in super()._create_default_callbacks() if not isinstance(c, PlacementGroupCleanerCallback)]


def check_resumable(cfg: Config) -> None:
    """A rerun of a run_name resumes its newest checkpoint, which needs the same model: a changed model
    section is refused here, naming what changed, instead of failing to load in every worker."""
    out = run_dir(cfg)
    if is_uri(cfg.train.storage_path) or not out.is_dir():
        return
    try:
        saved = to_dict(read_config(resolve(out)).model)
    except CheckpointError:
        return  # nothing complete to resume: the run starts afresh
    asked = to_dict(cfg.model)
    changed = [f"model.{k} {saved.get(k)!r} -> {asked.get(k)!r}" for k in sorted(set(saved) | set(asked))
               if saved.get(k) != asked.get(k)]
    if changed:
        raise ConfigError(f"run {cfg.train.run_name!r} in {out} resumes from a checkpoint of another model "
                          f"({'; '.join(changed)}): give this model a new train.run_name, or remove {out}")


def run_tokenizer(cfg: Config, out: Path) -> str | None:
    """A text model's tokenizer (JSON) for this run, kept in the run directory: model.tokenizer's file if
    given; else the one the run already has (a resumed run encodes as it began); else its parent's (a later
    stage must read token ids as its parent did); else one trained on the training shards' captions."""
    m = cfg.model
    if m.conditioning != "text" or m.text_encoder:  # a frozen encoder brings its own tokenizer
        return None
    kept = out / TOKENIZER_FILE
    parent = parent_of(cfg)
    if m.tokenizer:
        text = read_tokenizer_file(m.tokenizer)
    elif kept.is_file():
        text = kept.read_text()
    elif parent:
        text = read_tokenizer(resolve(parent))
        if text is None:
            raise ConfigError(f"stage parent {parent} is a class model: a text stage needs a text parent")
    else:
        text = tokenizer_for(cfg.data.train_shards, m.vocab_size).to_str()
    size = from_json(text).get_vocab_size()
    if size > m.vocab_size:
        raise ConfigError(f"model.vocab_size: {m.vocab_size} is less than the tokenizer's {size} tokens")
    out.mkdir(parents=True, exist_ok=True)
    kept.write_text(text)
    return text


def with_text_encoder(cfg: Config) -> Config:
    """cfg with model.text_embed_dim read from its frozen text encoder's config, where it has one unset."""
    m = cfg.model
    if m.conditioning != "text" or not m.text_encoder or m.text_embed_dim:
        return cfg
    from dtrain.data.text_encoders import embed_dim

    return replace(cfg, model=replace(m, text_embed_dim=embed_dim(m.text_encoder)))


def grid_prompts(cfg: Config, n: int = 6) -> list[str] | None:
    """The first `n` distinct captions of the validation shards (else the training shards): the prompts
    of a text model's sample grids."""
    if cfg.model.conditioning != "text":
        return None
    for urls in (cfg.data.val_shards, cfg.data.train_shards):
        try:
            prompts = distinct_captions(urls, n)
        except (OSError, ValueError):
            continue
        if prompts:
            return prompts
    return None


def check_devices(cfg: Config) -> None:
    """A local run with scaling.use_gpu=true needs a CUDA device here; without one Ray would wait for
    GPUs that never come. On a cluster (scaling.address) the workers' nodes have them, not the driver."""
    import torch

    if cfg.scaling.use_gpu and not cfg.scaling.address and not torch.cuda.is_available():
        raise ConfigError(f"scaling.use_gpu=true, but this machine has no CUDA device (torch {torch.__version__}): "
                          "train here with scaling.use_gpu=false, or join a GPU cluster with scaling.address")


def fit(cfg: Config) -> Path | str:
    """Train (or resume: the same run_name continues from its latest checkpoint); returns the final
    checkpoint directory (its URI where train.storage_path is one). Raises Interrupted when a signal
    stopped the run after a checkpoint."""
    s = cfg.scaling
    cfg = with_text_encoder(cfg)
    kind = stage_kind(cfg)
    kind.check(cfg)  # config errors here, not in a worker
    check_devices(cfg)
    deepspeed_config(cfg, s.num_workers)
    cfg = replace(cfg, data=replace(cfg.data, train_shards=absolute_urls(cfg.data.train_shards),
                                    val_shards=absolute_urls(cfg.data.val_shards)))
    latents = None
    if not s.address:
        expand_urls(cfg.data.train_shards)  # missing local shards fail here too
        if cfg.train.val_every:
            expand_urls(cfg.data.val_shards)
        latents = latents_meta(cfg.data.train_shards)
    if not s.address and not s.use_gpu:
        prebuild_cpu_ops()  # the workers of this machine then load it instead of compiling it at once
    check_resumable(cfg)
    out = run_dir(cfg)
    clear_stop(out)  # a request left by an earlier run is not this run's
    tokenizer = run_tokenizer(cfg, out)
    ensure_ray(s.address, s.num_workers * s.cpus_per_worker)
    trainer = (TorchTrainer if s.address else LocalTorchTrainer)(
        train_func,
        # the stage's class travels with the config: a kind registered outside dtrain needs no import there
        train_loop_config={"yaml": to_yaml(cfg), "run_dir": str(out), "latents": latents, "stage_kind": kind,
                           "tokenizer": tokenizer, "prompts": grid_prompts(cfg)},
        torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(name=cfg.train.run_name, storage_path=storage_root(cfg),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)),
    )
    with _stop_on_signals(out):
        result = _fit_off_main_thread(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"run {cfg.train.run_name} finished without a checkpoint")
    final = f"{storage_root(cfg)}/{cfg.train.run_name}/{Path(result.checkpoint.path).name}" \
        if is_uri(cfg.train.storage_path) else Path(result.checkpoint.path)
    name = stop_requested(out)
    if name:
        clear_stop(out)
        meta = read_meta(final)
        if meta.get("interrupted"):
            raise Interrupted(final, meta["step"], name)
    return final

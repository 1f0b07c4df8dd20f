"""Typed experiment config: the only reader of YAML files and `key=value` overrides.

A config is a tree of dataclasses. YAML files and CLI overrides merge onto the defaults in struct
mode, so an unknown or mistyped key fails with an error that names it, before any worker starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dtrain.diffusion import OBJECTIVES
from dtrain.diffusion.samplers import SAMPLERS, misfit
from dtrain.errors import DtrainError
from dtrain.models import BACKBONES
from dtrain.precision import PRECISIONS


def _choices(name: str, values) -> type[Enum]:
    """A field with a fixed set of values: OmegaConf refuses any other, naming the key and the choices.
    Loaded configs hold the plain string (see _plain), so the rest of dtrain compares strings."""
    return Enum(name, {v: v for v in values}, type=str, module=__name__)


Arch = _choices("Arch", BACKBONES)
Conditioning = _choices("Conditioning", ("class", "text"))
Objective = _choices("Objective", OBJECTIVES)
TimeSampling = _choices("TimeSampling", ("uniform", "logit_normal"))
Target = _choices("Target", ("sample", "stable"))
Prediction = _choices("Prediction", ("eps", "v", "x0"))
Schedule = _choices("Schedule", ("cosine", "vp_linear"))
Jvp = _choices("Jvp", ("auto", "forward", "double_backward", "finite_difference"))
Solver = _choices("Solver", ("euler", "heun"))
Sampler = _choices("Sampler", SAMPLERS)
Precision = _choices("Precision", PRECISIONS)
OnCorrupt = _choices("OnCorrupt", ("skip", "fail"))
TrackingMode = _choices("TrackingMode", ("auto", "online", "offline", "disabled"))


class ConfigError(DtrainError, ValueError):
    """A config that cannot run; the message names the offending key."""


@dataclass
class ModelConfig:
    arch: Arch = "dit"  # backbone family, a key of dtrain.models.BACKBONES: dit | ssm (SSM-hybrid) | mlp (vectors)
    size: str = "tiny"  # named size in that family's registry (tiny, S, B, L, XL, ...)
    image_size: int = 16  # side of the (square) input in pixels or latent cells
    in_channels: int = 1  # 1 for grayscale digits, 4 for SD-VAE latents
    patch_size: int = 2  # side of a patch token
    # class: labels 0..num_classes-1 | text: captions (the shards' txt) as token ids through a text encoder that the
    # blocks cross-attend to, its pooled vector in adaLN (dit, ssm); the empty caption is the null condition
    conditioning: Conditioning = "class"
    num_classes: int = 10  # class labels; index num_classes is the "null" label for CFG
    class_dropout: float = 0.1  # probability of dropping the label (or caption) in training (enables CFG)
    # text only: the tokenizer.json captions are encoded with; "" = train one on data.train_shards' captions (the
    # driver does, keeps it in the run directory and every checkpoint; a stage with a parent takes its parent's)
    tokenizer: str = ""
    vocab_size: int = 512  # text only: token table of the encoder; the tokenizer trained here has at most this many
    max_tokens: int = 24  # text only: caption length in tokens (longer ones are cut, shorter ones padded)
    text_depth: int = 2  # text only: transformer blocks of the caption encoder, trained from scratch with the model
    # text only: "" = token ids through an encoder trained from scratch; else a frozen transformers text encoder (CLIP or
    # T5 text tower) by local directory or hub id, with its own tokenizer; its embeddings may be precomputed into the
    # shards (`dtrain data embed`). text_depth blocks of ours still adapt them.
    text_encoder: str = ""
    text_embed_dim: int = 0  # text_encoder's width; 0 = read from its config (the driver does)
    hidden_size: int = 0  # 0 = take from the named size
    depth: int = 0  # 0 = take from the named size
    num_heads: int = 0  # 0 = take from the named size
    mlp_ratio: float = 4.0  # MLP width / hidden size
    qk_norm: bool = False  # RMS-normalise queries and keys (stabilises large models in bf16)
    attn_every: int = -1  # ssm only: every k-th block is attention, 0 = pure SSM, -1 = the size's own
    flow_map: bool = False  # a second time input s: the net is a flow map u(x, t, s) (objective mean_flow)
    # mlp only: sin/cos of each coordinate at this many octaves (frequencies 2^k, k = 0..n-1) beside x itself,
    # so a low-dimensional field with sharp structure (a mixture's modes) is in reach; 0 = x alone
    fourier_octaves: int = 0


@dataclass
class DataConfig:
    train_shards: str = "data/digits/train-{000000..000003}.tar"  # WebDataset URL(s), brace syntax
    val_shards: str = "data/digits/val-000000.tar"  # validation shards (class-balanced)
    batch_size: int = 64  # per worker
    shuffle_buffer: int = 512  # samples shuffled within each shard (emptied at its end: resume skips by shard counts)
    loader_workers: int = 0  # torch DataLoader processes per Ray worker (0 = in the training process)
    on_corrupt: OnCorrupt = "skip"  # a shard that cannot be read: skip (warn and count) | fail


@dataclass
class ObjectiveConfig:
    name: Objective = "rectified_flow"  # a key of dtrain.diffusion.OBJECTIVES: rectified_flow | ddpm | mean_flow
    time_sampling: TimeSampling = "logit_normal"  # how t is drawn in training: uniform | logit_normal (SD3)
    # rectified_flow pretraining only: regress each pair's own velocity (sample), or the stable target field,
    # the posterior-weighted mean over the batch's points of the same condition (stable; dtrain.diffusion.flow)
    target: Target = "sample"
    prediction: Prediction = "eps"  # ddpm only: what the net predicts, eps | v | x0 (rectified flow predicts velocity)
    schedule: Schedule = "cosine"  # ddpm only: noise schedule, cosine | vp_linear
    # mean_flow only (a one-step flow map, dtrain.diffusion.meanflow; needs model.flow_map=true):
    jump_share: float = 0.25  # share of samples trained on a jump s > t (the rest: s = t, flow matching)
    jvp: Jvp = "auto"  # the total derivative du/dt: forward (torch.func.jvp) | double_backward | finite_difference
    # (fp32 only) | auto: forward, finite_difference under ZeRO-3 (which neither of the others passes)
    adaptive_p: float = 1.0  # loss weight 1 / (error + 1e-3)^p (MeanFlow's adaptive weighting; 0 = plain MSE)


@dataclass
class StageConfig:
    # a key of dtrain.train.stages.STAGES, checked there with the kind's own rules: pretrain (images) | reflow
    # (trains on (noise, label, sample) pairs a teacher wrote, `dtrain pairs`: data.train_shards points at them)
    # | consistency_distill (a consistency student of stage.teacher, on images) | flow_map_distill (a MeanFlow
    # flow map of stage.teacher). `distill`, their name before, is read as one of the two by the objective.
    name: str = "pretrain"
    init_from: Optional[str] = None  # checkpoint (or run dir) whose EMA weights initialise the net: the parent
    # consistency_distill and flow_map_distill only:
    teacher: Optional[str] = None  # the checkpoint whose ODE the student learns to jump along: a flow, a flow
    # map, or a DDPM model (eps / v / x0, read as a velocity on the student's linear path)
    teacher_solver: Solver = "heun"  # the teacher's ODE step between adjacent times: euler | heun
    teacher_guidance: float = 1.0  # CFG scale of the teacher's velocity (the student then samples without)
    target_decay: float = 0.95  # EMA decay of the target network; 0 = the student itself, stop-gradient
    intervals: tuple[int, int] = (10, 80)  # discretisation curriculum: N doubles from the first to the second


@dataclass
class TrainConfig:
    run_name: str = "quickstart"  # Ray Train run name; rerunning the same name resumes
    storage_path: str = "runs"  # where runs and checkpoints live (local dir or shared FS / URI)
    steps: int = 1000  # optimizer steps
    lr: float = 1e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 50  # linear LR warmup
    grad_clip: float = 1.0  # global gradient-norm clip (0 = off)
    ema_decay: float = 0.999  # EMA of weights used for sampling and serving
    grad_accum_steps: int = 1  # micro-batches per optimizer step (global batch = batch_size x this x workers)
    zero_stage: int = 2  # DeepSpeed ZeRO stage 0-3
    # auto = bf16 where the hardware runs it natively (AMX/AVX512-BF16 CPUs, bf16 GPUs), else fp32 (fp16 on
    # older GPUs); see dtrain.precision. bf16 | fp32 | fp16 (GPU only) force one.
    precision: Precision = "auto"
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state and step on the CPU (DeepSpeedCPUAdam)
    offload_params: bool = False  # ZeRO-3: parameters live in CPU memory between uses
    activation_checkpointing: bool = False  # recompute each block's activations in backward
    compile: bool = False  # torch.compile the model inside the DeepSpeed engine (cold compile: tens of seconds)
    seed: int = 0
    log_every: int = 10  # steps between metric reports
    val_every: int = 0  # steps between validation losses on data.val_shards (fixed noise and times; 0 = off)
    ckpt_every: int = 250  # steps between checkpoints (and one at the end)
    ckpt_every_minutes: float = 0.0  # also checkpoint when this much wall time passed since the last one (0 = off)
    max_failures: int = 0  # worker failures Ray Train recovers from by restarting the group
    fault_drill_step: int = 0  # fault drill: the last rank exits abruptly after this many steps, once per run dir (0 = off)
    fault_drill_in_save: bool = False  # ...instead inside the checkpoint at that step, its own shard written, before it reports


@dataclass
class ScalingConfig:
    num_workers: int = 2  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    address: Optional[str] = None  # Ray cluster address; None starts a local cluster


@dataclass
class TrackingConfig:
    wandb: bool = True  # W&B run on rank 0 (offline when WANDB_API_KEY is unset)
    project: str = "dtrain"
    mode: TrackingMode = "auto"  # auto | online | offline | disabled
    sample_every: int = 0  # steps between sample grids logged to W&B (0 = only at the end)
    group: Optional[str] = None  # W&B run group (`dtrain pipeline` puts its stages in one group: its name)


@dataclass
class SampleConfig:
    steps: int = 16  # solver steps
    sampler: Sampler = "euler"  # euler | heun (2nd order) | ddim (DDPM models) | flow_map; see dtrain.diffusion.samplers
    guidance: float = 2.0  # classifier-free guidance scale (1 = off)
    per_class: int = 8  # samples per class in a grid


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


@dataclass
class PairsSpec:
    """Reflow pairs a stage's teacher (the previous stage) writes before the stage trains (dtrain.train.pairs)."""
    count: int = 2048  # pairs in all: a multiple of per_shard
    per_shard: int = 256  # pairs per shard (one Ray task each)
    steps: int = 32  # teacher ODE steps
    sampler: Sampler = "heun"  # teacher ODE solver: euler | heun | ddim
    guidance: float = 1.0  # teacher CFG scale (1 = off: the student learns the conditional flow)


@dataclass
class StageSpec:
    kind: str = "pretrain"  # a key of dtrain.train.stages.STAGES
    name: str = ""  # this stage's name in the pipeline (default: kind, numbered when repeated: reflow, reflow2)
    parent: str = ""  # the earlier stage this one starts from and (reflow, distillation) is taught by; "" = the one before
    overrides: list[str] = field(default_factory=list)  # key=value onto the pipeline's config for this stage
    pairs: PairsSpec = field(default_factory=PairsSpec)  # reflow only


@dataclass
class PipelineEvalSpec:
    steps: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])  # step counts for every stage
    samplers: list[Sampler] = field(default_factory=lambda: ["euler"])
    samples_per_class: int = 0  # 0 = as many as the noise-floor half of the validation set holds
    guidance: float = -1.0  # CFG scale; -1 = each stage's sample.guidance
    audit: bool = True  # digits: the bias audit (null-label samples' classes against the training labels) per stage
    n_prompts: int = 0  # shapes world, text models: evaluation prompts (plus a quarter as many held-out); 0 = 400


@dataclass
class PipelineConfig:
    """`dtrain pipeline FILE`: stages that each train one Ray Train run, in order, each initialised
    from (and, for reflow and distillation, taught by) its parent; then every stage is evaluated."""
    name: str = "pipeline"  # runs are <train.storage_path>/<name>-<stage name>; state in <name>.pipeline.json
    config: str = ""  # the experiment config every stage starts from (relative to this file)
    overrides: list[str] = field(default_factory=list)  # key=value onto it for every stage
    stages: list[StageSpec] = field(default_factory=list)
    eval: PipelineEvalSpec = field(default_factory=PipelineEvalSpec)
    root: str = ""  # set by load_pipeline: the stages' train.storage_path, absolute (or a URI); not for files


def read_pipeline(path: str | Path) -> PipelineConfig:
    """A pipeline file, typed and checked within itself: stage names (default: the kind, numbered when
    repeated), parents, pairs and samplers. The experiment config it names is resolved against the
    file's directory. What each stage's kind requires is checked by dtrain.train.pipeline.load_pipeline."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"pipeline file not found: {path}")
    typed: PipelineConfig = _plain(OmegaConf.to_object(_merge(OmegaConf.structured(PipelineConfig), _load_yaml(path),
                                                              str(path))))  # type: ignore[assignment]
    _check(bool(typed.config), "config", f"{path} names no experiment config")
    _check(bool(typed.stages), "stages", f"{path} lists no stage")
    typed.config = str((path.parent / typed.config).resolve())
    seen: dict[str, int] = {}
    for i, spec in enumerate(typed.stages):
        if not spec.name:
            seen[spec.kind] = seen.get(spec.kind, 0) + 1
            spec.name = spec.kind if seen[spec.kind] == 1 else f"{spec.kind}{seen[spec.kind]}"
        _check(spec.pairs.count > 0 and spec.pairs.count % spec.pairs.per_shard == 0, f"stages[{i}].pairs.count",
               f"{spec.pairs.count} is not a positive multiple of pairs.per_shard={spec.pairs.per_shard}")
    names = [s.name for s in typed.stages]
    _check(len(set(names)) == len(names), "stages", f"stage names repeat: {names}")
    for i, spec in enumerate(typed.stages):
        _check(not spec.parent or spec.parent in names[:i], f"stages[{i}].parent",
               f"'{spec.parent}' is not a stage before '{spec.name}' ({names[:i] or 'none'})")
    return typed


def _plain(obj):
    """A typed config with every choice as its plain string (the enum types exist for OmegaConf's checks)."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            _plain(v)
        elif isinstance(v, Enum):
            setattr(obj, f.name, v.value)
        elif isinstance(v, list):
            setattr(obj, f.name, [x.value if isinstance(x, Enum) else _plain(x) if dataclasses.is_dataclass(x) else x
                                  for x in v])
    return obj


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        raise ConfigError(f"{source}: bad key '{key}': {str(e).splitlines()[0]}") from None


def _load_yaml(path: Path) -> DictConfig:
    try:
        return OmegaConf.load(path)
    except Exception as e:  # yaml's parser and scanner errors: a file that is not YAML
        raise ConfigError(f"{path} is not valid YAML: {str(e).splitlines()[0]} ({' '.join(str(e).split()[-6:])})") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key=value` overrides, then validated. Returns a typed Config."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        cfg = _merge(cfg, _load_yaml(path), str(path))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override '{item}'")
    return _checked(cfg)


def _checked(cfg: DictConfig) -> Config:
    """A merged config as the typed Config: choices as plain strings, an old stage kind renamed, validated."""
    typed: Config = _plain(OmegaConf.to_object(cfg))  # type: ignore[assignment]
    typed.stage.name = current_stage_kind(typed.stage.name, typed.objective.name)
    validate(typed)
    return typed


def current_stage_kind(kind: str, objective: str) -> str:
    """Today's name of a stage kind. Before 2026-12 both distillations were kind `distill`: a consistency
    student, or a flow map when the objective was mean_flow. Checkpoints and pipeline files of then say so."""
    if kind != "distill":
        return kind
    return "flow_map_distill" if objective == "mean_flow" else "consistency_distill"


def from_yaml(text: str) -> Config:
    """Rebuild a Config from the YAML a checkpoint carries (see to_yaml)."""
    raw = OmegaConf.create(text)
    raw.pop("serve", None)  # checkpoints before dtrain.serving.config carried serving limits: ignored now
    cfg = _merge(OmegaConf.structured(Config), raw, "checkpoint config")
    return _checked(cfg)


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def validate(cfg: Config) -> None:
    """Semantic checks that types alone cannot express (the choices are Enum-typed fields: OmegaConf
    refuses a value outside them). Runs in the driver, before any worker."""

    m, t = cfg.model, cfg.train
    sizes = BACKBONES[m.arch].SIZES
    _check(m.size in sizes, "model.size", f"'{m.size}' is not a {m.arch} size: {sorted(sizes)}")
    _check(m.image_size % m.patch_size == 0, "model.image_size",
           f"{m.image_size} is not divisible by model.patch_size={m.patch_size}")
    _check(m.attn_every >= -1, "model.attn_every", "must be -1 (size default), 0 (pure SSM) or a block period")
    _check(0.0 <= m.class_dropout < 1.0, "model.class_dropout", "must be in [0, 1)")
    if m.conditioning == "text":
        _check(m.arch in ("dit", "ssm"), "model.conditioning", f"text conditioning needs a dit or ssm backbone, "
               f"not {m.arch} (it cross-attends to the caption)")
        _check(m.max_tokens >= 1, "model.max_tokens", "must be at least 1")
        _check(m.vocab_size >= 3, "model.vocab_size", "must be at least 3 (padding, unknown and one word)")
        _check(m.text_depth >= 0, "model.text_depth", "must be >= 0")
    o = cfg.objective
    st = cfg.stage
    _check(0.0 <= st.target_decay < 1.0, "stage.target_decay", "must be in [0, 1)")
    _check(1 <= st.intervals[0] <= st.intervals[1], "stage.intervals", f"{list(st.intervals)}: need 1 <= start <= end")
    _check((o.name == "mean_flow") <= m.flow_map, "model.flow_map", "objective mean_flow trains a flow map: "
           "set model.flow_map=true")
    _check(0.0 <= o.jump_share <= 1.0, "objective.jump_share", "must be in [0, 1]")
    _check(o.target == "sample" or (o.name == "rectified_flow" and st.name == "pretrain"), "objective.target",
           f"stable is a flow-matching target on independent noise: it needs objective.name=rectified_flow and "
           f"stage.name=pretrain (got {o.name}, {st.name})")
    _check(not (o.name == "mean_flow" and o.jvp in ("forward", "double_backward") and t.zero_stage == 3),
           "objective.jvp", "under ZeRO-3 neither forward-mode AD (its partitioned linear layers have no jvp "
           "rule) nor a double backward (it releases the weights) passes: use finite_difference, or auto")
    unfit = misfit(cfg.sample.sampler, m.flow_map)
    _check(not unfit, "sample.sampler", str(unfit))
    _check(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"{t.zero_stage} is not 0, 1, 2 or 3")
    _check(t.precision != "fp16" or cfg.scaling.use_gpu, "train.precision",
           "fp16 needs scaling.use_gpu=true (its loss scaler is a GPU path); use bf16 on CPU")
    _check(t.grad_accum_steps >= 1, "train.grad_accum_steps", "must be at least 1")
    _check(not t.offload_params or t.zero_stage == 3, "train.offload_params",
           f"needs train.zero_stage=3 (got {t.zero_stage}): only ZeRO-3 partitions parameters")
    _check(not t.offload_optimizer or t.zero_stage >= 1, "train.offload_optimizer",
           "needs train.zero_stage >= 1: ZeRO-0 does not partition optimizer state")
    _check(t.steps > 0, "train.steps", "must be positive")
    _check(t.lr > 0, "train.lr", "must be positive")
    _check(0.0 <= t.ema_decay < 1.0, "train.ema_decay", "must be in [0, 1)")
    _check(t.log_every > 0 and t.ckpt_every > 0, "train.log_every/ckpt_every", "must be positive")
    _check(t.ckpt_every_minutes >= 0, "train.ckpt_every_minutes", "must be >= 0 (0 = off)")
    _check(t.val_every >= 0, "train.val_every", "must be >= 0 (0 = off)")
    _check(not t.fault_drill_in_save or (t.fault_drill_step > 0 and (t.fault_drill_step % t.ckpt_every == 0
                                                                      or t.fault_drill_step == t.steps)),
           "train.fault_drill_in_save", f"train.fault_drill_step={t.fault_drill_step} is not a checkpoint step")
    _check(cfg.data.batch_size > 0, "data.batch_size", "must be positive")
    _check(cfg.scaling.num_workers > 0, "scaling.num_workers", "must be positive")
    _check(cfg.sample.steps > 0, "sample.steps", "must be positive")

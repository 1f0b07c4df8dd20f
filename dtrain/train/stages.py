"""Training stages: one class per kind, holding everything about it, in a registry the loop and the
pipeline call without branches.

A kind checks its config (`check`), decides in a pipeline what it needs before it trains (`prelude`:
its teacher, the pairs it trains on), and gives the loop its objective, batches, the weights the net
starts from (its parent's EMA weights), a hook after every optimizer step and what its checkpoints
record (`meta`: stage, parent and teacher, the lineage `dtrain pipeline` chains and evaluates).

    pretrain            images -> the objective of cfg.objective (rectified flow, DDPM, a MeanFlow flow map)
    reflow              (noise, label, sample) pairs its teacher wrote (dtrain.train.pairs) -> rectified flow
                        on those couplings (Liu et al. 2022, k-rectified flow), initialised from its parent
    consistency_distill images -> consistency distillation of a frozen teacher (Song et al. 2023) with an
                        EMA target network, both sharded like the student
    flow_map_distill    images -> a flow map (MeanFlow) learning its teacher's guided velocity

A new kind is a subclass of Stage decorated with @register: nothing else changes (tests/test_stage_registry.py).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

import torch
from safetensors.torch import load_file

from dtrain import checkpoint as ckpt_io
from dtrain import storage
from dtrain.config import ConfigError, StageSpec
from dtrain.data.shards import CorruptShards, expand_urls, train_batches
from dtrain.diffusion import build_objective, prediction_and_path
from dtrain.diffusion.consistency import ConsistencyDistillation, intervals_at
from dtrain.diffusion.flow import RectifiedFlowLoss
from dtrain.diffusion.meanflow import MeanFlowLoss
from dtrain.diffusion.parameterization import on_linear_path
from dtrain.models import null_condition
from dtrain.precision import in_precision
from dtrain.train.pairs import generate_pairs, read_pairs_info, shard_urls

STAGES: dict[str, type[Stage]] = {}  # kind name -> its class (see register)


def register(kind: type[Stage]) -> type[Stage]:
    """Class decorator: make `kind` a stage kind, under kind.name."""
    STAGES[kind.name] = kind
    return kind


def stage_kind(cfg) -> type[Stage]:
    """The class of cfg.stage.name; ConfigError naming the key when there is none."""
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage.name: '{cfg.stage.name}' is not one of {sorted(STAGES)}")
    return STAGES[cfg.stage.name]


def check_stage(cfg) -> None:
    """The rules of cfg's stage kind (beyond config.validate's in-section checks); ConfigError names the key."""
    stage_kind(cfg).check(cfg)


def build_stage(cfg) -> Stage:
    return stage_kind(cfg).build(cfg)


@dataclass
class PipelineStep:
    """What a kind's prelude knows in `dtrain pipeline`: the stage, the checkpoint it starts from, where the
    pipeline's runs live. dry: only validating the pipeline (nothing exists yet: decide, write nothing)."""
    spec: StageSpec
    parent: str | None
    root: str
    pipeline: str
    dry: bool = False


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


@dataclass
class Stage:
    """The base kind (and the loop's view of a stage). Subclasses set `name`, and override what differs."""
    name: ClassVar[str] = ""
    needs_teacher: ClassVar[bool] = False  # is taught by its parent: cannot be a pipeline's first stage
    objective: Callable | None  # loss(model_fn, batch, generator=None) -> per-sample loss [B] (set by attach)
    parent: str | None = None  # checkpoint whose EMA weights the net starts from (None: random init)
    lineage: dict = field(default_factory=dict)  # what else its checkpoints record (teacher, k, ...)

    # ---- in the driver: config, pipeline ----
    @classmethod
    def check(cls, cfg) -> None:
        """This kind's rules on a whole config (ConfigError naming the key)."""

    @classmethod
    def prelude(cls, step: PipelineStep) -> list[str]:
        """In a pipeline, before the stage trains: the overrides it adds (its teacher, its pair shards)."""
        return []

    @classmethod
    def build(cls, cfg) -> Stage:
        return cls(build_objective(cfg.objective), parent=_parent(cfg))

    # ---- in every worker: the loop ----
    def batches(self, cfg, rank: int, world: int, skip: int, on_corrupt: CorruptShards) -> Iterator[dict]:
        """This rank's endless stream of batches {x, cond[, noise]} (see dtrain.data.shards); a text model's
        cond is its captions (a list of str), which the loop encodes with the run's tokenizer."""
        d = cfg.data
        for x, y, *rest in train_batches(d.train_shards, rank, world, cfg.train.seed, d.batch_size, d.shuffle_buffer,
                                         d.loader_workers, skip=skip, on_corrupt=on_corrupt,
                                         captions=cfg.model.conditioning == "text"):
            yield {"x": x, "cond": y, **({"noise": rest[0]} if rest else {})}

    def attach(self, engine, cfg, world: int, dtype: torch.dtype, start: int, resume: Path | None = None) -> None:
        """Called once the student's engine exists (resumed at step `start` from checkpoint `resume`): a
        stage with frozen networks builds them here."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What the stage adds to a checkpoint (called on every rank; rank 0's result is saved)."""
        return {}

    def initial_weights(self) -> dict[str, torch.Tensor] | None:
        return ckpt_io.read_weights(ckpt_io.resolve(self.parent)) if self.parent else None

    def load_parent(self, net: torch.nn.Module) -> None:
        """The parent's weights into `net`. A flow map may start from a velocity net: its span embedding
        (zero output, so u(x, t, s) = v(x, t) at first) is the one thing the parent lacks."""
        missing, unexpected = net.load_state_dict(self.initial_weights(), strict=False)
        missing = [k for k in missing if not k.startswith("span_embed.")]
        if missing or unexpected:
            raise ValueError(f"parent {self.parent} does not fit this net: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]} (model config differs)")

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (a consistency stage updates its target network here)."""

    def meta(self) -> dict:
        return {"stage": self.name, "parent": self.parent, **self.lineage}


@register
class Pretrain(Stage):
    """Images -> cfg.objective; a flow map (objective mean_flow) resolves its JVP mode for the ZeRO stage."""
    name = "pretrain"

    @classmethod
    def build(cls, cfg) -> Stage:
        if cfg.objective.name != "mean_flow":
            return super().build(cfg)
        objective = _mean_flow(cfg)
        return cls(objective, parent=_parent(cfg), lineage={"jvp": objective.jvp})

    def attach(self, engine, cfg, world: int, dtype: torch.dtype, start: int, resume: Path | None = None) -> None:
        if isinstance(self.objective, MeanFlowLoss):
            _check_difference_precision(self.objective, cfg, dtype)
        if isinstance(self.objective, RectifiedFlowLoss) and self.objective.target == "stable":
            _no_embedder_dropout(engine.module)  # the stable target must know the null rows: the loss drops them
            self.objective.drop_conditions(null_condition(cfg.model), cfg.model.class_dropout)


def _no_embedder_dropout(net: torch.nn.Module) -> None:
    """Turn off the backbone's own condition dropout, for an objective that drops conditions itself."""
    from dtrain.models.layers import LabelEmbedder
    from dtrain.models.text import TextEncoder

    for m in net.modules():
        if isinstance(m, (LabelEmbedder, TextEncoder)):
            m.dropout = 0.0


@register
class Reflow(Stage):
    """Rectified flow on the (noise, sample) pairs its teacher wrote; the pipeline has the teacher write them."""
    name = "reflow"
    needs_teacher = True

    @classmethod
    def check(cls, cfg) -> None:
        _check(cfg.objective.name == "rectified_flow", "stage.name",
               f"reflow straightens a flow: it needs objective.name=rectified_flow (got {cfg.objective.name})")

    @classmethod
    def prelude(cls, step: PipelineStep) -> list[str]:
        if step.dry:
            return []
        pairs = f"{step.root}/{step.pipeline}-{step.spec.name}-pairs"
        p = step.spec.pairs
        generate_pairs(step.parent, pairs, count=p.count, per_shard=p.per_shard, steps=p.steps, sampler=p.sampler,
                       guidance=p.guidance)
        return [f"data.train_shards={shard_urls(pairs, p.count, p.per_shard)}"]

    @classmethod
    def build(cls, cfg) -> Stage:
        info = read_pairs_info(cfg.data.train_shards)
        text = cfg.model.conditioning == "text"
        if text != bool(info.get("captions")):  # a class model on captioned pairs would train unconditionally
            raise ConfigError(f"data.train_shards: pairs of a {'text' if info.get('captions') else 'class'} teacher "
                              f"cannot train a {cfg.model.conditioning} model: model.conditioning must match the teacher's")
        k = int(info.get("teacher_reflow_k") or 1) + 1  # a pretrained flow is 1-rectified; each reflow adds one
        pairs = storage.parent(expand_urls(cfg.data.train_shards)[0])
        return cls(RectifiedFlowLoss(cfg.objective.time_sampling), parent=_parent(cfg),
                   lineage={"teacher": info["teacher"], "reflow_k": k, "pairs": pairs})


class Distillation(Stage):
    """A student taught by a frozen teacher (stage.teacher: in a pipeline, its parent), which runs under the
    student's ZeRO stage (partitioned under ZeRO-3). A DDPM teacher (eps / v / x0 on a VP path) is read as
    a velocity on the student's linear path."""
    needs_teacher = True

    @classmethod
    def check(cls, cfg) -> None:
        _check(bool(cfg.stage.teacher), "stage.teacher", f"stage {cls.name} needs a teacher checkpoint")

    @classmethod
    def prelude(cls, step: PipelineStep) -> list[str]:
        return [f"stage.teacher={'previous-stage' if step.dry else step.parent}"]

    @classmethod
    def build(cls, cfg) -> Stage:
        st = cfg.stage
        return cls(None, parent=_parent(cfg),
                   lineage={"teacher": ckpt_io.locate(st.teacher), "teacher_solver": st.teacher_solver,
                            "teacher_guidance": st.teacher_guidance, "target_decay": st.target_decay,
                            "intervals": list(st.intervals)})

    def attach(self, engine, cfg, world: int, dtype: torch.dtype, start: int, resume: Path | None = None) -> None:
        self.cfg, self.engine = cfg, engine
        _no_embedder_dropout(engine.module)  # the objective drops conditions itself, the same for every net
        self.teach(self._teacher(cfg, world, dtype), cfg, world, dtype, start, resume)

    def _teacher(self, cfg, world: int, dtype: torch.dtype):
        """The teacher's velocity on the student's linear path, fp32 in and out."""
        from dtrain.train.deepspeed_glue import frozen_engine

        net, tcfg = ckpt_io.load_model(self.lineage["teacher"])
        teacher = frozen_engine(net, cfg, world, dtype)
        return on_linear_path(in_precision(teacher, dtype), *prediction_and_path(tcfg.objective))

    def teach(self, teacher_fn, cfg, world: int, dtype: torch.dtype, start: int, resume: Path | None) -> None:
        """Build the objective from the teacher's velocity."""
        raise NotImplementedError


@register
class ConsistencyDistill(Distillation):
    """Consistency distillation (dtrain.diffusion.consistency): the EMA target follows the student after every
    step; the interval count follows the curriculum. The target is saved with each checkpoint and restored
    on resume, so a resumed distillation continues exactly."""
    name = "consistency_distill"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        _check(cfg.objective.name == "rectified_flow", "objective.name", "a consistency student is trained on the "
               f"linear path (rectified_flow), not {cfg.objective.name}; a flow map distils with flow_map_distill")

    def teach(self, teacher_fn, cfg, world: int, dtype: torch.dtype, start: int, resume: Path | None) -> None:
        from dtrain.models import build_model
        from dtrain.train.deepspeed_glue import frozen_engine

        st, self.target = cfg.stage, None
        if st.target_decay > 0:
            torch.manual_seed(cfg.train.seed)  # the student's own initialisation when it has no parent
            net = build_model(cfg.model)
            saved = resume and resume / ckpt_io.STAGE_STATE_FILE
            if saved and saved.is_file():  # where the target had got to
                net.load_state_dict(load_file(str(saved)))
            elif self.parent:
                self.load_parent(net)
            self.target = frozen_engine(net, cfg, world, dtype)
        target = self.target or self.engine
        self.objective = ConsistencyDistillation(
            teacher=teacher_fn,
            target=in_precision(target, dtype),
            null_label=null_condition(cfg.model), solver=st.teacher_solver, guidance=st.teacher_guidance,
            cond_dropout=cfg.model.class_dropout, intervals=intervals_at(start, cfg.train.steps, *st.intervals))

    def state_dict(self) -> dict[str, torch.Tensor]:
        if getattr(self, "target", None) is None:
            return {}
        module = getattr(self.target, "module", self.target)  # a ZeRO-3 engine, or the net itself
        params = [p for p in module.parameters() if hasattr(p, "ds_id")]
        with _gathered(params):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        st = self.cfg.stage
        self.objective.intervals = intervals_at(step + 1, self.cfg.train.steps, *st.intervals)
        if self.target is None:
            return
        # theta_target <- decay theta_target + (1 - decay) theta, on this rank's partition under ZeRO-3
        for pt, ps in zip(self.target.parameters(), self.engine.module.parameters()):
            mine, theirs = (pt.ds_tensor, ps.ds_tensor) if hasattr(pt, "ds_tensor") else (pt.data, ps.data)
            mine.lerp_(theirs.to(mine.dtype), 1 - st.target_decay)


@register
class FlowMapDistill(Distillation):
    """A flow map (MeanFlow) learning its teacher's guided ODE: target and JVP tangent from the teacher's
    velocity, no target network."""
    name = "flow_map_distill"

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        _check(cfg.objective.name == "mean_flow", "objective.name",
               f"a flow map distils with objective mean_flow, not {cfg.objective.name}")

    def teach(self, teacher_fn, cfg, world: int, dtype: torch.dtype, start: int, resume: Path | None) -> None:
        st = cfg.stage
        self.objective = _mean_flow(cfg).distil_from(teacher_fn, st.teacher_guidance, null_condition(cfg.model),
                                                     cfg.model.class_dropout)
        _check_difference_precision(self.objective, cfg, dtype)
        self.lineage["jvp"] = self.objective.jvp


def _mean_flow(cfg) -> MeanFlowLoss:
    """The flow map's objective with its JVP mode resolved: `auto` is forward mode, or under ZeRO-3 (which
    neither forward mode nor a second backward passes, dtrain.diffusion.meanflow) central differences."""
    objective = MeanFlowLoss.from_config(cfg.objective)
    if objective.jvp == "auto":
        objective.jvp = "finite_difference" if cfg.train.zero_stage == 3 else "forward"
    return objective


def _check_difference_precision(objective: MeanFlowLoss, cfg, dtype: torch.dtype) -> None:
    if objective.jvp == "finite_difference" and dtype != torch.float32:
        raise ValueError(f"the flow map's JVP by finite differences (ZeRO-3) needs train.precision=fp32, not "
                         f"{cfg.train.precision}: a difference quotient of {dtype} outputs is noise")


def _gathered(params: list):
    """ZeRO-3's partitioned parameters whole for the duration (a collective); nothing to do otherwise."""
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def _parent(cfg) -> str | None:
    return ckpt_io.locate(cfg.stage.init_from) if cfg.stage.init_from else None


def parent_of(cfg) -> str | None:
    """The checkpoint a stage starts from (init_from), else the one it learns from (its teacher)."""
    return cfg.stage.init_from or cfg.stage.teacher

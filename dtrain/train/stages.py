"""Training stages as registry entries, not branches in the loop.

A stage gives the loop its objective (a callable over a batch dict), its batches, the weights the net
starts from (its parent's EMA weights), a hook after every optimizer step, and what its checkpoints
record: stage, parent and teacher, the lineage that `dtrain pipeline` chains and evaluates.

    pretrain  images -> the objective of cfg.objective (rectified flow, DDPM eps / v / x0)
    reflow    (noise, label, sample) pairs a teacher wrote (`dtrain pairs`) -> rectified flow on those
              couplings (Liu et al. 2022, k-rectified flow), initialised from its parent
    distill   images -> consistency distillation of a frozen teacher (Song et al. 2023) with an EMA
              target network, both sharded like the student
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import load_file

from dtrain import checkpoint as ckpt_io
from dtrain import storage
from dtrain.data.shards import CorruptShards, DataError, expand_urls, train_batches
from dtrain.diffusion import build_objective, prediction_and_path
from dtrain.diffusion.consistency import ConsistencyDistillation, intervals_at
from dtrain.diffusion.flow import RectifiedFlowLoss
from dtrain.diffusion.meanflow import MeanFlowLoss
from dtrain.diffusion.parameterization import on_linear_path

PAIRS_FILE = "pairs.json"  # beside pair shards: the teacher and sampler that made them (dtrain.train.pairs)


@dataclass
class Stage:
    name: str
    objective: Callable | None  # loss(model_fn, batch, generator=None) -> per-sample loss [B] (set by attach)
    parent: str | None = None  # checkpoint whose EMA weights the net starts from (None: random init)
    lineage: dict = field(default_factory=dict)  # what else its checkpoints record (teacher, k, ...)

    def batches(self, cfg, rank: int, world: int, skip: int, on_corrupt: CorruptShards) -> Iterator[dict]:
        """This rank's endless stream of batches {x, cond[, noise]} (see dtrain.data.shards)."""
        d = cfg.data
        for x, y, *rest in train_batches(d.train_shards, rank, world, cfg.train.seed, d.batch_size, d.shuffle_buffer,
                                         d.loader_workers, skip=skip, on_corrupt=on_corrupt):
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


def pretrain(cfg) -> Stage:
    if cfg.objective.name == "mean_flow":
        objective = _mean_flow(cfg)
        return FlowMap("pretrain", objective, parent=_parent(cfg), lineage={"jvp": objective.jvp})
    return Stage("pretrain", build_objective(cfg.objective), parent=_parent(cfg))


def _mean_flow(cfg) -> MeanFlowLoss:
    """The flow map's objective with its JVP mode resolved: `auto` is forward mode, or under ZeRO-3 (which
    neither forward mode nor a second backward passes, dtrain.diffusion.meanflow) central differences."""
    objective = MeanFlowLoss.from_config(cfg.objective)
    if objective.jvp == "auto":
        objective.jvp = "finite_difference" if cfg.train.zero_stage == 3 else "forward"
    return objective


class FlowMap(Stage):
    """A flow map (MeanFlow) trained like any pretraining; its JVP by finite differences needs fp32."""

    def attach(self, engine, cfg, world: int, dtype: torch.dtype, start: int, resume: Path | None = None) -> None:
        _check_difference_precision(self.objective, cfg, dtype)


def _check_difference_precision(objective: MeanFlowLoss, cfg, dtype: torch.dtype) -> None:
    if objective.jvp == "finite_difference" and dtype != torch.float32:
        raise ValueError(f"the flow map's JVP by finite differences (ZeRO-3) needs train.precision=fp32, not "
                         f"{cfg.train.precision}: a difference quotient of {dtype} outputs is noise")


def reflow(cfg) -> Stage:
    info = read_pairs_info(cfg.data.train_shards)
    k = int(info.get("teacher_reflow_k") or 1) + 1  # a pretrained flow is 1-rectified; each reflow adds one
    return Stage("reflow", RectifiedFlowLoss(cfg.objective.time_sampling), parent=_parent(cfg),
                 lineage={"teacher": info["teacher"], "reflow_k": k, "pairs": storage.parent(expand_urls(cfg.data.train_shards)[0])})


class Distill(Stage):
    """Consistency distillation of a frozen teacher (dtrain.diffusion.consistency): the teacher and the
    EMA target run under the student's ZeRO stage (partitioned under ZeRO-3); the target follows the
    student after every step; the interval count follows the curriculum. The target is saved with each
    checkpoint and restored on resume, so a resumed distillation continues exactly."""

    def attach(self, engine, cfg, world: int, dtype: torch.dtype, start: int, resume: Path | None = None) -> None:
        from dtrain.models import build_model
        from dtrain.models.layers import LabelEmbedder
        from dtrain.train.deepspeed_glue import frozen_engine

        st, self.cfg, self.engine = cfg.stage, cfg, engine
        for m in engine.module.modules():  # the objective drops labels itself, the same for all three nets
            if isinstance(m, LabelEmbedder):
                m.dropout = 0.0
        net, tcfg = ckpt_io.load_model(self.lineage["teacher"])
        teacher = frozen_engine(net, cfg, world, dtype)
        # a DDPM teacher (eps / v / x0 on a VP path) is read as a velocity on the student's linear path
        teacher_fn = on_linear_path(lambda x, t, c: teacher(x.to(dtype), t, c).float(),
                                    *prediction_and_path(tcfg.objective))
        self.target = None
        if cfg.objective.name == "mean_flow":  # a flow map learns the teacher's ODE: no target network
            self.objective = _mean_flow(cfg).distil_from(teacher_fn, st.teacher_guidance, cfg.model.num_classes,
                                                         cfg.model.class_dropout)
            _check_difference_precision(self.objective, cfg, dtype)
            self.lineage["jvp"] = self.objective.jvp
            return
        if st.target_decay > 0:
            torch.manual_seed(cfg.train.seed)  # the student's own initialisation when it has no parent
            net = build_model(cfg.model)
            saved = resume and resume / ckpt_io.STAGE_STATE_FILE
            if saved and saved.is_file():  # where the target had got to
                net.load_state_dict(load_file(str(saved)))
            elif self.parent:
                self.load_parent(net)
            self.target = frozen_engine(net, cfg, world, dtype)
        target = self.target or engine
        self.objective = ConsistencyDistillation(
            teacher=teacher_fn,
            target=lambda x, t, c: target(x.to(dtype), t, c).float(),
            null_label=cfg.model.num_classes, solver=st.teacher_solver, guidance=st.teacher_guidance,
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
        if not isinstance(self.objective, ConsistencyDistillation):
            return
        self.objective.intervals = intervals_at(step + 1, self.cfg.train.steps, *st.intervals)
        if self.target is None:
            return
        # theta_target <- decay theta_target + (1 - decay) theta, on this rank's partition under ZeRO-3
        for pt, ps in zip(self.target.parameters(), self.engine.module.parameters()):
            mine, theirs = (pt.ds_tensor, ps.ds_tensor) if hasattr(pt, "ds_tensor") else (pt.data, ps.data)
            mine.lerp_(theirs.to(mine.dtype), 1 - st.target_decay)


def _gathered(params: list):
    """ZeRO-3's partitioned parameters whole for the duration (a collective); nothing to do otherwise."""
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def distill(cfg) -> Stage:
    teacher = ckpt_io.locate(cfg.stage.teacher)
    return Distill("distill", None, parent=_parent(cfg),
                   lineage={"teacher": teacher, "teacher_solver": cfg.stage.teacher_solver,
                            "teacher_guidance": cfg.stage.teacher_guidance, "target_decay": cfg.stage.target_decay,
                            "intervals": list(cfg.stage.intervals)})


STAGES: dict[str, Callable] = {"pretrain": pretrain, "reflow": reflow, "distill": distill}


def build_stage(cfg) -> Stage:
    return STAGES[cfg.stage.name](cfg)


def read_pairs_info(urls: str) -> dict:
    """The `pairs.json` beside pair shards; DataError when the shards are not pairs."""
    info = storage.sibling(expand_urls(urls)[0], PAIRS_FILE)
    if not storage.exists(info):
        raise DataError(f"stage reflow trains on pairs, but {info} is missing: data.train_shards={urls} are not "
                        "pair shards (make them with `dtrain pairs TEACHER --out DIR`)")
    return json.loads(storage.read_text(info))


def _parent(cfg) -> str | None:
    return ckpt_io.locate(cfg.stage.init_from) if cfg.stage.init_from else None

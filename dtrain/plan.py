"""`dtrain plan`: what a run will need, before anyone pays for it. Nothing trains, no GPU, no Ray.

For a training config, or every stage of a pipeline file: the model (built on the meta device, so a
DiT-XL/2 costs no memory), its FLOPs, the batch, the DeepSpeed config the driver would hand DeepSpeed,
and the memory of one rank, checked against a device when one is named.

Memory per rank = model states + EMA + frozen nets + activations + WORKSPACE_GIB.

- Model states (weights, gradients, optimizer state): DeepSpeed's own estimators where they exist
  (ZeRO-2 and ZeRO-3 in 16-bit training); they count the fp32 gradient partition DeepSpeed fills at the
  step boundary and, under ZeRO-3, the largest layer gathered whole, so they sit above the ZeRO paper's
  figure (tests/test_plan.py compares both with `dtrain bench zero`). Elsewhere (ZeRO 0 and 1, fp32
  training) the ZeRO paper's bytes per parameter (dtrain.bench.zero.paper_bytes_per_param), less what
  offloading moves to the host.
- EMA: dtrain.train.ema keeps an fp32 copy sharded like the master weights.
- Frozen nets: a distillation's teacher and a consistency student's target network, in the training
  precision, partitioned only under ZeRO-3. Each is taken to be the student's size.
- Activations: an estimate, see activation_bytes.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import yaml

from dtrain.config import Config, load_config
from dtrain.errors import DtrainError
from dtrain.models import BACKBONES, build_model

GIB = 2**30
# Device memory in GiB as nvidia-smi reports it (MiB / 1024): the marketing "80 GB" of an H100 is 79.6 GiB.
DEVICES = {"a100-40gb": 40.0, "a100-80gb": 80.0, "h100-80gb": 79.6, "h200": 140.4}
# CUDA context and kernels (0.5-1 GiB), NCCL's buffers, DeepSpeed's reduce and all-gather buckets
# (5e6 elements each, dtrain.train.deepspeed_glue), the caching allocator's fragmentation.
WORKSPACE_GIB = 2.0
FROZEN_NETS = {"consistency_distill": 1, "flow_map_distill": 1}  # teachers; a consistency target adds one


class PlanError(DtrainError):
    """A run that cannot fit its devices (the message says by how much and what would fit), or a bad device."""


def device_gib(name: str | None = None, gib: float | None = None) -> float | None:
    """The memory of the device to check against: a named one, a size in GiB, or None (no check)."""
    if name is not None and gib is not None:
        raise PlanError("give --device or --device-memory, not both")
    if name is not None and name.lower() not in DEVICES:
        raise PlanError(f"unknown device '{name}': one of {', '.join(sorted(DEVICES))}, or --device-memory GiB")
    if gib is not None and gib <= 0:
        raise PlanError(f"--device-memory {gib}: must be positive")
    return DEVICES[name.lower()] if name is not None else gib


# ---- the model -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Block:
    """What the activation estimate needs of one block: an attention/MLP block, or an SSM block's scan shape."""
    kind: str  # attn | ssm | mlp
    scan_heads: int = 0  # ssm: heads of both scan directions
    head_dim: int = 0
    d_state: int = 0
    chunk: int = 0


@dataclass(frozen=True)
class ModelFacts:
    params: int
    largest_layer: int  # parameters of the largest module (DeepSpeed's ZeRO-3 estimator gathers it whole)
    hidden: int
    depth: int
    heads: int
    tokens: int
    blocks: tuple[Block, ...]
    checkpointable: bool  # the backbone honours train.activation_checkpointing (DiT and the SSM hybrid do)


def model_facts(m) -> ModelFacts:
    """The model of a ModelConfig, built on the meta device (shapes only: no memory, no init cost)."""
    from dtrain.models.dit import DiT

    with torch.device("meta"):
        net = build_model(m)
    size = BACKBONES[m.arch].SIZES[m.size]
    blocks = tuple(Block("ssm", 2 * b.mixer.heads, b.mixer.head_dim, b.mixer.d_state, b.mixer.chunk)
                   if hasattr(b, "mixer") else Block("attn" if hasattr(b, "attn") else "mlp") for b in net.blocks)
    return ModelFacts(
        params=sum(p.numel() for p in net.parameters()),
        largest_layer=max(sum(p.numel() for p in mod.parameters(recurse=False)) for mod in net.modules()),
        hidden=m.hidden_size or size.hidden_size, depth=len(blocks), heads=m.num_heads or getattr(size, "num_heads", 0),
        tokens=net.grid ** 2 if isinstance(net, DiT) else 1,  # the mlp backbone sees a sample as one vector
        blocks=blocks, checkpointable=isinstance(net, DiT))


def forward_flops(m) -> int | None:
    """FLOPs of one forward pass of one image (2 x dtrain.models.flops.forward_macs), counted on the
    meta device; None where a backbone cannot run there."""
    from dtrain.models.flops import forward_macs

    try:
        return 2 * forward_macs(m)
    except RuntimeError:
        return None


# ---- memory ----------------------------------------------------------------------------------------

def resolved_precision(cfg: Config) -> str:
    """train.precision `auto` is decided on the workers by their hardware: every GPU plan() knows runs
    bf16 natively; a CPU run is planned in fp32, the upper bound (and what the driver's check assumes)."""
    p = cfg.train.precision
    return p if p != "auto" else "bf16" if cfg.scaling.use_gpu else "fp32"


def model_state_bytes(n: int, largest: int, stage: int, world: int, precision: str,
                      offload_optimizer: bool = False, offload_params: bool = False) -> dict:
    """Per-rank device bytes of weights + gradients + optimizer state: {paper, deepspeed (None where
    DeepSpeed has no estimator), bytes (the figure used: DeepSpeed's where it has one)}."""
    from dtrain.bench.zero import PAPER_BYTES, paper_bytes_per_param

    p, k = PAPER_BYTES[precision]
    per_param = paper_bytes_per_param(stage, world, precision)
    if offload_optimizer:  # the optimizer state (and under ZeRO 1-2 its step) lives in host memory
        per_param -= k / world
    if offload_params:  # ZeRO-3 only: this rank's weight partition too
        per_param -= p / world
    paper = int(n * per_param)
    ds = _deepspeed_estimate(n, largest, stage, world, offload_optimizer, offload_params) if p == 2 else None
    return {"paper": paper, "deepspeed": ds, "bytes": ds if ds is not None else paper}


def _deepspeed_estimate(n: int, largest: int, stage: int, world: int, offload_optimizer: bool,
                        offload_params: bool) -> int | None:
    """DeepSpeed's per-GPU model-state estimate (the numbers its estimate_zero*_all_cold functions print).
    They only depend on the total GPU count, so one node of `world` GPUs stands for any layout."""
    if stage not in (2, 3):
        return None
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as dtrain.train.deepspeed_glue: no GPU probe warning
    if stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        return estimate_zero2_model_states_mem_needs(n, num_gpus_per_node=world, cpu_offload=offload_optimizer)[1]
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    # zero_init only changes the host figure; dtrain builds the model whole on every rank (no zero.Init)
    return estimate_zero3_model_states_mem_needs(n, largest, num_gpus_per_node=world, cpu_offload=offload_optimizer,
                                                 cpu_offload_params=offload_params, zero_init=False)[1]


def activation_bytes(facts: ModelFacts, batch: int, precision: str) -> tuple[int, int]:
    """Bytes autograd keeps for the backward pass of one micro-batch on one rank: (without, with
    activation checkpointing). An estimate, from Korthikanti et al. 2022 ("Reducing activation
    recomputation in large transformer models", Sec. 4.1), in s = tokens, b = micro-batch, h = hidden:

    - a DiT block: 20 sbh 16-bit values (40 sbh bytes). Their GPT layer keeps 34 sbh + 5 a s^2 b bytes;
      a DiT block adds 8 sbh (adaLN-Zero's two modulated inputs and two ungated branch outputs), lacks
      their 2 sbh of dropout masks, and keeps no a s^2 b attention scores: SDPA's flash and
      memory-efficient kernels (and torch's CPU flash kernel) do not materialise them. Measured with
      saved-tensor hooks on CPU in bf16: 40.6 sbh (DiT-S/2, s = 64 and 256).
    - an SSM block: 57 sbh 16-bit values (norms, modulation, projections, MLP) plus the pure-PyTorch SSD
      scan's fp32 intermediates, 4 H (6 T + 3 N + P N / T) bytes per token padded to the chunk T, with H
      the heads of both directions, P their width, N the state size (dtrain.models.scan; measured within
      5% at S and XL, s = 256; the fused mamba_ssm kernels keep less, so this is an upper bound there).
    - an MLP block (the vector backbone, s = 1): taken as a DiT block.
    - outside the blocks, the final layer's 3 sbh values.
    With checkpointing each block keeps only its input (sbh values) and one block at a time is recomputed
    whole in the backward pass. Not counted: the loss's own tensors, transient kernel workspace
    (WORKSPACE_GIB covers those), a teacher's forward passes (no_grad: nothing kept)."""
    e = 2 if precision in ("bf16", "fp16") else 4  # bytes of a value in the training precision
    s, h = facts.tokens, facts.hidden

    def block(blk: Block) -> int:  # bytes per sample
        if blk.kind != "ssm":
            return 20 * s * h * e
        padded = math.ceil(s / blk.chunk) * blk.chunk
        return 57 * s * h * e + 4 * blk.scan_heads * (6 * blk.chunk + 3 * blk.d_state
                                                      + blk.head_dim * blk.d_state // blk.chunk) * padded

    outside = 3 * s * h * e
    full = batch * (sum(block(b) for b in facts.blocks) + outside)
    if not facts.checkpointable:
        return full, full
    return full, batch * (facts.depth * s * h * e + outside + max(block(b) for b in facts.blocks))


def memory(cfg: Config, facts: ModelFacts, world: int) -> dict:
    """Per-rank bytes of a run of `cfg` on `world` ranks (see the module docstring), and their total."""
    t, precision = cfg.train, resolved_precision(cfg)
    n, stage, p = facts.params, t.zero_stage, 2 if precision in ("bf16", "fp16") else 4
    states = model_state_bytes(n, facts.largest_layer, stage, world, precision, t.offload_optimizer, t.offload_params)
    # the EMA follows the fp32 masters: partitioned under ZeRO 1-2 in 16-bit, and under ZeRO-3
    ema = 4 * n // world if stage == 3 or (stage >= 1 and p == 2) else 4 * n
    nets = FROZEN_NETS.get(cfg.stage.name, 0) + (cfg.stage.name == "consistency_distill" and cfg.stage.target_decay > 0)
    frozen = nets * p * (n // world if stage == 3 else n)
    full, ckpt = activation_bytes(facts, cfg.data.batch_size, precision)
    acts = ckpt if t.activation_checkpointing else full
    return {"model_states": states["bytes"], "model_states_zero_paper": states["paper"],
            "model_states_deepspeed": states["deepspeed"], "ema": ema, "frozen_nets": frozen, "frozen_net_count": nets,
            "activations": acts, "activations_without_checkpointing": full, "activations_with_checkpointing": ckpt,
            "workspace": int(WORKSPACE_GIB * GIB),
            "total": states["bytes"] + ema + frozen + acts + int(WORKSPACE_GIB * GIB)}


# ---- plans -----------------------------------------------------------------------------------------

def plan_config(cfg: Config, workers: int | None = None, device: float | None = None) -> dict:
    """The plan of one training run: model, FLOPs, batch, DeepSpeed config, memory per rank, and the
    verdict against `device` GiB (None: no check)."""
    from dtrain.train.deepspeed_glue import deepspeed_config

    world = workers or cfg.scaling.num_workers
    precision = resolved_precision(cfg)
    m, t = cfg.model, cfg.train
    facts = model_facts(m)
    fwd = forward_flops(m)
    global_batch = cfg.data.batch_size * t.grad_accum_steps * world
    mem = memory(cfg, facts, world)
    report = {
        "stage": cfg.stage.name,
        "model": {"arch": m.arch, "size": m.size, "patch_size": m.patch_size,
                  "input": f"{m.image_size}x{m.image_size}x{m.in_channels}", "params": facts.params,
                  "largest_layer_params": facts.largest_layer, "hidden": facts.hidden, "depth": facts.depth,
                  "heads": facts.heads, "tokens_per_image": facts.tokens,
                  "blocks": {k: sum(b.kind == k for b in facts.blocks) for k in ("attn", "ssm", "mlp")}},
        # training ~ 3 forward passes (the backward costs two); checkpointing recomputes a fourth
        "flops": {"forward_per_image": fwd, "train_per_image": fwd and 3 * fwd,
                  "train_per_step": fwd and 3 * fwd * global_batch,
                  "train_per_step_with_recompute": fwd and (4 if t.activation_checkpointing else 3) * fwd * global_batch},
        "batch": {"micro_batch_per_rank": cfg.data.batch_size, "grad_accum_steps": t.grad_accum_steps,
                  "workers": world, "global": global_batch},
        "precision": precision, "zero_stage": t.zero_stage, "activation_checkpointing": t.activation_checkpointing,
        "memory_bytes": mem,
        "deepspeed_config": deepspeed_config(replace(cfg, train=replace(t, precision=precision)), world),
    }
    if device is not None:
        report["fit"] = fit(cfg, facts, world, device, mem["total"])
    return report


def fit(cfg: Config, facts: ModelFacts, world: int, device: float, need: int) -> dict:
    """Does `need` bytes per rank fit `device` GiB; if not, by how much, and which single change fits."""
    over = need / GIB - device
    out = {"device_gib": device, "need_gib": round(need / GIB, 2), "fits": over <= 0,
           "spare_gib" if over <= 0 else "over_gib": round(abs(over), 2)}
    if over > 0:
        out["suggestions"] = suggestions(cfg, facts, world, device)
    return out


def suggestions(cfg: Config, facts: ModelFacts, world: int, device: float) -> list[str]:
    """The single changes that make a run fit, each with its need per rank."""
    t = cfg.train
    total = lambda c, w=world: memory(c, facts, w)["total"] / GIB
    fits = lambda c, w=world: total(c, w) <= device
    out = []
    for stage in range(t.zero_stage + 1, 4):
        c = replace(cfg, train=replace(t, zero_stage=stage))
        if fits(c):
            out.append(f"train.zero_stage={stage} ({total(c):.1f} GiB)")
            break
    c = replace(cfg, train=replace(t, activation_checkpointing=True))
    if not t.activation_checkpointing and facts.checkpointable and fits(c):
        out.append(f"train.activation_checkpointing=true ({total(c):.1f} GiB)")
    more = next((w for w in (world * 2**i for i in range(1, 11)) if fits(cfg, w)), None)
    if more:
        out.append(f"--workers {more} ({total(cfg, more):.1f} GiB)")
    # a smaller micro-batch with more accumulation: divisors of the samples per rank keep the global batch
    per_rank = cfg.data.batch_size * t.grad_accum_steps
    smaller = next((b for b in range(cfg.data.batch_size - 1, 0, -1)
                    if per_rank % b == 0 and fits(replace(cfg, data=replace(cfg.data, batch_size=b)))), None)
    if smaller:
        c = replace(cfg, data=replace(cfg.data, batch_size=smaller))
        out.append(f"data.batch_size={smaller} train.grad_accum_steps={per_rank // smaller} ({total(c):.1f} GiB)")
    if not out and WORKSPACE_GIB >= device:
        return [f"nothing: the device is smaller than the fixed workspace margin ({WORKSPACE_GIB:g} GiB)"]
    return out or ["no single change: combine them, or offload (train.offload_optimizer, train.offload_params)"]


def is_pipeline_file(path: str | Path) -> bool:
    """A pipeline file lists stages; a training config never has that key."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False  # load_config then names the problem
    return isinstance(doc, dict) and "stages" in doc


def plan(path: str | Path, overrides: list[str] | tuple[str, ...] = (), workers: int | None = None,
         device: float | None = None) -> dict:
    """The plan of a training config or of every stage of a pipeline file (decided by its keys)."""
    if not is_pipeline_file(path):
        from dtrain.train.stages import check_stage

        cfg = load_config(path, overrides)
        check_stage(cfg)
        return {"config": str(path), **plan_config(cfg, workers, device)}
    from dtrain.train.pipeline import load_pipeline, stage_config
    from dtrain.train.stages import STAGES, PipelineStep

    p = load_pipeline(path, list(overrides))  # every stage checked by its kind, as `dtrain pipeline` does
    stages = []
    for i, spec in enumerate(p.stages):
        dry = PipelineStep(spec, parent="previous-stage" if i else None, root=p.root, pipeline=p.name, dry=True)
        cfg = stage_config(p, spec, STAGES[spec.kind].prelude(dry))
        stages.append({"name": spec.name, "parent": spec.parent or (p.stages[i - 1].name if i else None),
                       **plan_config(cfg, workers, device)})
    return {"pipeline": p.name, "file": str(path), "config": p.config, "stages": stages}


def refusal(report: dict) -> str | None:
    """Why the plan cannot run on its device (the first stage that does not fit), or None."""
    for st in report.get("stages", [report]):
        f = st.get("fit")
        if f and not f["fits"]:
            where = f"stage '{st['name']}': " if "name" in st else ""
            return (f"{where}needs {f['need_gib']:.1f} GiB per rank, {f['over_gib']:.1f} GiB over the device's "
                    f"{f['device_gib']:g} GiB; would fit with: {'; or '.join(f['suggestions'])}")
    return None


# ---- text ------------------------------------------------------------------------------------------

def _g(b: int | None) -> str:
    return "-" if b is None else f"{b / GIB:.2f} GiB"


def _flops(f: int | None) -> str:
    if f is None:
        return "not counted (the meta device cannot run this backbone)"
    return next(f"{f / 10**e:.1f} {u}FLOPs" for e, u in ((15, "P"), (12, "T"), (9, "G"), (6, "M"), (0, ""))
                if f >= 10**e or e == 0)


def render_config(r: dict, deepspeed: bool = True) -> list[str]:
    m, f, b, mem = r["model"], r["flops"], r["batch"], r["memory_bytes"]
    ds_state = mem["model_states_deepspeed"]
    paper = f"ZeRO paper {_g(mem['model_states_zero_paper'])}"
    lines = [
        f"model        {m['arch']}-{m['size']}/{m['patch_size']} on {m['input']}: {m['params'] / 1e6:.1f}M parameters, "
        f"hidden {m['hidden']}, depth {m['depth']}, heads {m['heads']}, {m['tokens_per_image']} tokens per image",
        f"stage        {r['stage']}",
        f"compute      forward {_flops(f['forward_per_image'])} per image; training (3x forward) "
        f"{_flops(f['train_per_image'])} per image, {_flops(f['train_per_step'])} per step"
        + (f" ({_flops(f['train_per_step_with_recompute'])} with recompute)" if r["activation_checkpointing"] else ""),
        f"batch        {b['micro_batch_per_rank']} per rank x {b['grad_accum_steps']} accumulation x {b['workers']} "
        f"workers = {b['global']} per step",
        f"precision    {r['precision']}, ZeRO-{r['zero_stage']}",
        "memory per rank (estimates)",
        f"  model states   {_g(mem['model_states'])}  ("
        + (f"DeepSpeed's estimator; {paper})" if ds_state is not None else f"{paper}; DeepSpeed has no estimator here)"),
        f"  EMA (fp32)     {_g(mem['ema'])}",
    ]
    if mem["frozen_net_count"]:
        lines.append(f"  frozen nets    {_g(mem['frozen_nets'])}  ({', '.join(['teacher', 'target'][:mem['frozen_net_count']])})")
    on = r["activation_checkpointing"]
    other = mem["activations_without_checkpointing" if on else "activations_with_checkpointing"]
    lines += [
        f"  activations    {_g(mem['activations'])}  (checkpointing {'on' if on else 'off'}; "
        f"{'without' if on else 'with'} it: {_g(other)})",
        f"  workspace      {_g(mem['workspace'])}",
        f"  total          {_g(mem['total'])}",
    ]
    if "fit" in r:
        ft = r["fit"]
        lines.append(f"fit          {ft['need_gib']:.1f} of {ft['device_gib']:g} GiB: "
                     + (f"fits, {ft['spare_gib']:.1f} GiB spare" if ft["fits"] else
                        f"DOES NOT FIT, {ft['over_gib']:.1f} GiB over; would fit with: {'; or '.join(ft['suggestions'])}"))
    if deepspeed:
        lines.append("deepspeed    " + json.dumps(r["deepspeed_config"], indent=2).replace("\n", "\n             "))
    return lines


def render(report: dict) -> str:
    if "stages" not in report:
        return "\n".join([f"plan of {report['config']}", *render_config(report)])
    lines = [f"plan of pipeline {report['pipeline']} ({report['file']}, experiment config {report['config']})",
             "stages       " + " -> ".join(s["name"] for s in report["stages"])]
    for i, st in enumerate(report["stages"], 1):
        lines += ["", f"[{i}] {st['name']} ({st['stage']})" + (f", from {st['parent']}" if st["parent"] else ""),
                  *("  " + line for line in render_config(st, deepspeed=False))]
    first = report["stages"][0]["deepspeed_config"]
    lines += ["", f"deepspeed config of stage {report['stages'][0]['name']}:", json.dumps(first, indent=2)]
    for st in report["stages"][1:]:  # most stages share it; print only those whose overrides change it
        if st["deepspeed_config"] != first:
            lines += [f"deepspeed config of stage {st['name']}:", json.dumps(st["deepspeed_config"], indent=2)]
    return "\n".join(lines)

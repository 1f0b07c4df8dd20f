"""EMA of the weights, kept in fp32 on the slice of each parameter that this rank owns.

What it averages: the fp32 master weights where DeepSpeed keeps them (given the engine, when the
module trains in bf16/fp16), else the module's own parameters (fp32 training: they are the masters).
Averaging the bf16 module copy instead would lose every update smaller than its rounding step.

Where the slices come from, per parameter:
  - ZeRO-3: this rank's partition, `param.ds_tensor` in fp32 training, else its fp32 master
    partition (`deepspeed.utils.safe_get_local_fp32_param`, the same layout as `ds_tensor`).
  - ZeRO 1/2 in bf16/fp16: the fragment of the parameter that lies in this rank's fp32 optimizer
    partition (`param._hp_mapping`: `hp_fragment` at `lp_fragment_address`; possibly empty).
  - ZeRO-0 in bf16/fp16: DeepSpeed's fp32 copy of the whole parameter (FP16 optimizers' groups).
  - otherwise (fp32 ZeRO 0-2, frozen parameters): the module's parameter, whole.
So the EMA is sharded like the master weights and never needs a collective during training; the
consolidated weights are gathered only when a checkpoint is written (`full_state_dict`).
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _stage0_masters(optimizer) -> dict[int, torch.Tensor]:
    """{id(module param): its fp32 copy} for DeepSpeed's non-ZeRO bf16/fp16 optimizers; {} otherwise."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    if isinstance(optimizer, FP16_UnfusedOptimizer):  # one fp32 tensor per parameter
        hp = optimizer.fp32_groups
    elif isinstance(optimizer, FP16_Optimizer):  # one flat fp32 buffer per group (unflattened into views)
        from torch._utils import _unflatten_dense_tensors

        hp = [_unflatten_dense_tensors(flat, g) for flat, g in zip(optimizer.fp32_groups_flat, optimizer.fp16_groups)]
    else:
        return {}
    return {id(p): h for g, hg in zip(optimizer.fp16_groups, hp) for p, h in zip(g, hg)}


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, engine=None):
        """`engine`: the DeepSpeed engine training `module`; given it, the EMA follows DeepSpeed's fp32
        master weights where the module's parameters are low precision."""
        self.decay = decay
        self.named = list(module.named_parameters())
        self.optimizer = engine.optimizer if engine is not None and any(
            p.dtype != torch.float32 for _, p in self.named) else None
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        # per parameter: how it is held here ("z3" partition, "frag" fragment, "full") and where this
        # rank's slice lies in the flattened parameter (for ZeRO-3, padded to world x partition size):
        # start, length, padded size
        self.layout = []
        for _, p in self.named:
            if hasattr(p, "ds_tensor"):
                n = p.ds_tensor.numel()  # the last partitions end in padding (uninitialised in the masters)
                self.layout.append(("z3", rank * n, max(0, min(n, p.ds_numel - rank * n)), n * world))
            elif self._follows_master(p) and hasattr(p, "_hp_mapping"):
                a = p._hp_mapping.lp_fragment_address if p._hp_mapping is not None else None
                self.layout.append(("frag", a.start if a else 0, a.numel if a else 0, p.numel()))
            else:
                self.layout.append(("full", 0, p.numel(), p.numel()))
        self.sharded = any(kind != "full" for kind, *_ in self.layout)  # consolidating is a collective
        self.shadow = [s.detach().float().clone() for s in self._sources()]
        self.device = engine.device if engine is not None else self.shadow[0].device  # for the collective

    def _follows_master(self, p: torch.Tensor) -> bool:
        return self.optimizer is not None and p.requires_grad

    def _sources(self) -> list[torch.Tensor]:
        """This rank's slice of every parameter, flat: what the EMA averages. Looked up afresh on each
        call, since loading a checkpoint may re-link DeepSpeed's fp32 partitions."""
        stage0 = self.optimizer is not None and any(kind == "full" for kind, *_ in self.layout)
        masters = _stage0_masters(self.optimizer) if stage0 else {}
        out = []
        for (_, p), (kind, start, n, _) in zip(self.named, self.layout):
            if kind == "z3":
                if self._follows_master(p):
                    from deepspeed.utils import safe_get_local_fp32_param

                    src = safe_get_local_fp32_param(p)
                else:
                    src = p.ds_tensor
                src = src.reshape(-1)[:n]  # without the padding
            elif kind == "frag":
                m = p._hp_mapping
                if m is None:
                    src = p.new_empty(0, dtype=torch.float32)
                else:
                    a = m.lp_fragment_address
                    assert (a.start, a.numel) == (start, n), "DeepSpeed re-partitioned the fp32 weights"
                    src = m.hp_fragment
            else:
                src = masters.get(id(p), p.data) if self._follows_master(p) else p.data
            out.append(src.reshape(-1))
        return out

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Warm-up of the decay (as in timm's ModelEmaV2 / Karras' EMA ramp): early weights fade fast.
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [s.float() for s in self._sources()], 1 - d)

    def _full_shape(self, p: torch.Tensor) -> torch.Size:
        return p.ds_shape if hasattr(p, "ds_tensor") else p.shape

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated EMA weights {name: tensor}. A collective when sharded (ZeRO-3, and ZeRO 1/2 in
        bf16/fp16): call on every rank."""
        if not self.sharded:
            return {n: s.view(p.shape).clone() for (n, p), s in zip(self.named, self.shadow)}
        # each rank writes its slices into a zeroed buffer of all the (padded) parameters and the
        # buffers are summed: the slices are disjoint and cover every element, so the sum is exact
        parts = [(i, total) for i, (kind, _, _, total) in enumerate(self.layout) if kind != "full"]
        flat = torch.zeros(sum(total for _, total in parts), dtype=torch.float32, device=self.device)
        offsets, offset = {}, 0
        for i, total in parts:
            _, start, n, _ = self.layout[i]
            flat[offset + start: offset + start + n] = self.shadow[i].to(self.device)
            offsets[i], offset = offset, offset + total
        dist.all_reduce(flat)
        out = {}
        for i, ((name, p), s) in enumerate(zip(self.named, self.shadow)):
            shape = self._full_shape(p)
            full = flat[offsets[i]: offsets[i] + shape.numel()] if i in offsets else s
            out[name] = full.view(shape).clone()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's slice of consolidated weights: resuming works at any worker count."""
        for (name, _), (_, start, n, total), s in zip(self.named, self.layout, self.shadow):
            full = state[name].float().reshape(-1).to(s.device)
            full = torch.nn.functional.pad(full, (0, total - full.numel()))
            s.copy_(full[start: start + n])

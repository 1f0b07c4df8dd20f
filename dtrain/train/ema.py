"""EMA of the weights, kept in fp32 on the slice of each parameter that this rank owns.

Under ZeRO-3 a rank holds only its partition of every parameter (`param.ds_tensor`), so the EMA is
sharded the same way and never needs the full model on one rank during training; it is gathered
only when a checkpoint is written. Under ZeRO 0-2 every rank holds the full parameters and the EMA
is the same on all of them.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.named = list(module.named_parameters())
        self.sharded = any(hasattr(p, "ds_tensor") for _, p in self.named)
        self.shadow = [_local(p).detach().float().clone().view(-1 if self.sharded else p.shape) for _, p in self.named]

    @torch.no_grad()
    def update(self, step: int) -> None:
        # Warm-up of the decay (as in timm's ModelEmaV2 / Karras' EMA ramp): early weights fade fast.
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [_local(p).float().view_as(s) for (_, p), s in zip(self.named, self.shadow)], 1 - d)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated EMA weights {name: tensor}. A collective under ZeRO-3: call on every rank."""
        if not self.sharded:
            return {n: s.clone() for (n, _), s in zip(self.named, self.shadow)}
        world = dist.get_world_size()
        flat = torch.cat(self.shadow)
        parts = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(parts, flat)
        out, offset = {}, 0
        for (name, p), s in zip(self.named, self.shadow):
            # partition r of a parameter is flat[r * n : (r + 1) * n], zero-padded at the end
            full = torch.cat([part[offset: offset + s.numel()] for part in parts])
            out[name] = full[: p.ds_numel].view(p.ds_shape).clone()
            offset += s.numel()
        return out

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Take this rank's slice of consolidated weights: resuming works at any worker count."""
        rank = dist.get_rank() if self.sharded else 0
        for (name, p), s in zip(self.named, self.shadow):
            full = state[name].float().reshape(-1)
            if self.sharded:
                n = s.numel()
                full = torch.nn.functional.pad(full, (0, n * math.ceil(full.numel() / n) - full.numel()))
                s.copy_(full[rank * n: (rank + 1) * n])
            else:
                s.copy_(full.view_as(s))

"""`dtrain bench objectives`: the cost of one training step (loss, backward, AdamW step) of the same model
under each objective, against flow matching: MeanFlow with its JVP forward-mode, by double backward and
by central differences (ZeRO-3's way),
and consistency distillation (a frozen teacher's Heun step and a target network beside the student).
Plain PyTorch on this process's threads, so the objectives are compared, not the engine."""
from __future__ import annotations

import copy
import statistics
import time
from dataclasses import replace

import torch

from dtrain.config import load_config
from dtrain.diffusion.consistency import ConsistencyDistillation
from dtrain.diffusion.flow import RectifiedFlowLoss
from dtrain.diffusion.meanflow import MeanFlowLoss
from dtrain.models import build_model


def _step_ms(net: torch.nn.Module, loss_fn, batch: dict, steps: int, warmup: int) -> float:
    """Median milliseconds of a training step, after `warmup` untimed ones."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    model_fn = lambda x, t, c, s=None: net(x, t, c) if s is None else net(x, t, c, s)  # noqa: E731
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss_fn(model_fn, batch).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def run(config: str = "configs/quickstart.yaml", overrides: tuple[str, ...] = (), steps: int = 20,
        warmup: int = 3) -> tuple[list[dict], dict]:
    cfg = load_config(config, list(overrides))
    m, batch_size = cfg.model, cfg.data.batch_size
    torch.manual_seed(0)
    shape = (batch_size, m.in_channels, m.image_size, m.image_size)
    batch = {"x": torch.randn(shape), "cond": torch.randint(0, m.num_classes, (batch_size,))}
    velocity = build_model(m).train()
    flow_map = build_model(replace(m, flow_map=True)).train()
    frozen = copy.deepcopy(velocity).eval().requires_grad_(False)
    frozen_fn = lambda x, t, c: frozen(x, t, c)  # noqa: E731
    cases = [("flow matching", "", velocity, RectifiedFlowLoss(cfg.objective.time_sampling)),
             ("mean flow", "forward", flow_map, MeanFlowLoss(cfg.objective.time_sampling, jvp="forward")),
             ("mean flow", "double_backward", flow_map, MeanFlowLoss(cfg.objective.time_sampling, jvp="double_backward")),
             ("mean flow", "finite_difference", flow_map,
              MeanFlowLoss(cfg.objective.time_sampling, jvp="finite_difference")),
             ("consistency distillation", "heun teacher", velocity,
              ConsistencyDistillation(frozen_fn, frozen_fn, m.num_classes, solver="heun"))]
    rows = []
    for name, how, net, loss_fn in cases:
        rows.append({"objective": name, "how": how, "ms_per_step": round(_step_ms(net, loss_fn, batch, steps, warmup), 1)})
    base = rows[0]["ms_per_step"]
    for r in rows:
        r["vs_flow_matching"] = round(r["ms_per_step"] / base, 2)
    summary = {"model": f"{m.arch}/{m.size}", "image_size": m.image_size, "batch": batch_size,
               "threads": torch.get_num_threads(), "target": "<= 2x flow matching (JVP included)"}
    return rows, summary

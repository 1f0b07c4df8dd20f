"""`dtrain detector train`: the detector trained with Ray Train (TorchTrainer, gloo, CPU workers) on real
shards (label 0) against generated shards (label 1), both through the same encoding.

Every worker reads the same images (small: thousands of 32x32 images) and, each epoch, takes its
rank's share of one permutation drawn from (seed, epoch), so the workers see disjoint batches; DDP
averages the gradients. The loss is the logistic loss with the generated class weighted by
n_real / n_generated, so an imbalance does not shift the decision. Rank 0's weights are saved
(`store.save_detector`). With `augment_copies` each image of both classes also enters in that many attacked
versions (`augment`: random JPEG, rescale, crop, blur, noise), so the detector does not hinge on detail
that an ordinary re-save or resize erases.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import ray.train
import torch
import torch.nn.functional as F
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from dtrain.data.shards import absolute_urls
from dtrain.detector.augment import augment
from dtrain.detector.data import check_shapes, load_generated, load_real, training_generators
from dtrain.detector.encoding import check_encoding, encode_all, to_input
from dtrain.detector.errors import DetectorError
from dtrain.detector.model import Detector, DetectorConfig
from dtrain.detector.store import save_detector
from dtrain.runtime import ensure_ray, pin_threads


def training_data(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(x [N, 3, H, W], y [N] float: 1 generated) from a train loop config, both classes encoded alike."""
    real = load_real(c["real"], c.get("real_limit"))
    generated = dict(load_generated(d, c.get("generated_limit")) for d in c["generated"])
    check_shapes(real, generated)
    copies, seed = c.get("augment", 0), c.get("seed", 0)
    if copies:  # both classes through the same augmentation: image i of either gets the same attacks
        real = np.concatenate([real, augment(real, copies, seed)])
        generated = {g: np.concatenate([v, augment(v, copies, seed)]) for g, v in generated.items()}
    enc = c["config"]["encoding"]
    x = to_input(np.concatenate([encode_all(real, enc)] + [encode_all(g, enc) for g in generated.values()]))
    y = torch.cat([torch.zeros(len(real)), torch.ones(sum(len(g) for g in generated.values()))])
    return x, y


def train_worker(c: dict) -> dict | None:
    """One Ray Train worker; rank 0 returns the weights and the losses (`Result.return_value`)."""
    pin_threads(c.get("threads"))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    x, y = training_data(c)
    torch.manual_seed(c["seed"])  # the same initial weights on every rank (DDP broadcasts rank 0's anyway)
    net = Detector(DetectorConfig(**c["config"]))
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.Adam(model.parameters(), lr=c["lr"])
    pos_weight = torch.tensor((y == 0).sum().item() / max(1, (y == 1).sum().item()))
    per_rank = max(1, c["batch_size"] // world)
    losses, start = [], time.perf_counter()
    for epoch in range(c["epochs"]):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(c["seed"] * 1000 + epoch))
        mine = order[: len(order) // world * world][rank::world]
        steps, total = max(1, len(mine) // per_rank), 0.0
        for k in range(steps):  # every rank takes the same number of steps: DDP's all-reduce pairs them
            idx = mine[k * per_rank:(k + 1) * per_rank]
            loss = F.binary_cross_entropy_with_logits(model(x[idx]), y[idx], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
        losses.append(total / steps)
    if rank != 0:
        return None
    # numpy, not tensors: Ray Train refuses to return tensors from the training function
    return {"state": {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}, "losses": losses,
            "seconds": time.perf_counter() - start, "n": len(x), "n_generated": int(y.sum().item()), "world": world}


def fit(real: str, generated: list[str], out: str | Path, config: DetectorConfig = DetectorConfig(), epochs: int = 5,
        batch_size: int = 64, lr: float = 3e-3, workers: int = 2, real_limit: int | None = None,
        generated_limit: int | None = None, held_out: list[str] = (), seed: int = 0, address: str | None = None,
        cpus_per_worker: float = 1, augment_copies: int = 0, log: Callable[[str], None] = print) -> dict:
    """Train and save the detector at `out`; returns {version, path, train_generators, losses, seconds, ...}."""
    config.check()
    check_encoding(config.encoding)
    if min(epochs, batch_size, workers) < 1 or lr <= 0 or augment_copies < 0:
        raise DetectorError("epochs, batch_size and workers must be >= 1, lr > 0 and augment_copies >= 0")
    names = training_generators(generated, list(held_out))
    # before Ray starts: shards that are missing, hold no images or differ in size fail here, in one line
    check_shapes(load_real(real, 1), dict(load_generated(d, 1) for d in generated))
    c = {"real": absolute_urls(real), "real_limit": real_limit, "generated": [str(Path(d).resolve()) for d in generated],
         "generated_limit": generated_limit, "config": asdict(config), "epochs": epochs, "batch_size": batch_size,
         "lr": lr, "seed": seed, "threads": cpus_per_worker, "augment": augment_copies}
    ensure_ray(address, workers * cpus_per_worker)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as storage:
        from dtrain.train.driver import LocalTorchTrainer

        trainer = (TorchTrainer if address else LocalTorchTrainer)(
            train_worker, train_loop_config=c, torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus_per_worker}),
            run_config=RunConfig(name="detector", storage_path=storage))
        r = trainer.fit().return_value
    wall = time.perf_counter() - start
    trained = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "workers": r["world"], "seed": seed,
               "augment_copies": augment_copies, "n": r["n"],
               "n_generated": r["n_generated"], "losses": [round(v, 5) for v in r["losses"]],
               "train_seconds": round(r["seconds"], 2), "wall_seconds": round(wall, 2), "real": real,
               "held_out": list(held_out)}
    v = save_detector(out, {k: torch.tensor(a) for k, a in r["state"].items()}, config, names, trained)
    log(f"detector {v}: {r['n'] - r['n_generated']} real vs {r['n_generated']} generated ({', '.join(names)}), "
        f"{epochs} epochs on {r['world']} workers in {r['seconds']:.1f} s, loss {r['losses'][0]:.3f} -> "
        f"{r['losses'][-1]:.3f}; saved {out}")
    return {"version": v, "path": str(out), "train_generators": names, **trained}

"""Evaluate a digits checkpoint: Frechet distance, class accuracy and straightness against the
number of network evaluations, beside the reference figures that say what a good value is.

For each sampler and step count the same class-balanced labels and the same seeds are sampled with
`render` (common random numbers: rows differ by their step count alone; an image depends on its
seed alone, so any batching or split over workers gives the same images). Figures per row:

- fd: squared Frechet distance (`dtrain.eval.frechet`) between feature statistics of the samples
  and of reference half A of the real validation images.
- class_acc: fraction of samples the digits classifier assigns to the class they were asked for.
- straightness: Liu et al. 2022 ("Flow straight and fast", eq. 4 / Def. 3.2),
      S = int_0^1 E ||(x_1 - x_0) - dx_t/dt||^2 dt,
  evaluated on the piecewise-linear path the Euler sampler itself takes (t = 0 noise, 1 data):
  with times t_0 = 0 < ... < t_K = 1, states x_k and step velocities v_k = (x_{k+1} - x_k) / dt_k
  (the guided velocity each step used),
      S = sum_k dt_k * mean_pixels ||(x_K - x_0) - v_k||^2,
  averaged over images. It is the time-weighted variance of the step velocities: 0 for a straight,
  constant-speed path (so 0 by construction at 1 step), and per pixel so image sizes compare.
  Measured on Euler rows only (other samplers' rows leave it empty: it describes the model's ODE).

Reference figures: the real validation images split class by class into halves A and B;
noise_floor_fd = FD(B, A), what real data scores at (about) the same sample count (FD is biased
upwards at small N); real_class_acc = classifier accuracy on all real validation images;
real_seen_by_classifier = fraction of them the classifier was trained on (0 keeps real_class_acc
honest). Generated images are rounded to uint8 levels first, as the real shards were.
"""
from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Callable

import numpy as np
import ray
import torch
from torch import nn

from dtrain.checkpoint import load_model, read_meta, resolve
from dtrain.eval import eval_seeds
from dtrain.data.shards import load_images
from dtrain.eval.features import DigitsClassifier, FeatureNet, accuracy, digits_classifier
from dtrain.eval.features import feature_net as named_feature_net
from dtrain.eval.frechet import frechet_distance, gaussian_stats
from dtrain.diffusion.samplers import nfe
from dtrain.generation import image_shape, latent_vae, render

DEFAULT_STEPS = (1, 2, 4, 8, 16, 50)


class _StateProbe(nn.Module):
    """Wraps the net and records the ODE state and time of every call, so `render` stays the one
    sampling path and the trajectory comes for free (no extra network evaluations)."""

    def __init__(self, net: nn.Module, batch: int):
        super().__init__()
        self.net, self.batch = net, batch
        self.states: list[torch.Tensor] = []
        self.times: list[float] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        self.states.append(x[: self.batch].detach().float().cpu())  # with CFG x is [x; x]: keep one copy
        self.times.append(float(t[0]))
        return self.net(x, t, cond)


def straightness(path: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    """S per image (module docstring) of a piecewise-linear path: states path [K+1, B, ...] at
    times [K+1] from 0 to 1 -> [B]."""
    dt = times.diff().to(path)  # [K]
    v = path.diff(dim=0) / dt.view(-1, *[1] * (path.ndim - 1))  # [K, B, ...] velocity of each step
    dev = ((path[-1] - path[0]) - v) ** 2  # [K, B, ...]
    return (dt[:, None] * dev.flatten(2).mean(2)).sum(0)  # [B]


def generate_for_eval(net: nn.Module, cfg, meta: dict, labels: torch.Tensor, seeds: list[int], steps: int,
                      guidance: float, sampler: str = "euler", watermark=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images [B, C, H, W] in about [-1, 1], straightness [B], None for other samplers than Euler)
    from `render` in fp32.

    An image depends only on its label, seed, steps and guidance, so batches can run anywhere (Ray
    tasks) and be concatenated. `net` must be a float32 pixel-space model (as load_model returns)."""
    if latent_vae(meta) is not None:
        raise ValueError("straightness needs the ODE's final state, which render decodes for a latent checkpoint: "
                         "evaluate a pixel-space checkpoint")
    if sampler != "euler":
        return render(net, cfg, meta, labels, seeds, steps, guidance, "fp32", sampler, watermark), None
    probe = _StateProbe(net, len(labels))
    x = render(probe, cfg, meta, labels, seeds, steps, guidance, "fp32", watermark=watermark)
    times = torch.tensor(probe.times + [1.0], dtype=torch.float64)
    if len(probe.states) != steps or probe.times[0] != 0.0 or not (times.diff() > 0).all():
        raise RuntimeError(f"render made {len(probe.states)} network calls at t={probe.times} for {steps} steps: "
                           "straightness assumes one call per Euler step from t=0 to t=1 (is the net float32?)")
    path = torch.stack(probe.states + [x.float()])  # [steps + 1, B, C, H, W]
    return x, straightness(path, times).float()


def as_stored(x: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels of a uint8 PNG and back, exactly as real shard images are read
    (`to_uint8`, then uint8 / 127.5 - 1), so generated and real images are quantised alike."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def class_halves(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of two class-balanced halves of a labelled set: per class, alternate images."""
    a, b = [], []
    for c in torch.unique(y):
        idx = (y == c).nonzero().flatten()
        a.append(idx[0::2])
        b.append(idx[1::2])
    return torch.cat(a), torch.cat(b)


def eval_batch(num_classes: int, samples_per_class: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Class-balanced labels [n] and their seeds (`eval_seeds`)."""
    labels = torch.arange(num_classes).repeat_interleave(samples_per_class)
    return labels, eval_seeds(len(labels), seed)


def evaluate_checkpoint(ckpt: str | Path, steps_list=DEFAULT_STEPS, samples_per_class: int | None = None,
                        val_shards: str | None = None, seed: int = 0, guidance: float | None = None,
                        feature_net: str | FeatureNet = "digits", classifier: DigitsClassifier | None = None,
                        batch_size: int = 500, log: Callable[[str], None] | None = None,
                        samplers=("euler",), use_ray: bool | None = None, watermark=None) -> dict:
    """FD, class accuracy and straightness for each sampler in `samplers` and step count in `steps_list`
    (module docstring). Sampling runs as Ray tasks over the cluster (one per chunk of `batch_size`
    images) when Ray is initialised, in this process otherwise (`use_ray` forces either); the chunks
    are fixed, so the figures are the same either way and for any worker count.

    samples_per_class: generated images per class (default: as many as reference half B holds per
    class, so FD and the noise floor see the same sample count). val_shards: the real images
    (default: the checkpoint's cfg.data.val_shards). guidance: CFG scale (default: cfg.sample.guidance).
    feature_net: a FeatureNet or a registry name ("digits", "inception") for the FD features;
    classifier: the digits classifier for class accuracy (default: the cached one for this size).
    watermark: a dtrain.watermark.WatermarkKey the samples are made with (its quality cost).
    Returns a JSON-ready dict: reference figures and `rows` (one per step count)."""
    (_, cfg), meta = _cached_model(str(resolve(ckpt)))  # the chunks sampled in this process reuse it
    m = cfg.model
    g = float(cfg.sample.guidance if guidance is None else guidance)
    shards = val_shards or cfg.data.val_shards
    shape = image_shape(cfg, meta)
    if latent_vae(meta) is not None or shape[0] != 1 or m.num_classes != 10:
        raise ValueError(f"digits evaluation needs a pixel-space 10-class grayscale checkpoint; this one makes "
                         f"{m.num_classes}-class images of shape {list(shape)}")
    real, real_y = load_images(shards)
    if tuple(real.shape[1:]) != shape:
        raise ValueError(f"validation shards {shards} hold images of shape {list(real.shape[1:])}, "
                         f"the checkpoint makes {list(shape)}: pass shards written at image_size={shape[-1]}")
    clf = classifier or digits_classifier(shape[-1])
    fnet = clf if feature_net == "digits" else (named_feature_net(feature_net, shape[-1])
                                                if isinstance(feature_net, str) else feature_net)

    # reference statistics from half A; half B gives the noise floor
    idx_a, idx_b = class_halves(real_y)
    per_class_b = int(torch.bincount(real_y[idx_b], minlength=10).min())
    if per_class_b < 1:
        raise ValueError(f"{shards} needs at least 2 validation images of every class (has "
                         f"{torch.bincount(real_y, minlength=10).tolist()})")
    spc = samples_per_class or per_class_b
    ref = gaussian_stats(fnet.features(real[idx_a]))
    result = {
        "checkpoint": str(resolve(ckpt)), "step": meta.get("step"), "val_shards": shards, "seed": seed,
        "guidance": g, "samplers": list(samplers), "feature_net": fnet.name, "classifier": clf.name,
        "classifier_val_acc": clf.val_acc, "n_ref": len(idx_a), "n_floor": len(idx_b), "n_samples": spc * 10,
        "noise_floor_fd": frechet_distance(*gaussian_stats(fnet.features(real[idx_b])), *ref),
        "real_class_acc": accuracy(clf.logits(real), real_y),
        "real_seen_by_classifier": float(np.mean([bytes(u.numpy().tobytes()) in clf.train_images for u in
                                                  ((real + 1) * 127.5).round().to(torch.uint8)])),
        "rows": [],
    }
    labels, seeds = eval_batch(m.num_classes, spc, seed)
    rows = [(sampler, steps) for sampler in samplers for steps in steps_list]
    chunks = [(sampler, steps, i) for sampler, steps in rows for i in range(0, len(labels), batch_size)]
    args = [(str(resolve(ckpt)), labels[i:i + batch_size], seeds[i:i + batch_size], steps, g, sampler, watermark)
            for sampler, steps, i in chunks]
    start = time.perf_counter()
    if ray.is_initialized() if use_ray is None else use_ray:
        from dtrain.runtime import run_tasks

        parts = run_tasks(_eval_chunk, args, desc="eval sampling")
    else:
        parts = [_eval_chunk(*a) for a in args]
    seconds = round(time.perf_counter() - start, 2)
    for sampler, steps in rows:
        mine = [p for c, p in zip(chunks, parts) if c[:2] == (sampler, steps)]
        x = as_stored(torch.cat([p[0] for p in mine]))
        s = None if mine[0][1] is None else float(torch.cat([p[1] for p in mine]).mean())
        row = {"sampler": sampler, "steps": steps, "nfe": nfe(sampler, steps, g), "guidance": g,
               "fd": frechet_distance(*gaussian_stats(fnet.features(x)), *ref),
               "class_acc": accuracy(clf.logits(x), labels), "straightness": s, "n_samples": len(labels)}
        result["rows"].append(row)
        if log:
            log(f"{sampler:11} steps {steps:3d}  nfe {row['nfe']:3d}  fd {row['fd']:.3f}  class_acc "
                f"{row['class_acc']:.3f}  straightness {_opt(s)}")
    result["sampling_seconds"] = seconds
    return result


@functools.lru_cache(maxsize=2)
def _cached_model(ckpt: str):
    return load_model(ckpt), read_meta(ckpt)  # once per process: a Ray worker runs many chunks


def _eval_chunk(ckpt: str, labels: torch.Tensor, seeds: list[int], steps: int, guidance: float, sampler: str,
                watermark=None):
    """One chunk of evaluation samples (a Ray task, or a plain call without Ray)."""
    (net, cfg), meta = _cached_model(ckpt)
    return generate_for_eval(net, cfg, meta, labels, seeds, steps, guidance, sampler, watermark)


def _opt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def format_table(result: dict) -> str:
    """The rows and reference figures as a plain-text table."""
    lines = [f"{'sampler':11} {'steps':>5} {'nfe':>5} {'fd':>10} {'class_acc':>9} {'straightness':>12} {'n':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['sampler']:11} {r['steps']:5d} {r['nfe']:5d} {r['fd']:10.4f} {r['class_acc']:9.3f} "
                     f"{_opt(r['straightness']):>12} {r['n_samples']:6d}")
    lines.append(f"real vs real (noise floor): fd {result['noise_floor_fd']:.4f} "
                 f"(n {result['n_floor']} vs {result['n_ref']} reference)")
    lines.append(f"real class accuracy {result['real_class_acc']:.3f} (classifier {result['classifier']}, "
                 f"held-out accuracy {result['classifier_val_acc']:.3f}, "
                 f"{result['real_seen_by_classifier']:.0%} of the real images seen in its training)")
    return "\n".join(lines)


def plot_fd_vs_nfe(result: dict, path: str | Path, size: tuple[int, int] = (640, 420), title: str | None = None) -> Path:
    """A PNG line chart of FD against NFE (both axes log scale, x ticked at the measured NFEs), one line
    per series (a row's `series`, else its sampler: `dtrain pipeline` names its stages), the noise floor
    dashed. An FD of zero or below (possible by estimation noise) is drawn at 1e-6."""
    from dtrain.plots import line_chart

    series: dict[str, list[tuple[float, float]]] = {}
    for r in sorted(result["rows"], key=lambda r: r["nfe"]):
        series.setdefault(r.get("series") or r["sampler"], []).append((r["nfe"], max(r["fd"], 1e-6)))
    return line_chart(path, series, xlog=True, ylog=True, xticks=sorted({r["nfe"] for r in result["rows"]}),
                      hlines={"real vs real (floor)": max(result["noise_floor_fd"], 1e-6)}, size=size,
                      xlabel="network evaluations per image (NFE)", ylabel="FD",
                      title=title or f"FD ({result['feature_net']}) vs NFE, guidance {result['guidance']}, "
                                     f"n={result['n_samples']}")

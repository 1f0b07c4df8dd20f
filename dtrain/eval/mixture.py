"""`dtrain eval` on a checkpoint trained on a Gaussian mixture (`dtrain data gmm`): everything exact.

The mixture spec travels with the shards (`gmm.json` beside them), so the ground truth is found from
the checkpoint's own data config. Per sampler step count: component shares of unconditional samples
against the weights (mode dropping shows as a worst share/weight ratio near 0) and the samples' mean
log-likelihood under the true mixture against its negative entropy. Once per checkpoint: the relative
velocity error against the analytic field across t (the seeds' score-estimation error analysis), and
the model's ODE log-likelihood of held-out data against the true density.
"""
from __future__ import annotations

from pathlib import Path

import torch

from dtrain.checkpoint import CheckpointError, load_model, read_meta, resolve
from dtrain.data.gmm import SPEC_FILE, load_spec
from dtrain.data.shards import expand_urls, load_images
from dtrain.eval import eval_seeds
from dtrain.data.mixture import GaussianMixture
from dtrain.eval.gmm import coverage, likelihood_gap, ode_log_likelihood, velocity_error
from dtrain.diffusion.samplers import nfe
from dtrain.generation import render

TIMES = (0.1, 0.3, 0.5, 0.7, 0.9)


def mixture_spec(val_shards: str) -> Path | None:
    """The `gmm.json` written beside mixture shards, or None for other data."""
    path = Path(expand_urls(val_shards)[0]).parent / SPEC_FILE
    return path if path.is_file() else None


def evaluate_mixture_checkpoint(ckpt: str | Path, steps_list=(1, 2, 4, 8, 16, 50), n: int = 4000,
                                val_shards: str | None = None, seed: int = 0, n_likelihood: int = 500) -> dict:
    """Exact metrics of a mixture checkpoint (module docstring). Fixed seeds and counts: reruns agree."""
    net, cfg = load_model(ckpt)
    meta = read_meta(ckpt)
    shards = val_shards or cfg.data.val_shards
    spec = mixture_spec(shards)
    if spec is None:
        raise CheckpointError(f"no {SPEC_FILE} beside {shards}: not mixture shards from `dtrain data gmm`")
    if cfg.objective.name != "rectified_flow":  # the analytic field and the ODE likelihood are the linear path's
        raise CheckpointError(f"mixture metrics compare with the rectified-flow field; {resolve(ckpt)} was trained "
                              f"with objective {cfg.objective.name}")
    gmm: GaussianMixture = load_spec(spec)
    null = torch.full((n,), cfg.model.num_classes)  # unconditional samples: the learned p_1 itself
    seeds = eval_seeds(n, seed)
    rows = []
    with torch.no_grad():
        for steps in steps_list:
            x = render(net, cfg, meta, null, seeds, steps, guidance=1.0).reshape(n, -1)
            cov, gap = coverage(gmm, x), likelihood_gap(gmm, x, generator=torch.Generator().manual_seed(seed))
            rows.append({"sampler": "euler", "steps": steps, "nfe": nfe("euler", steps, 1.0), "tv": round(cov["tv"], 4),
                         "worst_ratio": round(cov["worst_ratio"], 3), "worst_component": cov["worst_component"],
                         "log_lik_gap": round(gap["gap"], 4), "n_samples": n})
        errors = {cond: velocity_error(net, gmm, TIMES, generator=torch.Generator().manual_seed(seed),
                                       conditional=cond) for cond in (False, True)}
    x_val, _ = load_images(shards, limit=n_likelihood)
    model_ll = ode_log_likelihood(net, x_val, torch.full((len(x_val),), cfg.model.num_classes), steps=50)
    return {"checkpoint": str(resolve(ckpt)), "step": meta.get("step"), "spec": str(spec), "rows": rows,
            "velocity_error": [{"t": t, "relative_uncond": round(errors[False]["relative"][i].item(), 4),
                                "relative_cond": round(errors[True]["relative"][i].item(), 4),
                                "mse_uncond": round(errors[False]["mse"][i].item(), 5)} for i, t in enumerate(TIMES)],
            "val_log_lik_model": model_ll.mean().item(),
            "val_log_lik_true": gmm.log_prob(x_val.reshape(len(x_val), -1)).mean().item(),
            "n_val": len(x_val), "weights": gmm.weights.tolist()}


def format_table(result: dict) -> str:
    lines = [f"{'sampler':8} {'steps':>5} {'nfe':>4} {'tv':>7} {'worst share/weight':>18} {'log-lik gap':>11}"]
    lines += [f"{r['sampler']:8} {r['steps']:>5} {r['nfe']:>4} {r['tv']:>7.4f} "
              f"{r['worst_ratio']:>12.3f} (k={r['worst_component']}) {r['log_lik_gap']:>11.4f}" for r in result["rows"]]
    lines.append(f"{'t':>5} {'rel. velocity error (uncond / cond)':>36}")
    lines += [f"{e['t']:>5} {e['relative_uncond']:>18.4f} / {e['relative_cond']:.4f}" for e in result["velocity_error"]]
    lines.append(f"held-out log-likelihood: model (ODE) {result['val_log_lik_model']:.4f}, "
                 f"true density {result['val_log_lik_true']:.4f} (n={result['n_val']}); samples per row: "
                 f"{result['rows'][0]['n_samples'] if result['rows'] else 0}")
    return "\n".join(lines)


def plot_velocity_error(result: dict, path: str | Path, size: tuple[int, int] = (640, 380)) -> Path:
    """A PNG of the relative velocity error against t (conditional and unconditional): where along the
    path the network's field departs from the mixture's analytic one."""
    from dtrain.plots import line_chart

    rows = result["velocity_error"]
    series = {name: [(r["t"], r[key]) for r in rows]
              for name, key in (("unconditional", "relative_uncond"), ("conditional", "relative_cond"))}
    return line_chart(path, series, xticks=sorted({0.0, 1.0, *(r["t"] for r in rows)}), size=size,
                      xlabel="t (0 noise, 1 data)", title="relative velocity error ||v_net - v_exact|| / ||v_exact||")

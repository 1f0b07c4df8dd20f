"""Evaluate every stage of a `dtrain pipeline` run with the same seeds, samplers and step counts.

Writes to `<storage>/<pipeline>-eval/`: `eval.json` (every stage's rows and lineage), a sample grid per
stage at its fewest and most steps, and per kind of data:

- digits: `fd_vs_nfe.png` (one line per stage and sampler) and each stage's bias audit;
- the shapes world (`dtrain data shapes`, class or text models): attribute, count and binding accuracy
  read back by the world's recogniser, held-out compositions apart, and FD with its floor and interval
  (`dtrain.eval.shapes`); `binding_vs_nfe.png` (binding accuracy, seen and held-out, and FD against NFE,
  one line per stage and sampler), the same as a table in the log and under `binding_vs_nfe` in eval.json;
  a text model's grids show evaluation prompts (the last rows held-out compositions) written beside them;
- Gaussian mixtures (`dtrain data gmm`): their exact metrics instead of FD.

Returns the same dict. Where `<storage>` is a URI, the files are written to a local cache directory first,
then uploaded. Each stage's figures also go to the W&B run that trained it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from dtrain.checkpoint import load_model, read_config, read_meta, read_tokenizer
from dtrain.config import PipelineConfig
from dtrain.data.captions import distinct_captions
from dtrain.eval.audit import audit_checkpoint, format_audit
from dtrain.eval.digits import evaluate_checkpoint, format_table, plot_fd_vs_nfe
from dtrain.eval.mixture import evaluate_mixture_checkpoint, mixture_spec
from dtrain.eval.mixture import format_table as mixture_table
from dtrain.eval.shapes import eval_prompts, evaluate_shapes_checkpoint, shapes_world
from dtrain.eval.shapes import format_table as shapes_table
from dtrain.generation import conditions, render
from dtrain.images import save_captioned_grid, save_grid
from dtrain.plots import Panel, panels
from dtrain.tracking import log_eval
from dtrain.storage import is_uri, local_run_dir, upload

N_PROMPTS = 400  # a text model's evaluation prompts on the shapes world (plus a quarter as many held-out ones)


def _grid_prompts(cfg, world: dict | None, n: int = 8) -> list[str]:
    """A text model's grid rows: on the shapes world its first evaluation prompts, the last two held-out
    compositions; else the first distinct captions of its validation shards."""
    if world is not None:
        return eval_prompts(n - 2, 2, world)[0]
    return distinct_captions(cfg.data.val_shards, n) or [""]


def _grids(ckpt: str, out: Path, stage: str, steps_list: list[int], sampler: str, per_class: int = 8) -> list[str]:
    net, cfg = load_model(ckpt)
    meta = read_meta(ckpt)
    text = cfg.model.conditioning == "text"
    if text:
        prompts = _grid_prompts(cfg, shapes_world(cfg.data.val_shards))
        cond = conditions(cfg, read_tokenizer(ckpt), [p for p in prompts for _ in range(per_class)])  # [B, L]
    else:
        cond = torch.arange(cfg.model.num_classes).repeat_interleave(per_class)  # [B]
    paths = []
    for steps in sorted({min(steps_list), max(steps_list)}):
        x = render(net, cfg, meta, cond, list(range(len(cond))), steps, cfg.sample.guidance, "fp32", sampler)
        path = out / f"{stage}-{sampler}-{steps}steps.png"
        save_captioned_grid(x, path, prompts, per_class) if text else save_grid(x, path, ncol=per_class)
        paths.append(str(path))
    return paths


def evaluate_pipeline(p: PipelineConfig, state: dict, log: Callable[[str], None] = print) -> dict:
    root = p.root  # resolved by dtrain.train.pipeline.load_pipeline
    out = local_run_dir(root, f"{p.name}-eval")
    e = p.eval
    guidance = None if e.guidance < 0 else e.guidance
    result: dict = {"pipeline": p.name, "stages": {}, "rows": []}
    for name, st in state["stages"].items():
        ckpt = st["checkpoint"]
        log(f"[dtrain] evaluating stage {name} ({ckpt})")
        cfg = read_config(ckpt)
        own = cfg.sample.sampler  # a stage's own sampler (a consistency student's) joins the list
        samplers = [*e.samplers, *([own] if own not in e.samplers else [])]
        world = shapes_world(cfg.data.val_shards)
        if mixture_spec(cfg.data.val_shards):
            r = evaluate_mixture_checkpoint(ckpt, e.steps)
            log(mixture_table(r))
        elif world is not None:  # the shapes world: read back by its recogniser, class or text models
            r = evaluate_shapes_checkpoint(ckpt, e.steps, samples_per_class=e.samples_per_class or 10,
                                           guidance=guidance, samplers=samplers,
                                           n_prompts=e.n_prompts or N_PROMPTS)
            log(shapes_table(r))
            shapes = result.setdefault("shapes", {k: r[k] for k in ("world", "recogniser", "n_samples", "n_heldout",
                                                                    "conditioning", "real")})
            shapes.setdefault("noise_floor_fd", r["rows"][0]["noise_floor_fd"])
            r["grids"] = _grids(ckpt, out, name, e.steps, e.samplers[0])
        elif cfg.model.conditioning == "text":  # no metric reads captioned images of other data: grids only
            log(f"[dtrain] stage {name}: a text model on data other than the shapes world has no metrics here; "
                "writing its sample grids only")
            r = {"checkpoint": ckpt, "rows": [], "grids": _grids(ckpt, out, name, e.steps, e.samplers[0])}
        else:
            r = evaluate_checkpoint(ckpt, e.steps, samples_per_class=e.samples_per_class or None,
                                    guidance=guidance, samplers=samplers)
            log(format_table(r))
            for k in ("noise_floor_fd", "n_samples", "feature_net", "guidance", "real_class_acc"):
                result.setdefault(k, r[k])
            r["grids"] = _grids(ckpt, out, name, e.steps, e.samplers[0])
            if e.audit:
                r["audit"] = audit_checkpoint(ckpt, steps=max(e.steps))
                log(format_audit(r["audit"]))
        for row in r["rows"]:
            row["stage"] = name
            row["series"] = name if len({q["sampler"] for q in r["rows"]}) == 1 else f"{name} {row['sampler']}"
            result["rows"].append(row)
        log_eval(ckpt, cfg, r, {Path(g).stem: Path(g) for g in r.get("grids", [])})
        meta = read_meta(ckpt)
        result["stages"][name] = {**{k: v for k, v in r.items() if k != "rows"}, "kind": st["kind"],
                                  "parent": meta.get("parent"), "teacher": meta.get("teacher")}
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "eval.json"]
    if "shapes" in result:
        result["binding_vs_nfe"] = binding_vs_nfe(result["rows"])
        log(binding_table(result["rows"]))
        written.append(plot_binding_vs_nfe(result, out / "binding_vs_nfe.png",
                                           title=f"pipeline {p.name}: binding accuracy vs NFE"))
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    if "noise_floor_fd" in result:
        written.append(plot_fd_vs_nfe(result, out / "fd_vs_nfe.png", title=f"pipeline {p.name}: FD vs NFE per stage"))
    log(f"wrote {', '.join(str(w) for w in written)} and sample grids in {out}")
    if is_uri(root):
        for f in sorted(out.iterdir()):
            upload(f, f"{root}/{p.name}-eval/{f.name}")
        log(f"uploaded them to {root}/{p.name}-eval/")
    return result


# ---------------------------------------------------------------------------------------------
# The shapes world: binding accuracy against NFE, one series per stage (and sampler)


def _shapes_rows(rows: list[dict]) -> list[dict]:
    """The shapes world's rows, series in the order of the stages, each series' rows by NFE."""
    rows = [r for r in rows if "binding_acc" in r]
    first: dict[str, int] = {}
    for i, r in enumerate(rows):
        first.setdefault(r.get("series") or r["sampler"], i)
    return sorted(rows, key=lambda r: (first[r.get("series") or r["sampler"]], r["nfe"]))


def binding_vs_nfe(rows: list[dict]) -> dict:
    """{series: {nfe: {steps, sampler, binding_acc, heldout_binding_acc, fd}}} of the shapes rows."""
    table: dict = {}
    for r in _shapes_rows(rows):
        table.setdefault(r.get("series") or r["sampler"], {})[str(r["nfe"])] = {
            "steps": r["steps"], "sampler": r["sampler"], "binding_acc": r["binding_acc"],
            "heldout_binding_acc": r["heldout"]["binding_acc"], "fd": r["fd"]}
    return table


def binding_table(rows: list[dict]) -> str:
    """Binding accuracy per series (rows) and NFE (columns), held-out compositions' in brackets."""
    table = binding_vs_nfe(rows)
    nfes = sorted({int(n) for v in table.values() for n in v})
    width = max([6, *map(len, table)])
    lines = ["binding accuracy against NFE per stage (held-out compositions in brackets)",
             f"{'NFE':{width}}" + "".join(f"{n:>15d}" for n in nfes)]
    for series, by in table.items():
        cells = [f"{by[str(n)]['binding_acc']:.3f} ({by[str(n)]['heldout_binding_acc']:.3f})" if str(n) in by
                 else "-" for n in nfes]
        lines.append(f"{series:{width}}" + "".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def plot_binding_vs_nfe(result: dict, path: str | Path, size: tuple[int, int] = (640, 760),
                        title: str | None = None) -> Path:
    """A PNG of three panels over NFE (log scale, ticked at the measured NFEs), one line per series (a
    row's `series`: a stage, and its sampler where it has several): binding accuracy on the evaluation
    prompts, with the recogniser's on real renders dashed (the ceiling: what it reads right); binding accuracy on held-out
    compositions; FD in the recogniser's features (log scale) with the noise floor dashed. An FD of zero
    or below (possible by estimation noise) is drawn at 1e-6."""
    rows = _shapes_rows(result["rows"])
    seen: dict[str, list[tuple[float, float]]] = {}
    held: dict[str, list[tuple[float, float]]] = {}
    fd: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        name = r.get("series") or r["sampler"]
        seen.setdefault(name, []).append((r["nfe"], r["binding_acc"]))
        held.setdefault(name, []).append((r["nfe"], r["heldout"]["binding_acc"]))
        fd.setdefault(name, []).append((r["nfe"], max(r["fd"], 1e-6)))
    info, real = result["shapes"], result["shapes"]["real"]["binding_acc"]
    # the ceiling's label is in the title: at the panel's top right it would cover the legend
    stack = [Panel(f"{title or 'binding accuracy vs NFE'}, n={info['n_samples']}; dashed: real renders ({real:.2f})",
                   seen, "binding acc", hlines={"": real}),
             Panel(f"held-out compositions, n={info['n_heldout']}", held, "binding acc"),
             Panel(f"FD ({info['recogniser']} features)", fd, "FD", ylog=True,
                   hlines={"real vs real (floor)": max(info["noise_floor_fd"], 1e-6)})]
    return panels(path, stack, xlabel="network evaluations per image (NFE)", xlog=True,
                  xticks=sorted({r["nfe"] for r in rows}), size=size)

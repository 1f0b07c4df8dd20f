"""Evaluate every stage of a `dtrain pipeline` run with the same seeds, samplers and step counts.

Writes to `<storage>/<pipeline>-eval/`: `eval.json` (every stage's rows and lineage), `fd_vs_nfe.png`
(one line per stage and sampler; digits data), a sample grid per stage at its fewest and most
steps and, for digits, each stage's bias audit; returns the same dict. Where `<storage>` is a URI,
they are written to a local cache directory first, then uploaded. Each stage's figures also go
to the W&B run that trained it. Mixture data (`dtrain data gmm`) gets its exact metrics instead of FD.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from dtrain.checkpoint import load_model, read_config, read_meta
from dtrain.config import PipelineConfig
from dtrain.eval.audit import audit_checkpoint, format_audit
from dtrain.eval.digits import evaluate_checkpoint, format_table, plot_fd_vs_nfe
from dtrain.eval.mixture import evaluate_mixture_checkpoint, mixture_spec
from dtrain.eval.mixture import format_table as mixture_table
from dtrain.generation import render
from dtrain.images import save_grid
from dtrain.tracking import log_eval
from dtrain.storage import is_uri, local_run_dir, upload


def _grids(ckpt: str, out: Path, stage: str, steps_list: list[int], sampler: str, per_class: int = 8) -> list[str]:
    net, cfg = load_model(ckpt)
    meta = read_meta(ckpt)
    labels = torch.arange(cfg.model.num_classes).repeat_interleave(per_class)
    paths = []
    for steps in sorted({min(steps_list), max(steps_list)}):
        x = render(net, cfg, meta, labels, list(range(len(labels))), steps, cfg.sample.guidance, "fp32", sampler)
        paths.append(str(save_grid(x, out / f"{stage}-{sampler}-{steps}steps.png", ncol=per_class)))
    return paths


def evaluate_pipeline(p: PipelineConfig, state: dict, log: Callable[[str], None] = print) -> dict:
    root = p.root  # resolved by dtrain.train.pipeline.load_pipeline
    out = local_run_dir(root, f"{p.name}-eval")
    e = p.eval
    result: dict = {"pipeline": p.name, "stages": {}, "rows": []}
    for name, st in state["stages"].items():
        ckpt = st["checkpoint"]
        log(f"[dtrain] evaluating stage {name} ({ckpt})")
        if mixture_spec(read_config(ckpt).data.val_shards):
            r = evaluate_mixture_checkpoint(ckpt, e.steps)
            log(mixture_table(r))
        else:
            own = read_config(ckpt).sample.sampler  # a stage's own sampler (a consistency student's) joins the list
            samplers = [*e.samplers, *([own] if own not in e.samplers else [])]
            r = evaluate_checkpoint(ckpt, e.steps, samples_per_class=e.samples_per_class or None,
                                    guidance=None if e.guidance < 0 else e.guidance, samplers=samplers)
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
        log_eval(ckpt, read_config(ckpt), r, {Path(g).stem: Path(g) for g in r.get("grids", [])})
        meta = read_meta(ckpt)
        result["stages"][name] = {**{k: v for k, v in r.items() if k != "rows"}, "kind": st["kind"],
                                  "parent": meta.get("parent"), "teacher": meta.get("teacher")}
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    if "noise_floor_fd" in result:
        plot = plot_fd_vs_nfe(result, out / "fd_vs_nfe.png", title=f"pipeline {p.name}: FD vs NFE per stage")
        log(f"wrote {out / 'eval.json'}, {plot} and sample grids in {out}")
    if is_uri(root):
        for f in sorted(out.iterdir()):
            upload(f, f"{root}/{p.name}-eval/{f.name}")
        log(f"uploaded them to {root}/{p.name}-eval/")
    return result

"""`dtrain detector eval`: per generator, the detector's AUC, AP and TPR at 1% FPR against real images it
did not train on, beside the training-free baselines', clean and after each attack.

The attacks are `dtrain bench watermark`'s (JPEG, a centred crop resized back, down- and up-scaling,
Gaussian blur, additive noise), applied to the uint8 pixels of both classes alike; then both go
through the detector's encoding, as in training. A generator is `held_out` when its name is not among
the detector's training generators. `margin` is the detector's AUC minus the best baseline's, per
generator and attack: what the learnt detector adds over a trivial score. With a reference checkpoint
the AEROBLADE-style reconstruction baseline (`aeroblade`) gets rows of its own.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

from dtrain.bench.watermark import ATTACKS, jpeg
from dtrain.detector.data import check_shapes, is_watermarked, load_generated, load_real
from dtrain.detector.encoding import encode_all
from dtrain.detector.errors import DetectorError
from dtrain.detector.metrics import BASELINES, figures
from dtrain.detector.store import load_detector, score

DETECTOR_ATTACKS: dict[str, Callable] = {
    "clean": ATTACKS["clean"],
    "jpeg_q75": jpeg(75),
    "jpeg_q50": ATTACKS["jpeg_q50"],
    "resize_0.5": ATTACKS["resize_0.5"],
    "crop_resize_0.75": ATTACKS["crop_resize_0.75"],
    "blur_r0.5": ATTACKS["blur_r0.5"],
    "noise_0.05": ATTACKS["noise_0.05"],
}


def attacked(images: np.ndarray, name: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([DETECTOR_ATTACKS[name](img, rng) for img in images])


def evaluate(detector: str, real: str, generated: list[str], attacks: tuple[str, ...] | None = None,
             limit: int | None = None, seed: int = 0, reference: str | None = None, depth: float = 0.25,
             log: Callable[[str], None] = print) -> tuple[list[dict], dict]:
    """(rows: one per generator, attack and scorer; a summary). `real`: real shards the detector did not
    train on; `generated`: directories of `dtrain detector generate`; `limit`: images per class;
    `reference`: a checkpoint whose ODE scores the AEROBLADE-style baseline (`aeroblade`, `depth` of the
    way back), a row of its own beside the trivial baselines (the margin is over those)."""
    unknown = sorted(set(attacks or ()) - set(DETECTOR_ATTACKS))
    if unknown:
        raise DetectorError(f"unknown attack {unknown[0]!r}: choose from {', '.join(DETECTOR_ATTACKS)}")
    if not generated:
        raise DetectorError("nothing to evaluate: give --generated DIR (repeatable)")
    net, meta = load_detector(detector)
    baselines = dict(BASELINES)
    if reference:
        from dtrain.detector.aeroblade import reference_scorer

        baselines["aeroblade"] = reference_scorer(reference, depth)
    enc, trained_on = meta["config"].encoding, set(meta["train_generators"])
    real_images = load_real(real, limit)
    gens = dict(load_generated(d, limit) for d in generated)
    marked = {load_generated(d, 1)[0] for d in generated if is_watermarked(d)}
    check_shapes(real_images, gens)
    rows, start = [], time.perf_counter()
    for a in [n for n in DETECTOR_ATTACKS if not attacks or n in attacks]:
        r = encode_all(attacked(real_images, a, seed), enc)
        real_scores = {"detector": score(net, r, encoded=True), **{b: f(r) for b, f in baselines.items()}}
        for g, images in gens.items():
            x = encode_all(attacked(images, a, seed + 1), enc)
            here = []
            for scorer, s_real in real_scores.items():
                s_gen = score(net, x, encoded=True) if scorer == "detector" else baselines[scorer](x)
                here.append({"generator": g, "held_out": g not in trained_on, "watermarked": g in marked,
                             "attack": a, "scorer": scorer,
                             **figures(s_real, s_gen), "n_real": len(r), "n_generated": len(x)})
            best = max(h["auc"] for h in here if h["scorer"] in BASELINES)  # the trivial ones
            for h in here:
                h["margin"] = here[0]["auc"] - best if h["scorer"] == "detector" else None
            rows += here
            d = here[0]
            log(f"{g:16} {'held-out' if d['held_out'] else 'in-dist':8} {a:17} AUC {d['auc']:.3f}  AP {d['ap']:.3f}  "
                f"TPR@1%FPR {d['tpr_at_1pct_fpr']:.3f}  best baseline AUC {best:.3f}  margin {d['margin']:+.3f}")
    summary = {"detector": str(detector), "version": meta["version"], "encoding": enc,
               "train_generators": sorted(trained_on), "real": real, "n_real": len(real_images),
               "aeroblade_reference": reference, "aeroblade_depth": depth if reference else None,
               "seconds": round(time.perf_counter() - start, 2)}
    return rows, summary

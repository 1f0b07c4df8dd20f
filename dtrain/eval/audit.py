"""Bias audit: which classes does the model draw when it is asked for none?

Samples with the null label (no class, guidance off) are classified by the project's digits
classifier, and their class distribution q is compared with the training distribution p (the labels of
the training shards): KL(q || p) in nats and Pearson's chi-square goodness-of-fit test of the counts
against n p (a small p-value: the model's unconditional class mix differs from the data's).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from scipy.stats import chisquare

from dtrain.checkpoint import load_model, read_meta, resolve
from dtrain.data.shards import load_images
from dtrain.eval import eval_seeds
from dtrain.eval.digits import as_stored
from dtrain.eval.features import DigitsClassifier, digits_classifier
from dtrain.generation import render


def audit_counts(counts: np.ndarray, reference: np.ndarray) -> dict:
    """Compare class counts [K] of n samples with reference probabilities [K] (summing to 1)."""
    counts, p = np.asarray(counts, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    n = counts.sum()
    q = counts / n
    eps = 0.5 / n  # add-half smoothing, so a dropped class gives a large but finite KL
    q_s = (counts + 0.5) / (n + 0.5 * len(counts))
    kl = float(np.sum(q_s * np.log(q_s / np.maximum(p, eps))))
    chi2, p_value = chisquare(counts, f_exp=p * n)
    return {"n": int(n), "shares": q.round(4).tolist(), "reference": p.round(4).tolist(), "kl_nats": round(kl, 5),
            "chi2": round(float(chi2), 3), "p_value": float(p_value),
            "most_over": int(np.argmax(q - p)), "most_under": int(np.argmin(q - p))}


def audit_checkpoint(ckpt: str | Path, n: int = 1000, steps: int = 16, seed: int = 0,
                     train_shards: str | None = None, classifier: DigitsClassifier | None = None) -> dict:
    """Null-label samples of a digits checkpoint, classified, against the training class distribution."""
    net, cfg = load_model(ckpt)
    meta = read_meta(ckpt)
    m = cfg.model
    if m.num_classes != 10 or m.in_channels != 1:
        raise ValueError(f"the audit classifies digits; this checkpoint makes {m.num_classes}-class "
                         f"{m.in_channels}-channel images")
    _, train_y = load_images(train_shards or cfg.data.train_shards)
    reference = np.bincount(train_y.numpy(), minlength=m.num_classes) / len(train_y)
    clf = classifier or digits_classifier(m.image_size)
    null = torch.full((n,), m.num_classes)
    x = render(net, cfg, meta, null, eval_seeds(n, seed), steps, guidance=1.0)
    counts = np.bincount(clf.logits(as_stored(x)).argmax(1).numpy(), minlength=m.num_classes)
    return {"checkpoint": str(resolve(ckpt)), "step": meta.get("step"), "steps": steps, "seed": seed,
            "classifier": clf.name, **audit_counts(counts, reference)}


def format_audit(result: dict) -> str:
    lines = ["class  samples  training"]
    lines += [f"{k:>5}  {q:>7.3f}  {p:>8.3f}" for k, (q, p) in enumerate(zip(result["shares"], result["reference"]))]
    lines.append(f"KL(samples || training) {result['kl_nats']:.4f} nats, chi-square {result['chi2']:.2f} "
                 f"(p = {result['p_value']:.3g}), n = {result['n']} null-label samples, {result['steps']} steps")
    return "\n".join(lines)


def plot_audit(result: dict, path: str | Path, size: tuple[int, int] = (640, 360)) -> Path:
    """Paired bars per class (samples dark, training light), drawn with Pillow."""
    from PIL import Image, ImageDraw

    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    left, bottom, top = 40, h - 30, 20
    k = len(result["shares"])
    top_val = max(max(result["shares"]), max(result["reference"])) * 1.1 or 1.0
    slot = (w - left - 10) / k
    for i, (q, p) in enumerate(zip(result["shares"], result["reference"])):
        x0 = left + i * slot
        for j, (v, colour) in enumerate(((q, (40, 70, 160)), (p, (170, 190, 230)))):
            bar_top = bottom - (bottom - top) * v / top_val
            d.rectangle([x0 + 4 + j * (slot - 8) / 2, bar_top, x0 + 4 + (j + 1) * (slot - 8) / 2 - 1, bottom],
                        fill=colour)
        d.text((x0 + slot / 2 - 3, bottom + 6), str(i), fill="black")
    d.line([left, bottom, w - 10, bottom], fill="black")
    d.text((left, 4), f"class shares: samples (dark) vs training (light); KL {result['kl_nats']:.3f} nats, "
                      f"p = {result['p_value']:.2g}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path

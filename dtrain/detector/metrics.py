"""Scores to figures (AUC, AP, TPR at 1% FPR, generated = positive) and the training-free baselines.

The baselines score an image directly, with nothing learnt, so a detector's figure counts by its
margin over them: procedural real images (the shapes world) are pixel-exact, and almost anything
separates them from samples.

- palette: the mean distance (0-255 units) of each pixel to the nearest of the shapes world's
  colours or the grey axis (its backgrounds); anti-aliased edges are blends and score a little too.
- hf_energy: the share of the image's spectral energy (mean removed) above half the Nyquist
  frequency, averaged over channels.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

from dtrain.bench.watermark import tpr_at_fpr
from dtrain.data.shapes import COLOURS


def figures(real: np.ndarray, generated: np.ndarray) -> dict:
    """{auc, ap, tpr_at_1pct_fpr} of scores where higher means generated."""
    y = np.r_[np.zeros(len(real)), np.ones(len(generated))]
    s = np.r_[real, generated].astype(np.float64)
    return {"auc": float(roc_auc_score(y, s)), "ap": float(average_precision_score(y, s)),
            "tpr_at_1pct_fpr": tpr_at_fpr(np.asarray(generated, np.float64), np.asarray(real, np.float64), 0.01)}


_PALETTE = np.array(list(COLOURS.values()), np.float64)  # [K, 3]


def palette_deviation(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N]: mean distance of each pixel to the nearest palette colour or grey."""
    x = images.astype(np.float64)
    to_colour = np.sqrt(((x[..., None, :] - _PALETTE) ** 2).sum(-1)).min(-1)  # [N, H, W]
    grey = x.mean(-1, keepdims=True)
    to_grey = np.sqrt(((x - grey) ** 2).sum(-1))
    return np.minimum(to_colour, to_grey).mean(axis=(1, 2))


def hf_energy(images: np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, C] -> [N]: share of spectral energy above half Nyquist (radially), mean removed."""
    x = images.astype(np.float64)
    x = x - x.mean(axis=(1, 2), keepdims=True)
    power = np.abs(np.fft.fft2(x, axes=(1, 2))) ** 2  # [N, H, W, C]
    h, w = images.shape[1:3]
    fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
    high = (np.sqrt(fy ** 2 + fx ** 2) > 0.25)[None, :, :, None]  # 0.5 cycles/pixel is Nyquist
    return ((power * high).sum(axis=(1, 2)) / np.maximum(power.sum(axis=(1, 2)), 1e-12)).mean(-1)


BASELINES = {"palette": palette_deviation, "hf_energy": hf_energy}

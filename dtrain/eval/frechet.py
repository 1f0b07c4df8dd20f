"""Frechet distance between two feature sets, each summarised as a Gaussian (mean, covariance).

Frechet (2-Wasserstein) distance between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982; FID,
Heusel et al. 2017, eq. 6):

    d^2 = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

We return d^2, as FID does. The trace of the matrix square root is computed from a symmetric
eigen-decomposition instead of scipy.linalg.sqrtm: S1 S2 is similar to the symmetric positive
semi-definite M = S1^(1/2) S2 S1^(1/2) (S1^(1/2) S2 S1^(1/2) = S1^(-1/2) (S1 S2) S1^(1/2) when S1 is
invertible, and by continuity otherwise), so

    Tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(M)),    lambda_i(M) >= 0.

`eigh` of symmetric matrices is real by construction: no complex parts to discard, and singular
covariances (fewer samples than features, dead units) need no eps on the diagonal: round-off makes
some eigenvalues slightly negative, and they are clipped to 0.
"""
from __future__ import annotations

import numpy as np
import torch


def gaussian_stats(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """features [N, F] -> (mean [F], unbiased covariance [F, F]), float64."""
    f = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N >= 2, F], got shape {list(f.shape)}")
    if not np.isfinite(f).all():
        raise ValueError("features hold NaN or inf: the images fed to the feature net were not finite")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues -> 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Squared Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (module docstring)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"mismatched statistics: means {mu1.shape} vs {mu2.shape}, "
                         f"covariances {s1.shape} vs {s2.shape}")
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()  # Tr (S1 S2)^(1/2)
    d2 = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(d2, 0.0)  # identical sets can round to -1e-15


def frechet_distance_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Squared Frechet distance between the Gaussians fitted to feature sets a [N, F] and b [M, F]."""
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))

"""A Gaussian mixture with exact ground truth: its density, samples, score and flow-matching field.

The metrics that hold a model against it are in dtrain.eval.gmm; its shards in dtrain.data.gmm.

Data x_1 ~ p_1 = sum_k w_k N(mu_k, Sigma_k); the class label is the component index k. With the
repo's rectified-flow path (dtrain.diffusion.flow: t = 0 noise, t = 1 data)

    x_t = t x_1 + (1 - t) x_0,   x_0 ~ N(0, I),

every marginal is again a mixture with the same weights:
    given k:  x_t ~ N(t mu_k, S_k(t)),   S_k(t) = t^2 Sigma_k + (1 - t)^2 I,
and (x_1 - x_0, x_t) are jointly Gaussian given k, with Cov(x_1 - x_0, x_t) = t Sigma_k - (1 - t) I. The
regression target of flow matching, v(x, t) = E[x_1 - x_0 | x_t = x], is therefore exact:

    v_k(x, t) = mu_k + (t Sigma_k - (1 - t) I) S_k^-1 (x - t mu_k)          (Gaussian conditioning)
    v(x, t)   = sum_k r_k(x, t) v_k(x, t),   r_k ∝ w_k N(x; t mu_k, S_k)    (posterior responsibilities)

and the score of p_t is  sum_k r_k (-S_k^-1 (x - t mu_k)); the two are tied by v = (x + (1 - t) score) / t.
S_k(t) stays positive definite on all of [0, 1] (it is I at t = 0 and Sigma_k at t = 1), so nothing
divides by t or 1 - t and the field is finite up to t = 1, where v(x, 1) = x. We work in float64 with
S_k^-1 from a Cholesky factorisation.

Shapes: a point is a vector [D]; functions that take a batch accept [N, D] or any [N, ...] with
prod(...) = D (GMM shards store a point as [D, 1, 1], the shape a 1x1 "image" with D channels has) and
return the input's shape.
"""
from __future__ import annotations

import math

import torch

from dtrain.errors import DtrainError


class MixtureError(DtrainError, ValueError):
    """A mixture spec that does not describe a Gaussian mixture; the message names the problem."""


class GaussianMixture:
    """means [K, D], covs [K, D, D] (symmetric positive definite), weights [K] (sum to 1 within
    `tol`, then renormalised). Labels 0..K-1 pick a component; label K is the null label
    (unconditional), as for a class-conditional network with classifier-free guidance."""

    def __init__(self, means, covs, weights, tol: float = 1e-4):
        self.means = _tensor(means, "means")
        self.covs = _tensor(covs, "covs")
        w = _tensor(weights, "weights")
        if self.means.ndim != 2 or self.means.shape[0] == 0:
            raise MixtureError(f"means must be a non-empty list of points [K, D], got shape {list(self.means.shape)}")
        K, D = self.means.shape
        if w.shape != (K,):
            raise MixtureError(f"weights has shape {list(w.shape)}, expected [{K}]: one weight per mean")
        if self.covs.shape != (K, D, D):
            raise MixtureError(f"covs has shape {list(self.covs.shape)}, expected [{K}, {D}, {D}]: "
                               f"one {D}x{D} matrix per mean (means are {D}-dimensional)")
        if (w < 0).any():
            raise MixtureError(f"weight {int(torch.nonzero(w < 0)[0])} is negative: {w.min().item():g}")
        if abs(w.sum().item() - 1.0) > tol:
            raise MixtureError(f"weights sum to {w.sum().item():.6g}, not 1 (tolerance {tol:g})")
        for k, c in enumerate(self.covs):
            if not torch.allclose(c, c.T, rtol=1e-6, atol=1e-9 * c.abs().max().item()):
                raise MixtureError(f"covariance {k} is not symmetric: {c.tolist()}")
            eig = torch.linalg.eigvalsh(c)
            if eig.min() <= 1e-12 * max(eig.max().item(), 1.0):
                raise MixtureError(f"covariance {k} is not positive definite (eigenvalues {eig.tolist()}): "
                                   "a Gaussian needs a symmetric matrix with eigenvalues > 0")
        self.weights = w / w.sum()
        self.chol = torch.linalg.cholesky(self.covs)  # [K, D, D], Sigma_k = L L^T

    @classmethod
    def from_dict(cls, spec: dict, tol: float = 1e-4) -> "GaussianMixture":
        """From {means, covs, weights} (what `to_dict` and the YAML/JSON spec files hold)."""
        if not isinstance(spec, dict):
            raise MixtureError(f"a mixture spec is a mapping with means, covs and weights, got {type(spec).__name__}")
        missing = [k for k in ("means", "covs", "weights") if k not in spec]
        unknown = sorted(set(spec) - {"means", "covs", "weights"})
        if missing:
            raise MixtureError(f"missing key(s) {missing}: a spec needs means [K, D], covs [K, D, D], weights [K]")
        if unknown:
            raise MixtureError(f"unknown key(s) {unknown}: a spec has only means, covs and weights")
        return cls(spec["means"], spec["covs"], spec["weights"], tol=tol)

    def to_dict(self) -> dict:
        return {"means": self.means.tolist(), "covs": self.covs.tolist(), "weights": self.weights.tolist()}

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # ---- sampling and density -------------------------------------------------------------------

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, D] float32, labels [n] int64): k ~ Categorical(w), x = mu_k + L_k z, z ~ N(0, I)."""
        labels = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, 1, generator=generator, dtype=torch.float64)
        x = self.means[labels] + (self.chol[labels] @ z)[..., 0]
        return x.float(), labels

    def log_prob(self, x: torch.Tensor, t: float | torch.Tensor = 1.0) -> torch.Tensor:
        """log p_t(x) [N] (float64); t = 1 is the data density log sum_k w_k N(x; mu_k, Sigma_k)."""
        logits, _, _ = self._posterior(x, t, None)
        return torch.logsumexp(logits, dim=1)

    def responsibilities(self, x: torch.Tensor, t: float | torch.Tensor = 1.0) -> torch.Tensor:
        """r_k(x, t) = P(component k | x_t = x) [N, K]."""
        logits, _, _ = self._posterior(x, t, None)
        return torch.softmax(logits, dim=1)

    def entropy_mc(self, n: int = 200_000, generator: torch.Generator | None = None) -> float:
        """H(p_1) = -E_p[log p(x)] by Monte Carlo over n samples (std. error ~ std(log p) / sqrt(n);
        a mixture's entropy has no closed form)."""
        x, _ = self.sample(n, generator)
        return -self.log_prob(x).mean().item()

    # ---- the exact flow ---------------------------------------------------------------------------

    def velocity(self, x: torch.Tensor, t: float | torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """v(x, t) = E[x_1 - x_0 | x_t = x] (module docstring), x's shape and dtype. cond [N] restricts
        sample i to component cond[i]; label K or cond=None means the whole mixture. Has the
        backbone interface net(x, t, cond), so it can stand in for a trained network."""
        logits, diff, sinv_diff = self._posterior(x, t, cond)
        r = torch.softmax(logits, dim=1)  # [N, K]
        tt = self._times(t, diff.shape[0]).to(diff.device)[:, None, None]  # [N, 1, 1]
        # (t Sigma_k - (1 - t) I) S_k^-1 (x - t mu_k) = t Sigma_k S^-1 d - (1 - t) S^-1 d
        sigma_sinv_diff = _matvec(self.covs.to(diff.device), sinv_diff)  # Sigma_k S_k^-1 d  [N, K, D]
        vk = self.means.to(diff.device) + tt * sigma_sinv_diff - (1 - tt) * sinv_diff  # [N, K, D]
        return (r[..., None] * vk).sum(1).to(x.dtype).view_as(x)

    def score(self, x: torch.Tensor, t: float | torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        """grad_x log p_t(x | cond) = sum_k r_k (-S_k^-1 (x - t mu_k)), x's shape and dtype."""
        logits, _, sinv_diff = self._posterior(x, t, cond)
        r = torch.softmax(logits, dim=1)
        return -(r[..., None] * sinv_diff).sum(1).to(x.dtype).view_as(x)

    def _times(self, t: float | torch.Tensor, n: int) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return t.expand(n) if t.ndim == 0 else t.to(torch.float64).reshape(n)

    def _posterior(self, x: torch.Tensor, t, cond):
        """Per sample and component: log w_k + log N(x; t mu_k, S_k) [N, K] (-inf where cond excludes
        k), d = x - t mu_k [N, K, D] and S_k^-1 d [N, K, D], in float64 on x's device."""
        n, K, D = x.shape[0], self.num_components, self.dim
        if x[0].numel() != D:
            raise ValueError(f"the mixture is {D}-dimensional, got samples of shape {tuple(x.shape[1:])}")
        dev = x.device
        xf = x.reshape(n, D).to(torch.float64)
        t = self._times(t, n).to(dev)
        # S_k(t) = t^2 Sigma_k + (1 - t)^2 I, factored once per distinct t (a sampler passes one t).
        tu, inv = torch.unique(t, return_inverse=True)
        eye = torch.eye(D, dtype=torch.float64, device=dev)
        S = tu[:, None, None, None] ** 2 * self.covs.to(dev) + (1 - tu)[:, None, None, None] ** 2 * eye  # [U, K, D, D]
        L = torch.linalg.cholesky(S)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=-2, dim2=-1)).sum(-1)[inv]  # log det S_k  [N, K]
        s_inv = torch.cholesky_inverse(L)  # [U, K, D, D]
        s_inv = s_inv[0] if len(tu) == 1 else s_inv[inv]  # [K, D, D] or [N, K, D, D]
        diff = xf[:, None, :] - t[:, None, None] * self.means.to(dev)  # d = x - t mu_k  [N, K, D]
        sinv_diff = _matvec(s_inv, diff)  # S_k^-1 d  [N, K, D]
        log_n = -0.5 * (D * math.log(2 * math.pi) + logdet + (diff * sinv_diff).sum(-1))
        logits = torch.log(self.weights.to(dev)) + log_n  # [N, K]
        if cond is not None:
            cond = torch.as_tensor(cond, device=dev).reshape(n)
            if ((cond < 0) | (cond > K)).any():
                raise ValueError(f"labels must be in 0..{K} ({K} = unconditional), got {cond.tolist()}")
            keep = (cond[:, None] == torch.arange(K, device=dev)) | (cond[:, None] == K)
            logits = logits.masked_fill(~keep, -math.inf)
        return logits, diff, sinv_diff


def _matvec(m: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """m [K, D, D] (one matrix per component: K matmuls over the batch) or [N, K, D, D], v [N, K, D] -> [N, K, D]."""
    return torch.einsum("kij,nkj->nki" if m.ndim == 3 else "nkij,nkj->nki", m, v)


def _tensor(v, name: str) -> torch.Tensor:
    try:
        out = torch.as_tensor(v, dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise MixtureError(f"{name} is not a (rectangular) array of numbers: {e}") from None
    if not torch.isfinite(out).all():
        raise MixtureError(f"{name} holds a non-finite number")
    return out

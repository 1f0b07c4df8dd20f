"""Inversion editing: an image run back along the model's ODE, then forward from an intermediate time under
another condition (the seed's SemanticEditor; DESIGN.md "editing = inversion + a partial solve").

- Inversion (`invert_image`) walks the deterministic DDIM sampler backwards (Euler's step on the linear
  path, so flow and DDPM models alike) with `samplers.invert_step`. Scheme "euler" is plain reversal:
  each step evaluates the net at its known, data-side end, an O(h^2) error per step that the forward
  sampler does not undo. Scheme "fixed_point" refines each step by the forward step's residual until it
  inverts that step (Pan et al. 2023, "Effective real image editing with accelerated iterative diffusion
  inversion"), so regenerating with the same condition returns the image up to the iteration's error.
- `edit` inverts to t0 = 1 - strength (in units of the path's [t_min, 1]) under the source condition and
  regenerates from there under the target one, on the same times and with the same guidance (the step
  inverted is the step taken). Strength 0 returns the input, strength 1 starts at the noise end.
  A mask (1: edit, 0: keep) blends the state at every step with the source's inverted trajectory at that
  time (Blended Latent Diffusion, Avrahami et al. 2023, Sec. 3); the last blend is with the input itself,
  so where the mask is 0 the result is the input exactly. attention_replace (text models): prompt-to-
  prompt (Hertz et al. 2022, Sec. 3.2), over the first `replace_fraction` of the steps a source branch
  regenerates under the source prompt and its cross-attention maps replace the target's, so the layout
  stays while the target's tokens (values) change the content. Tokens are aligned by position.
- `round_trip_error` measures inversion: sample, invert, regenerate with the same condition.

Works in the net's own space ([B, C, h, w] in [-1, 1] for a pixel model); a latent model's images would
need its VAE encoder, which the CLI refuses for now. NFE: network evaluations per image, counted as run.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from dtrain.diffusion import prediction_and_path
from dtrain.diffusion.parameterization import Denoiser
from dtrain.diffusion.samplers import ddim_step, flow_times, guided, initial_noise, invert_step, sample_ddim
from dtrain.errors import DtrainError
from dtrain.models import null_condition
from dtrain.models.layers import CrossAttention

SCHEMES = ("fixed_point", "euler")
# refinements per step: the round trip's knee on the shapes model (docs/shapes.md), 10-15x more exact
# than plain Euler at 2.5x its NFE
FIXED_POINT_REFINE = 3
REPLACE_FRACTION = 0.8  # share of the steps with injected attention: prompt-to-prompt's cross_replace_steps
MAX_IMAGE_BYTES = 16 << 20  # an image file larger than this is refused before it is read


class EditError(DtrainError, ValueError):
    """An edit that cannot run: a bad image, mask, strength, scheme or model; the message names it."""


class Inversion(NamedTuple):
    noise: torch.Tensor  # [B, C, h, w]: the state at times[0]
    times: torch.Tensor  # [n + 1]: t0 up to exactly 1
    trajectory: list[torch.Tensor]  # the states at `times`: [0] is `noise`, [-1] the image inverted
    nfe: int  # network evaluations per image


class Edited(NamedTuple):
    image: torch.Tensor  # [B, C, h, w]
    nfe: int  # network evaluations per image, the inversion's included


def edit_times(path, steps: int, strength: float) -> torch.Tensor:
    """The n + 1 times an edit runs on, evenly spaced over [t0, 1] with t0 = 1 - strength (1 - t_min) and
    n = round(strength steps) >= 1 steps: strength 1 gives samplers.sampling_times(path, steps) exactly."""
    _check_strength(strength)
    return 1 - strength * (1 - path.t_min) * (1 - flow_times(max(1, round(strength * steps))))


@torch.no_grad()
def invert_image(net, cfg, x: torch.Tensor, cond: torch.Tensor, steps: int, guidance: float = 1.0,
                 scheme: str = "fixed_point", refine: int | None = None, strength: float = 1.0) -> Inversion:
    """The state at t0 (`edit_times`; strength 1: the noise) that the deterministic DDIM sampler carries to
    x [B, C, h, w] under `cond` (class labels [B] or a text model's token ids [B, L]) and `guidance`.
    scheme "euler": plain reversal, steps calls; "fixed_point": (1 + refine) steps calls (default refine
    FIXED_POINT_REFINE); doubled with guidance."""
    refine = _refine(scheme, refine)
    with _evaluating(net) as device:
        d = _denoiser(net, cfg, _batch(x, cond, cfg), guidance, device)
        ts = edit_times(d.path, steps, strength).flip(0).to(device)  # 1 (data) down to t0
        states = [x.float().to(device)]
        for t_data, t in zip(ts[:-1], ts[1:]):
            states.append(invert_step(d, states[-1], t_data, t, refine))
    return Inversion(states[-1], ts.flip(0), states[::-1], _nfe(d, guidance))


@torch.no_grad()
def edit(net, cfg, x: torch.Tensor, source_cond: torch.Tensor, target_cond: torch.Tensor, strength: float, steps: int,
         guidance: float = 1.0, scheme: str = "fixed_point", refine: int | None = None, mask: torch.Tensor | None = None,
         attention_replace: bool = False, replace_fraction: float = REPLACE_FRACTION, watermark=None) -> Edited:
    """x [B, C, h, w] (what `source_cond` describes) edited towards `target_cond`: inverted to t0 = 1 -
    strength, then `round(strength steps)` DDIM steps back to t = 1 under the target. mask: [h, w] or
    [B, h, w] in [0, 1], 1 where the edit may change the image; the result equals x where it is 0.
    attention_replace: inject the source prompt's cross-attention maps over the first `replace_fraction`
    of the steps (text models only; an extra source-branch call per injected step). watermark: a
    dtrain.watermark.WatermarkKey whose signs the state at t0's noise estimate takes before regenerating
    (Gaussian Shading of what the regeneration starts from, `_shade_noise`; one more call, doubled with
    guidance; strength 0 returns the input, unmarked)."""
    _check_strength(strength)
    if not 0.0 <= replace_fraction <= 1.0:
        raise EditError(f"replace_fraction {replace_fraction}: must be in [0, 1]")
    if strength == 0:
        return Edited(x.clone(), 0)
    m = None if mask is None else _mask(mask, x)
    inv = invert_image(net, cfg, x, source_cond, steps, guidance, scheme, refine, strength)
    maps = _AttentionMaps(net) if attention_replace else None
    with _evaluating(net) as device:
        target = _denoiser(net, cfg, _batch(x, target_cond, cfg), guidance, device)
        source = _denoiser(net, cfg, source_cond, guidance, device)
        ts, y = inv.times.to(device), inv.noise
        if watermark is not None:
            y = _shade_noise(source, y, ts[0], watermark)
        y_src, m = y, None if m is None else m.to(device)
        inject = 0 if maps is None else round(replace_fraction * (len(ts) - 1))
        try:
            for k, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
                if k < inject:  # prompt-to-prompt: the source branch's maps, then the target's step with them
                    maps.record()
                    y_src = ddim_step(source, y_src, t, t_next)
                    maps.inject()
                y = ddim_step(target, y, t, t_next)
                if maps is not None:
                    maps.off()
                if m is not None:  # lerp is exact at m = 0: the source trajectory, at the end the input itself
                    y = torch.lerp(inv.trajectory[k + 1], y, m)
        finally:
            if maps is not None:
                maps.off()
    return Edited(y.cpu(), inv.nfe + _nfe(target, guidance) + _nfe(source, guidance))


@torch.no_grad()
def round_trip_error(net, cfg, cond: torch.Tensor, seeds: Sequence[int], steps: int, guidance: float = 1.0,
                     refines: Sequence[int] = (0, 1, 2, 3, 5)) -> list[dict]:
    """How exact inversion is: samples from `initial_noise(seeds)` by `steps` DDIM steps under `cond`,
    inverted (refine 0: scheme "euler", else "fixed_point" with that many refinements) and regenerated
    under the same condition. Per refine count: scheme, refine, nfe (inversion + regeneration per image),
    noise_rms (recovered noise against the true one) and image_rms (round trip against the sample)."""
    m = cfg.model
    noise = initial_noise((m.in_channels, m.image_size, m.image_size), list(seeds))
    with _evaluating(net) as device:
        d = _denoiser(net, cfg, _batch(noise, cond, cfg), guidance, device)
        ts = edit_times(d.path, steps, 1.0).to(device)
        x = sample_ddim(d, noise.to(device), ts)
    rows = []
    for r in refines:
        inv = invert_image(net, cfg, x, cond, steps, guidance, "euler" if r == 0 else "fixed_point", r)
        with _evaluating(net) as device:
            d = _denoiser(net, cfg, cond, guidance, device)
            back = sample_ddim(d, inv.noise, ts)
        rows.append({"scheme": "euler" if r == 0 else "fixed_point", "refine": r, "nfe": inv.nfe + _nfe(d, guidance),
                     "noise_rms": _rms(inv.noise - noise.to(device)), "image_rms": _rms(back - x)})
    return rows


def read_image(path: str | Path, shape: tuple[int, int, int], what: str = "image") -> torch.Tensor:
    """An image file -> [C, H, W] in [-1, 1] for a model making (C, H, W) images, or an EditError naming
    the file: too large, not an image, or another size (checked on the header, before decoding)."""
    from PIL import Image

    from dtrain.watermark import decode_for_model

    path = Path(path)
    try:
        size = path.stat().st_size
        with Image.open(path) as im:  # the header only: a decompression bomb is refused before it is decoded
            w, h = im.size
    except (OSError, Image.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise EditError(f"{what} {path}: not a readable image: {e}") from None
    if size > MAX_IMAGE_BYTES:
        raise EditError(f"{what} {path}: {size} bytes, more than the {MAX_IMAGE_BYTES} an image may have")
    if (h, w) != tuple(shape[1:]):
        raise EditError(f"{what} {path}: the image is {w}x{h}, the model makes {shape[2]}x{shape[1]} images")
    try:
        return decode_for_model(path.read_bytes(), shape)
    except ValueError as e:
        raise EditError(f"{what} {path}: {e}") from None


def read_mask(path: str | Path, side: int) -> torch.Tensor:
    """A mask image (white: edit, black: keep; grey: soft) -> [side, side] in [0, 1]."""
    return (read_image(path, (1, side, side), "mask")[0] + 1) / 2


# ---- helpers ----

def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise EditError(f"strength {strength}: must be in [0, 1] (0: the input, 1: from the noise end)")


def _refine(scheme: str, refine: int | None) -> int:
    if scheme == "euler":
        if refine:
            raise EditError(f"scheme euler is plain reversal (refine 0), not refine {refine}: use fixed_point")
        return 0
    if scheme != "fixed_point":
        raise EditError(f"unknown inversion scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    refine = FIXED_POINT_REFINE if refine is None else refine
    if refine < 1:
        raise EditError(f"scheme fixed_point needs refine >= 1, got {refine} (refine 0 is scheme euler)")
    return refine


def _denoiser(net, cfg, cond: torch.Tensor, guidance: float, device) -> Denoiser:
    prediction, path = prediction_and_path(cfg.objective)
    if prediction == "x0":  # the first step back needs the noise estimate at t = 1, where sigma = 0
        raise EditError("inverting an x0-predicting model needs its noise estimate at the data end, which is undefined")
    return Denoiser(guided(net, cond.to(device), guidance, null_condition(cfg.model)), prediction, path)


def _batch(x: torch.Tensor, cond: torch.Tensor, cfg) -> torch.Tensor:
    m = cfg.model
    if tuple(x.shape[1:]) != (m.in_channels, m.image_size, m.image_size) or x.ndim != 4:
        raise EditError(f"images of shape {list(x.shape)}: the model's ODE runs on [B, {m.in_channels}, "
                        f"{m.image_size}, {m.image_size}] (a latent model's images need its VAE encoder)")
    if len(cond) != len(x):
        raise EditError(f"{len(cond)} conditions for {len(x)} images: one each")
    return cond


def _mask(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[h, w] or [B, h, w] in [0, 1] -> [1 or B, 1, h, w] like x."""
    if mask.shape[-2:] != x.shape[-2:] or mask.ndim not in (2, 3) or (mask.ndim == 3 and len(mask) not in (1, len(x))):
        raise EditError(f"a mask of shape {list(mask.shape)} for images {list(x.shape)}: give [H, W] or [B, H, W]")
    if not bool(((mask >= 0) & (mask <= 1)).all()):
        raise EditError("mask values must be in [0, 1] (1: edit, 0: keep)")
    return mask.float().reshape(-1, 1, *mask.shape[-2:])


def _shade_noise(d: Denoiser, y: torch.Tensor, t: torch.Tensor, watermark) -> torch.Tensor:
    """y [B, C, h, w] at time t with its noise estimate's signs set by the watermark key: y = alpha x_hat +
    sigma eps_hat becomes alpha x_hat + sigma shade(eps_hat) (magnitudes kept, so still N(0, 1) over keys).
    At the noise end this is the watermarked sampler's start; nearer the data, less of y is noise and less of
    the image is decided by it."""
    eps = d.x_eps(y, t.expand(y.shape[0]).to(y))[1]
    return y + d.path.sigma(t.to(y)) * (watermark.shade(eps) - eps)


def _nfe(d: Denoiser, guidance: float) -> int:
    return d.calls * (1 if guidance == 1.0 else 2)  # a guided call evaluates each image twice


def _rms(e: torch.Tensor) -> float:
    return float(e.float().pow(2).mean().sqrt())


@contextlib.contextmanager
def _evaluating(net):
    """The net in eval mode (training mode drops conditions at random, for CFG), its device; mode restored."""
    was_training = net.training
    net.eval()
    try:
        yield next(net.parameters()).device
    finally:
        net.train(was_training)


class _AttentionMaps:
    """Prompt-to-prompt's controller: every CrossAttention's probabilities recorded on one call and put in
    place of the next call's, layer by layer. Tokens align by position; the injected maps keep only the
    target's existing tokens and are renormalised, so a target longer than the source reads its extra
    tokens only after the injection, a shorter one drops the source's mass on the missing positions."""

    def __init__(self, net):
        self.layers = [mod for mod in net.modules() if isinstance(mod, CrossAttention)]
        if not self.layers:
            raise EditError("attention replacement needs a text model with cross-attention (model.conditioning=text)")
        self.saved: dict[int, torch.Tensor] = {}

    def _save(self, i: int, probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        self.saved[i] = probs
        return probs

    def _swap(self, i: int, probs: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        p = self.saved[i].masked_fill(~allowed, 0.0)
        return p / p.sum(-1, keepdim=True).clamp_min(1e-12)

    def record(self) -> None:
        for i, layer in enumerate(self.layers):
            layer.probs_hook = functools.partial(self._save, i)

    def inject(self) -> None:
        for i, layer in enumerate(self.layers):
            layer.probs_hook = functools.partial(self._swap, i)

    def off(self) -> None:
        for layer in self.layers:
            layer.probs_hook = None

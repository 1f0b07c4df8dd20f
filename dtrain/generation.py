"""The one sampling entry point: (condition, seeds, steps, guidance, sampler) -> images, decoded when latent.

A condition is class labels [B] or, for a text model, its prompts' token ids [B, L] (`conditions`
encodes prompts with the checkpoint's tokenizer; the empty prompt is the null condition).

The CLI's `dtrain sample`, the training loop's W&B grids, evaluation and the serving replicas call
`render`; reflow pair generation calls its first half, `solve` (the ODE's end state, not decoded),
so noise, precision and latent decoding are decided in one place. A checkpoint trained on VAE
latent shards records the VAE in its meta (`meta["latents"] = {vae_dir, scaling_factor,
shift_factor}`, see `dtrain.data.latents.latents_meta`); its samples are decoded through that VAE.
"""
from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from dtrain.checkpoint import CheckpointError
from dtrain.data.latents import decode_latents, load_vae
from dtrain.diffusion import prediction_and_path
from dtrain.diffusion.parameterization import Denoiser
from dtrain.diffusion import samplers
from dtrain.diffusion.samplers import guided, initial_noise, sample, sampling_times
from dtrain.images import captioned_grid, grid, to_uint8
from dtrain.data.captions import caption_encoder
from dtrain.models import build_model, null_condition
from dtrain.precision import DTYPES, in_precision


@functools.lru_cache(maxsize=4)
def _load_vae(vae_dir: str):
    return load_vae(vae_dir)  # cached: a serving replica loads its VAE once, not per request


def latent_vae(meta: dict):
    """The VAE a latent checkpoint decodes through (loaded once per directory), or None for a
    checkpoint trained on pixels. CheckpointError when the recorded directory is gone."""
    lat = meta.get("latents")
    if not isinstance(lat, dict):
        return None
    vae_dir = Path(lat["vae_dir"])
    if not (vae_dir / "config.json").is_file():
        raise CheckpointError(f"the checkpoint was trained on latents of the VAE in {vae_dir}, which is missing "
                              "(no config.json there): put the VAE back at that path to decode its samples")
    return _load_vae(str(vae_dir.resolve()))


def image_shape(cfg, meta: dict) -> tuple[int, int, int]:
    """(channels, H, W) of the images `render` returns for a checkpoint's config and meta."""
    m = cfg.model
    vae = latent_vae(meta)
    if vae is None:
        return m.in_channels, m.image_size, m.image_size
    side = m.image_size * 2 ** (len(vae.config.block_out_channels) - 1)  # one 2x upsampling per extra block
    return vae.config.out_channels, side, side


def _in_dtype(net: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """`net` if it already runs in `dtype`, else a cast copy: casting in place would leave the caller a
    bf16 net whose fp32 weights could not be recovered. Serving casts once so no copy is made."""
    p = next(net.parameters())
    return net if p.dtype == dtype else copy.deepcopy(net).to(dtype)


# A replica encodes every request the same way: the tokenizer is parsed (an encoder loaded) once.
_encoder = functools.lru_cache(maxsize=8)(caption_encoder)


def conditions(cfg, tokenizer: str | None, prompts: list[str]) -> torch.Tensor:
    """A text model's condition for `prompts`: token ids [B, model.max_tokens] by its tokenizer (JSON), or
    a frozen encoder's embeddings [B, model.max_tokens, E]. The empty prompt is the null condition."""
    if cfg.model.conditioning != "text":
        raise ValueError("prompts need a text model (model.conditioning=text); this one is conditioned on "
                         f"{cfg.model.conditioning} labels")
    m = cfg.model
    return _encoder(m.text_encoder, m.max_tokens, tokenizer)(list(prompts))


def solve(net: torch.nn.Module, cfg, labels: torch.Tensor, seeds: list[int], steps: int, guidance: float,
          precision: str = "fp32", sampler: str = "euler", watermark=None,
          live: Optional[Callable[[], torch.Tensor]] = None, negative: torch.Tensor | None = None) -> torch.Tensor:
    """The ODE's end state [B, C, h, w] in the net's own space (latents stay latents), from the noise
    `initial_noise(seeds)`. labels: the condition, [B] long class labels or a text model's token ids [B, L]
    (`conditions`); negative: a text model's negative prompts' ids [B, L], the unconditional side of
    guidance (None: the empty prompt). seeds: B ints, one noise generator each, so a
    sample depends on its seed alone and not on how it was batched. `sampler` (a name in
    dtrain.diffusion.samplers.REGISTRY) takes `steps` steps with classifier-free guidance,
    `samplers.nfe(sampler, steps, guidance)` network calls per image,
    whatever the net predicts (velocity, eps, v, x0: cfg.objective says). The net runs in `precision`
    (bf16 | fp32 | fp16); the ODE state stays in float32. watermark: a dtrain.watermark.WatermarkKey
    whose signs the initial noise takes (None: plain noise). live: called before every network call, a
    bool [B] of the images still wanted; the others are no longer computed (their rows stay put)."""
    if len(labels) != len(seeds):
        raise ValueError(f"{len(labels)} labels but {len(seeds)} seeds: one seed per image")
    m, dtype = cfg.model, DTYPES[precision]
    unfit = samplers.misfit(sampler, m.flow_map)
    if unfit:
        raise ValueError(unfit)
    run = _in_dtype(net, dtype)
    device = next(run.parameters()).device
    # t stays float32: the timestep embedding computes its sinusoids in float32 itself
    net_fn = in_precision(run, dtype)
    if live is not None:
        net_fn = _only_live(net_fn, live)
    prediction, path = prediction_and_path(cfg.objective)
    noise = initial_noise((m.in_channels, m.image_size, m.image_size), seeds)
    noise = (noise if watermark is None else watermark.shade(noise)).to(device)
    null = null_condition(m) if negative is None else negative.to(device)
    was_training = run.training
    run.eval()  # in train mode the label embedder drops labels at random (CFG training): never when sampling
    try:
        if samplers.get(sampler).needs_flow_map:
            with torch.no_grad():
                return samplers.get(sampler).run(net_fn, labels.to(device), guidance, null, noise,
                                                 sampling_times(path, steps).to(device)).cpu()
        denoiser = Denoiser(guided(net_fn, labels.to(device), guidance, null), prediction, path)
        # the consistency sampler's fresh noise at step k, per image from its seed alone
        renoise = lambda k: initial_noise(noise.shape[1:], [(s * 1_000_003 + k) % 2**63 for s in seeds])  # noqa: E731
        return sample(sampler, denoiser, noise, steps, renoise=renoise).cpu()
    finally:
        run.train(was_training)


def _only_live(net_fn, live: Callable[[], torch.Tensor]):
    """net_fn on the rows `live()` keeps, zeros elsewhere: a cancelled image stops costing compute
    while the rest of its batch runs on. Guidance runs a doubled batch: the mask repeats."""
    def fn(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        keep = live()
        if bool(keep.all()):
            return net_fn(x, t, c, s)
        keep = keep.to(x.device).repeat(x.shape[0] // len(keep))
        out = torch.zeros_like(x)
        if bool(keep.any()):
            out[keep] = net_fn(x[keep], t[keep], c[keep], None if s is None else s[keep])
        return out
    return fn


def render(net: torch.nn.Module, cfg, meta: dict, labels: torch.Tensor, seeds: list[int], steps: int,
           guidance: float, precision: str = "fp32", sampler: str = "euler", watermark=None,
           live: Optional[Callable[[], torch.Tensor]] = None, negative: torch.Tensor | None = None) -> torch.Tensor:
    """Conditional images [B, C, H, W] in [-1, 1] (C, H, W = image_shape(cfg, meta)): `solve`, then
    decoded through the checkpoint's VAE when it was trained on latents (the VAE in float32)."""
    vae = latent_vae(meta)  # before sampling: a missing VAE fails fast, not after all the steps
    x = solve(net, cfg, labels, seeds, steps, guidance, precision, sampler, watermark, live, negative)
    if vae is None:
        return x
    lat = meta["latents"]
    return decode_latents(vae, x, float(lat["scaling_factor"]), float(lat.get("shift_factor") or 0.0))


def grid_from_weights(weights: dict, cfg, meta: dict, per_class: int = 4, precision: str = "fp32",
                      prompts: list[str] | None = None, tokenizer: str | None = None) -> np.ndarray:
    """A uint8 grid (rows = classes, or a text model's `prompts` with each written beside its row;
    `per_class` columns) from consolidated weights, for the training loop's W&B images. Seeds 0..N-1,
    cfg.sample's sampler, steps and guidance."""
    net = build_model(cfg.model)
    net.load_state_dict(weights)
    m, s = cfg.model, cfg.sample
    if m.conditioning == "text":
        cond = conditions(cfg, tokenizer, [p for p in prompts or [""] for _ in range(per_class)])
    else:
        cond = torch.arange(m.num_classes).repeat_interleave(per_class)
    x = render(net.eval(), cfg, meta, cond, list(range(len(cond))), s.steps, s.guidance, precision, s.sampler)
    if m.conditioning == "text":
        return captioned_grid(to_uint8(x), prompts or [""], per_class)
    return grid(to_uint8(x), per_class)

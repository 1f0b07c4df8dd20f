"""A training-free baseline, AEROBLADE-style (Ricker et al., CVPR 2024, there with the autoencoder of a
latent model): an image a model generated lies on that model's path, so taking it a little way back
along the model's ODE and forward again changes it less than a real image.

Here, for a pixel-space checkpoint (the reference): the image is inverted `depth` of the way from data to
noise (DDIM inversion refined once per step, `dtrain.diffusion.samplers.invert_step`, unconditional:
the image's condition is unknown) over the first `depth x steps` of the sampler's times, then carried
back to the data end by DDIM steps. The score is minus the mean squared reconstruction error, so higher
means generated, as every other score here. Generators other than the reference are scored through the
reference's ODE all the same: that is the held-out question for this baseline.
"""
from __future__ import annotations

import numpy as np
import torch

from dtrain.checkpoint import load_model
from dtrain.detector.encoding import to_input
from dtrain.detector.errors import DetectorError
from dtrain.diffusion import prediction_and_path
from dtrain.diffusion.parameterization import Denoiser
from dtrain.diffusion.samplers import ddim_step, guided, invert_step, sampling_times
from dtrain.models import null_condition


@torch.no_grad()
def reconstruction_score(net: torch.nn.Module, cfg, images: np.ndarray, depth: float = 0.25, steps: int | None = None,
                         batch: int = 64) -> np.ndarray:
    """uint8 RGB [N, H, W, 3] -> [N]: minus the mean squared error of the image after `depth` of the way
    back along the reference's ODE and forward again ([-1, 1] units)."""
    m = cfg.model
    if not 0 < depth <= 1:
        raise DetectorError(f"reconstruction depth {depth}: a fraction in (0, 1]")
    if images.shape[1:3] != (m.image_size, m.image_size) or m.in_channels not in (1, 3):
        raise DetectorError(f"images of {list(images.shape[1:])}: the reference model runs on "
                            f"{m.image_size}x{m.image_size}x{m.in_channels} pixels (a latent model is not supported)")
    steps = steps or cfg.sample.steps
    prediction, path = prediction_and_path(cfg.objective)
    ts = sampling_times(path, max(steps, 1)).flip(0)  # 1 (data) down to t_min (noise)
    back = ts[: max(1, round(depth * (len(ts) - 1))) + 1]
    net.eval()
    out = []
    for i in range(0, len(images), batch):
        x0 = to_input(images[i:i + batch])
        x0 = x0.mean(1, keepdim=True) if m.in_channels == 1 else x0
        shape = (len(x0), m.max_tokens) if m.conditioning == "text" else (len(x0),)
        labels = torch.full(shape, null_condition(m), dtype=torch.long)
        den = Denoiser(guided(net, labels, 1.0, null_condition(m)), prediction, path)
        x = x0
        for t_data, t in zip(back[:-1], back[1:]):
            x = invert_step(den, x, t_data, t, refine=1)
        for t, t_next in zip(back.flip(0)[:-1], back.flip(0)[1:]):
            x = ddim_step(den, x, t, t_next)
        out.append(-((x - x0) ** 2).mean(dim=(1, 2, 3)).numpy())
    return np.concatenate(out)


def reference_scorer(ckpt: str, depth: float = 0.25, steps: int | None = None):
    """score(images) -> [N] through the checkpoint `ckpt`'s ODE."""
    net, cfg = load_model(ckpt)
    return lambda images: reconstruction_score(net, cfg, images, depth, steps)

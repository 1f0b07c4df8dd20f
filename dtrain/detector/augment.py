"""Training-time augmentation: each image, real or generated alike, gets `copies` extra versions, each
through one of `dtrain bench watermark`'s attack families at a parameter drawn at random (JPEG
quality 60-95, down-and-up scaling 0.4-0.8, centred crop keeping 0.6-0.9 resized back, blur radius
0.3-1.0, noise std 0.01-0.06). The parameters are drawn from ranges, so evaluation's fixed settings
(JPEG 75 and 50, resize 0.5, crop 0.75, blur 0.5, noise 0.05) are among the kinds it saw, with JPEG 50 below
the trained range."""
from __future__ import annotations

import numpy as np

from dtrain.bench.watermark import blur, crop_resize, gaussian_noise, jpeg, resize

FAMILIES = {
    "jpeg": lambda rng: jpeg(int(rng.integers(60, 96))),
    "resize": lambda rng: resize(float(rng.uniform(0.4, 0.8))),
    "crop": lambda rng: crop_resize(float(rng.uniform(0.6, 0.9))),
    "blur": lambda rng: blur(float(rng.uniform(0.3, 1.0))),
    "noise": lambda rng: gaussian_noise(float(rng.uniform(0.01, 0.06))),
}


def augment(images: np.ndarray, copies: int, seed: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N * copies, H, W, 3]: copy k of image i through a random family and parameter,
    drawn from (seed, i, k) alone, so which image gets what does not depend on its class or batch."""
    out = []
    names = list(FAMILIES)
    for k in range(copies):
        for i, img in enumerate(images):
            rng = np.random.default_rng([seed, i, k])
            attack = FAMILIES[names[rng.integers(len(names))]](rng)
            out.append(attack(img, rng))
    return np.stack(out) if out else images[:0]

"""scikit-learn's handwritten digits (1797 8x8 images, 10 classes, shipped in the package) as shards."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dtrain.data.shards import write_shards


def digits_arrays(image_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, S, S] (bilinear resize of the 0-16 originals) and labels [N]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    if image_size != 8:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    img = (x[:, 0].clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return img, d.target.astype(np.int64)


def write_digits(out: str | Path, image_size: int = 16, train_shards: int = 4, val_per_class: int = 20,
                 seed: int = 0) -> dict[str, list[str]]:
    """Class-balanced validation split (val_per_class per class), the rest in `train_shards` shards."""
    img, y = digits_arrays(image_size)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    val = np.concatenate([order[y[order] == c][:val_per_class] for c in range(10)])
    train = np.setdiff1d(order, val)
    train = train[rng.permutation(len(train))]
    out = Path(out)
    per_shard = -(-len(train) // train_shards)
    return {
        "train": write_shards(((img[i], y[i]) for i in train), str(out / "train-%06d.tar"), per_shard),
        "val": write_shards(((img[i], y[i]) for i in val), str(out / "val-%06d.tar"), len(val)),
    }

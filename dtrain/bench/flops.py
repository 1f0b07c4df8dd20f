"""`dtrain bench flops`: forward GMACs of the DiT sizes at 256px latents (32x32x4), next to the
DiT paper's Table 4 figures."""
from __future__ import annotations

from dtrain.config import ModelConfig
from dtrain.models.flops import forward_macs

# Peebles & Xie 2023, Table 4 ("Gflops", which are multiply-accumulates), 256x256 images.
PAPER_GMACS = {("S", 2): 6.06, ("B", 2): 23.01, ("L", 2): 80.71, ("XL", 2): 118.64,
               ("S", 4): 1.41, ("B", 4): 5.56, ("L", 4): 19.70, ("XL", 4): 29.05,
               ("S", 8): 0.36, ("B", 8): 1.42, ("L", 8): 5.01, ("XL", 8): 7.39}


def run(arch: str = "dit") -> list[dict]:
    rows = []
    for (size, patch), paper in PAPER_GMACS.items():
        cfg = ModelConfig(arch=arch, size=size, image_size=32, in_channels=4, patch_size=patch, num_classes=1000)
        g = forward_macs(cfg) / 1e9
        rows.append({"model": f"{arch}-{size}/{patch}", "gmacs": round(g, 3),
                     "paper_gmacs": paper if arch == "dit" else None,
                     "rel_diff": round(g / paper - 1, 5) if arch == "dit" else None})
    return rows

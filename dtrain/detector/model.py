"""The detector network: a convolutional spatial branch on the pixels and one on the log-magnitude of each
channel's centred 2-D FFT, their pooled features concatenated, then a linear layer to one logit (> 0:
generated). `branches` keeps one branch alone ("spatial" or "fft"), to measure what each sees.

The spatial branch pools globally (what an object looks like does not depend on where it is); the FFT
branch pools to a coarse `fft_grid` x `fft_grid` grid, because where a peak sits in the spectrum is the
information (a generator's periodic artefact is a peak at its own frequency; noise makes peaks anywhere)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from dtrain.detector.errors import DetectorError

BRANCHES = ("both", "spatial", "fft")


class DetectorConfigError(DetectorError):
    pass


@dataclass(frozen=True)
class DetectorConfig:
    channels: int = 3  # image channels
    width: int = 16  # conv channels of each branch
    depth: int = 2  # conv blocks per branch (each: 3x3 conv, ReLU; stride 2 after the first)
    fft_grid: int = 4  # the FFT branch's features keep this coarse a position in the spectrum
    branches: str = "both"
    encoding: str = "png"  # dtrain.detector.encoding's name: recorded so scoring re-encodes the same way

    def check(self) -> None:
        if self.branches not in BRANCHES:
            raise DetectorConfigError(f"branches {self.branches!r}: one of {', '.join(BRANCHES)}")
        if min(self.channels, self.width, self.depth, self.fft_grid) < 1:
            raise DetectorConfigError("channels, width, depth and fft_grid must be >= 1")


def fft_magnitude(x: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] -> log(1 + |FFT|) of each channel, zero frequency centred, same shape."""
    spectrum = torch.fft.fftshift(torch.fft.fft2(x.float(), norm="ortho"), dim=(-2, -1))
    return torch.log1p(spectrum.abs())


def _branch(channels: int, width: int, depth: int, grid: int = 1) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Conv2d(channels if i == 0 else width, width, 3, stride=1 if i == 0 else 2, padding=1), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid), nn.Flatten())


class Detector(nn.Module):
    """x: [B, C, H, W] in [-1, 1] -> logits [B]."""

    def __init__(self, config: DetectorConfig = DetectorConfig()):
        super().__init__()
        config.check()
        self.config = config
        c = config
        self.spatial = _branch(c.channels, c.width, c.depth) if c.branches in ("both", "spatial") else None
        self.freq = _branch(c.channels, c.width, c.depth, c.fft_grid) if c.branches in ("both", "fft") else None
        n = c.width * ((self.spatial is not None) + c.fft_grid ** 2 * (self.freq is not None))
        self.head = nn.Linear(n, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.spatial is not None:
            parts.append(self.spatial(x))
        if self.freq is not None:
            parts.append(self.freq(fft_magnitude(x)))
        return torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


def version(state: dict[str, torch.Tensor], config: DetectorConfig) -> str:
    """'det-' + 12 hex digits of SHA-256 over the config (JSON) and every weight's name, shape and bytes."""
    h = hashlib.sha256(json.dumps(asdict(config), sort_keys=True).encode())
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous().float()
        h.update(k.encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes())
    return "det-" + h.hexdigest()[:12]

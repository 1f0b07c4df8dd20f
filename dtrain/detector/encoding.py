"""The one encoding real and generated images pass through before the detector trains on them or scores
them, so it cannot learn the file format: published audits found detectors that learnt JPEG versus PNG.

`encode` is called for both classes, always: decode whatever the shard holds to uint8 RGB pixels, write
them in the named format and read them back. "png" is lossless (the round trip is the identity on uint8
pixels; what it fixes is the path: every image is the same kind of array from the same decoder);
"jpeg<q>" (e.g. jpeg90) re-compresses both classes at quality q, which also erases any difference in how
the two were stored.
"""
from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image

from dtrain.detector.errors import DetectorError

ENCODING_RE = re.compile(r"^(png|jpeg(\d{1,3}))$")


class EncodingError(DetectorError):
    pass


def check_encoding(name: str) -> str:
    m = ENCODING_RE.match(name)
    if not m or (m.group(2) is not None and not 1 <= int(m.group(2)) <= 100):
        raise EncodingError(f"encoding {name!r}: 'png' or 'jpeg<quality 1-100>', e.g. jpeg90")
    return name


def encode(img: np.ndarray, name: str = "png") -> np.ndarray:
    """uint8 [H, W, 3] (or [H, W]) -> the same pixels written as `name` and decoded again, uint8 [H, W, 3]."""
    check_encoding(name)
    if img.dtype != np.uint8:
        raise EncodingError(f"encode takes uint8 pixels, not {img.dtype}")
    im = Image.fromarray(img).convert("RGB")
    buf = io.BytesIO()
    if name == "png":
        im.save(buf, format="PNG")
    else:
        im.save(buf, format="JPEG", quality=int(name[4:]))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def encode_all(images, name: str = "png") -> np.ndarray:
    """`encode` over a batch: uint8 [N, H, W, 3]."""
    return np.stack([encode(np.asarray(i), name) for i in images])


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float [N, 3, H, W] in [-1, 1], the detector's input."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1).permute(0, 3, 1, 2).contiguous()

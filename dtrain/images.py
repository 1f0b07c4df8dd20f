"""Tensors in [-1, 1] to uint8 images, grids and PNG bytes (Pillow does the encoding)."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W] (C=1) or [B, H, W, C]."""
    img = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return img[..., 0] if img.shape[-1] == 1 else img


def grid(images: np.ndarray, ncol: int, pad: int = 1) -> np.ndarray:
    """uint8 [B, H, W(, C)] -> one image with `ncol` columns and a black `pad` between cells."""
    b, h, w = images.shape[:3]
    nrow = -(-b // ncol)
    out = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, *images.shape[3:]), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncol)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    return out


def captioned_grid(images: np.ndarray, captions: list[str], ncol: int, factor: int = 4, width: int = 260) -> np.ndarray:
    """grid(images, ncol) upscaled by `factor`, each row's caption written in a white strip to its left
    (row r holds the images asked for with captions[r]): samples with the prompts that made them."""
    cells = np.asarray(upscale(grid(images, ncol), factor))
    if cells.ndim == 2:
        cells = np.repeat(cells[..., None], 3, axis=-1)
    row_h = (images.shape[1] + 1) * factor
    strip = Image.new("RGB", (width, cells.shape[0]), "white")
    draw = ImageDraw.Draw(strip)
    for r, text in enumerate(captions):
        draw.text((4, r * row_h + row_h // 2 - 5), text[:48] or "(empty prompt)", fill="black")
    return np.concatenate([np.asarray(strip), cells], axis=1)


def upscale(img: np.ndarray, factor: int) -> Image.Image:
    """Nearest-neighbour upscaling so 16-pixel digits are visible."""
    pil = Image.fromarray(img)
    return pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST) if factor > 1 else pil


def png_bytes(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def save_captioned_grid(x: torch.Tensor, path: str | Path, captions: list[str], ncol: int, factor: int = 4) -> Path:
    """captioned_grid of images [B, C, H, W] in [-1, 1] written as a PNG (row r asked for with captions[r])."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(captioned_grid(to_uint8(x), captions, ncol, factor)).save(path)
    return path


def save_grid(x: torch.Tensor, path: str | Path, ncol: int, factor: int = 4) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    upscale(grid(to_uint8(x), ncol), factor).save(path)
    return path

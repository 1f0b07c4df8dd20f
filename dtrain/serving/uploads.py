"""Images a request sends (base64 in the JSON body): bounded, checked on the header before a pixel is
decoded, and refused with PlanError naming the body field (422), never an exception of the decoder.

`/v1/edit` takes a PNG or JPEG of exactly the model's size and channels (8-bit greyscale for a 1-channel
model, RGB for a 3-channel one; a mask is greyscale), at most ServeArgs.max_image_chars characters of
base64. `/v1/detect` takes the common raster formats (DETECT_FORMATS: no format whose decoder runs an
external program, as EPS's runs Ghostscript) and converts colour to the model's channels (a detector
sees what users pass around), within its schema's bound. Pure: no Ray, no FastAPI.
"""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from dtrain.serving.planning import PlanError

EDIT_FORMATS = ("PNG", "JPEG")
DETECT_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# the 8-bit modes whose channels are a model's as they are: no conversion decides what a pixel means
EXACT_MODES = {1: ("L", "1"), 3: ("RGB",)}
_NAMES = {1: "8-bit greyscale (mode L)", 3: "8-bit RGB without alpha"}


@dataclass(frozen=True)
class Upload:
    """An image a request sent: the file as sent, its type, and its pixels as uint8 [C, H, W]."""
    data: bytes
    mime: str
    pixels: np.ndarray


def decode_upload(text: str, field: str, shape: tuple[int, int, int], max_chars: Optional[int] = None,
                  formats: Optional[Sequence[str]] = EDIT_FORMATS, convert: bool = False) -> Upload:
    """The image in `text` (base64) for a model making (C, H, W) images, or PlanError(field, why): longer
    than `max_chars`, not base64, not an image of `formats` (None: any Pillow reads), another size (read
    from the header, so a small file that declares a huge image is refused before it is decoded), other
    channels (unless `convert`: converted to the model's, as a detector does), or unreadable pixels.
    `formats` None is every format Pillow reads: never for a request (DETECT_FORMATS)."""
    from PIL import Image

    c, h, w = shape
    if max_chars is not None and len(text) > max_chars:
        raise PlanError(field, f"{len(text)} characters of base64, more than the {max_chars} this deployment takes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:  # ValueError: a non-ASCII character
        raise PlanError(field, f"not base64: {e}") from None
    kinds = (", ".join(formats[:-1]) + " or " + formats[-1] if len(formats) > 1 else formats[0]) if formats else "image"
    try:
        im = Image.open(io.BytesIO(data), formats=list(formats) if formats else None)  # the header only
    except Image.DecompressionBombError as e:
        raise PlanError(field, f"the image declares too many pixels for any model: {e}") from None
    except Exception as e:  # noqa: BLE001 - whatever a decoder raises on untrusted bytes, the answer is a 422
        raise PlanError(field, f"not a readable {kinds} file: {type(e).__name__}") from None
    if im.size != (w, h):
        raise PlanError(field, f"the image is {im.size[0]}x{im.size[1]}, the model makes {w}x{h} images")
    if c not in EXACT_MODES:
        raise PlanError(field, f"the model makes {c}-channel images: only 1 (greyscale) or 3 (RGB) can be read "
                               "from a file")
    if not convert and im.mode not in EXACT_MODES[c]:
        raise PlanError(field, f"an image of mode {im.mode}: the model takes {_NAMES[c]} images of its size")
    try:
        im.load()
        arr = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.uint8).reshape(h, w, c)
    except Exception as e:  # noqa: BLE001 - truncated, corrupt or mislabelled data
        raise PlanError(field, f"not a readable {kinds} file: {type(e).__name__}: {str(e)[:200]}") from None
    mime = Image.MIME.get(im.format or "", "application/octet-stream")
    return Upload(data, mime, np.ascontiguousarray(arr.transpose(2, 0, 1)))


def as_model_input(pixels: np.ndarray):
    """uint8 [C, H, W] -> float [C, H, W] in [-1, 1], as dtrain.watermark.decode_for_model gives."""
    import torch

    return torch.from_numpy(pixels.astype(np.float32)) / 127.5 - 1

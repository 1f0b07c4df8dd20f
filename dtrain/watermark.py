"""An invisible, keyed watermark in the sampler's initial noise, and its detector by ODE inversion.

The scheme is Gaussian Shading (Yang et al., CVPR 2024) as a zero-bit watermark: a 32-byte key
expands (ChaCha20) into one bit per element of the noise; each element keeps the magnitude its seed
drew and takes the sign its bit says, z = |g| (2b - 1). Over keys the bits are uniform, so every
element is still N(0, 1): the watermarked sampler draws from the same distribution as the plain one.
It works for any sampler and stage (multi-step teachers, reflow and consistency students), because it
only touches the noise they start from.

Detection inverts the model's guided ODE from the image back to noise (`dtrain.diffusion.samplers.invert`:
DDIM inversion refined by fixed-point iterations) under every class, since a detector does not know
the image's class, and counts the elements whose sign matches the key's bit: k of n, best over classes.
An image made without the key matches by chance, k ~ Bin(n, 1/2),
so the p-value is P[Bin(n, 1/2) >= k] times the classes, keys and alignments tried (Bonferroni); the
score is k / n (0.5: no watermark, 1: every sign recovered).

A flipped or quarter-turned copy inverts to noise that no longer lines up with the key. With
`sync="dihedral"` detection also inverts the image undone by each of the other 7 symmetries of the
square (flips, quarter turns and their compositions), so those copies are found again, at 8x the
inversions and a Bonferroni factor of 8 on the p-value.
"""
from __future__ import annotations

import hashlib
import io
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from dtrain.errors import DtrainError
from dtrain.diffusion import prediction_and_path
from dtrain.diffusion.parameterization import Denoiser
from dtrain.diffusion.samplers import guided, invert
from dtrain.models import null_condition
from dtrain.models.text import PAD_ID
from dtrain.precision import DTYPES, in_precision

KEY_FILE_ENV = "DTRAIN_WATERMARK_KEY_FILE"  # where the default key lives, if not ~/.config/dtrain/watermark.key
DETECT_ALPHA = 0.01  # a p-value below this is reported as watermarked (1% false positives at most)


class WatermarkKeyError(DtrainError, ValueError):
    pass


@dataclass(frozen=True)
class WatermarkKey:
    """A deployment's secret (32 bytes) and the public id derived from it, which responses and
    provenance name (the id reveals nothing of the secret)."""
    secret: bytes = field(repr=False)

    def __post_init__(self):
        if len(self.secret) != 32:
            raise WatermarkKeyError(f"a watermark key is 32 bytes, not {len(self.secret)}")

    @property
    def key_id(self) -> str:
        return "wm-" + hashlib.sha256(b"dtrain watermark key id\0" + self.secret).hexdigest()[:12]

    @classmethod
    def generate(cls) -> "WatermarkKey":
        return cls(secrets.token_bytes(32))

    @classmethod
    def load(cls, path: str | Path) -> "WatermarkKey":
        """A key file: 64 hex digits (comments after #, blank lines ignored)."""
        text = " ".join(line.split("#")[0].strip() for line in Path(path).read_text().splitlines()).strip()
        try:
            return cls(bytes.fromhex(text))
        except ValueError as e:
            raise WatermarkKeyError(f"{path}: not a watermark key (64 hex digits): {e}") from None

    def save(self, path: str | Path) -> Path:
        """Write the key readable by its owner only (created 0600, never world-readable in between)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"# dtrain watermark key {self.key_id}\n{self.secret.hex()}\n")
        return path

    def signs(self, shape: tuple[int, ...]) -> torch.Tensor:
        """±1 float32 [*shape]: the key's bits for noise of this shape (another shape: other bits)."""
        n = int(np.prod(shape))
        nonce = hashlib.sha256(b"dtrain watermark shape\0" + repr(tuple(shape)).encode()).digest()[:16]
        stream = Cipher(algorithms.ChaCha20(self.secret, nonce), mode=None).encryptor().update(bytes((n + 7) // 8))
        bits = np.unpackbits(np.frombuffer(stream, np.uint8))[:n].reshape(shape)
        return torch.from_numpy(bits.astype(np.float32) * 2 - 1)

    def shade(self, noise: torch.Tensor) -> torch.Tensor:
        """Watermarked noise [B, ...]: each element's magnitude from `noise`, its sign from the key."""
        return noise.abs() * self.signs(tuple(noise.shape[1:])).to(noise)


def default_key_file() -> Path:
    return Path(os.environ.get(KEY_FILE_ENV) or Path.home() / ".config" / "dtrain" / "watermark.key")


def key_for_serving(path: str | Path | None) -> WatermarkKey:
    """The deployment's key: from `path`, or from default_key_file(), which is created on first use."""
    if path is not None:
        return WatermarkKey.load(path)
    default = default_key_file()
    if not default.exists():
        try:
            WatermarkKey.generate().save(default)
        except FileExistsError:
            pass  # another process created it first: use theirs
    return WatermarkKey.load(default)


SYNCS = ("none", "dihedral")


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th of the 8 symmetries of the square on images [..., H, W]: k % 4 quarter turns, after a
    left-right flip when k >= 4 (k = 0: the image itself)."""
    return torch.rot90(x.flip(-1) if k >= 4 else x, k % 4, dims=(-2, -1))


def undo_dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `dihedral(., k)`: undo_dihedral(dihedral(x, k), k) == x."""
    back = torch.rot90(x, -(k % 4), dims=(-2, -1))
    return back.flip(-1) if k >= 4 else back


@torch.no_grad()
def recover_noise(net: torch.nn.Module, cfg, images: torch.Tensor, steps: int | None = None,
                  guidance: float | None = None, precision: str = "fp32", sync: str = "none") -> torch.Tensor:
    """Candidate initial noises [K, B, C, h, w] that the model's guided ODE maps to `images` [B, C, h, w]
    in [-1, 1], one per class (K = the model's classes; a text model's one: the empty prompt): an image's
    class is unknown to a detector, so the ODE is inverted under each, `steps` steps (default
    cfg.sample.steps, the times the sampler used) at `guidance` (default cfg.sample.guidance), and
    `detect` keeps the best match. sync="dihedral": also for the image undone by each symmetry of the
    square (flips, quarter turns; square images), K = 8 x the classes."""
    if sync not in SYNCS:
        raise ValueError(f"unknown sync {sync!r}: choose one of {', '.join(SYNCS)}")
    if sync == "dihedral":
        if images.shape[-1] != images.shape[-2]:
            raise ValueError("dihedral synchronisation needs square images")
        return torch.cat([recover_noise(net, cfg, undo_dihedral(images, k), steps, guidance, precision)
                          for k in range(8)])
    m, dtype = cfg.model, DTYPES[precision]
    steps = steps or cfg.sample.steps
    guidance = cfg.sample.guidance if guidance is None else guidance
    if images.shape[1:] != (m.in_channels, m.image_size, m.image_size):
        raise ValueError(f"images of shape {list(images.shape[1:])}: the model's ODE runs on "
                         f"{[m.in_channels, m.image_size, m.image_size]} (a latent model's images need its VAE encoder)")
    prediction, path = prediction_and_path(cfg.objective)
    if prediction == "x0":
        raise ValueError("inverting an x0-predicting model needs its noise estimate at the data end, which is undefined")
    device = next(net.parameters()).device
    x = images.float().to(device)
    was_training = net.training
    net.eval()
    try:
        out = []
        # a text model's prompt is unknown and unbounded: its ODE is inverted under the empty prompt alone
        text = m.conditioning == "text"
        for c in ([PAD_ID] if text else range(m.num_classes)):
            labels = torch.full((len(x), m.max_tokens) if text else (len(x),), c, dtype=torch.long, device=device)
            fn = guided(in_precision(net, dtype), labels, guidance, null_condition(m))
            out.append(invert(Denoiser(fn, prediction, path), x, steps).cpu())
        return torch.stack(out)
    finally:
        net.train(was_training)


def decode_for_model(data: bytes, shape: tuple[int, int, int]) -> torch.Tensor:
    """An image file's bytes (PNG, JPEG, ...) -> float [C, H, W] in [-1, 1] for a model making images of
    `shape` (C, H, W). ValueError naming the problem when it is not an image or another size; colour is
    converted to the model's channels (a detector sees what users pass around)."""
    from PIL import Image, UnidentifiedImageError

    try:
        im = Image.open(io.BytesIO(data))
        im.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"not a readable image: {e}") from None
    c, h, w = shape
    if im.size != (w, h):
        raise ValueError(f"the image is {im.size[0]}x{im.size[1]}, the model makes {w}x{h} images")
    if c not in (1, 3):
        raise ValueError(f"the model makes {c}-channel images: only 1 (grayscale) or 3 (RGB) can be read from a file")
    arr = np.asarray(im.convert("L" if c == 1 else "RGB"), dtype=np.float32).reshape(h, w, c)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


def detect(noises: torch.Tensor, keys: list[WatermarkKey], alpha: float = DETECT_ALPHA) -> list[dict]:
    """Per image, from candidate noises [K, B, ...] (`recover_noise`): the best match over candidates
    and keys, its key id, score (share of matching signs), p-value (Bonferroni over the K candidates
    and the keys) and whether it is watermarked (p < alpha)."""
    if not keys:
        raise WatermarkKeyError("detection needs at least one key")
    shape = tuple(noises.shape[2:])
    n, tries = int(np.prod(shape)), noises.shape[0] * len(keys)
    # matches [keys, K, B] -> best over keys and candidates per image
    matches = torch.stack([(torch.sign(noises) == k.signs(shape)).flatten(2).sum(2) for k in keys])
    best, where = matches.flatten(0, 1).max(0)
    out = []
    from scipy.stats import binom  # here: scipy's import was a quarter of a new sampler replica's imports

    for k, j in zip(best.tolist(), where.tolist()):
        p = min(1.0, float(binom.sf(k - 1, n, 0.5)) * tries)
        out.append({"key_id": keys[j // noises.shape[0]].key_id, "score": k / n, "p_value": p,
                    "watermarked": p < alpha, "matching_signs": k, "signs": n})
    return out

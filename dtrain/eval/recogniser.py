"""The shapes recogniser: a small CNN the project trains on the shapes world's renders
(`dtrain.data.shapes`) that reads an image back into its objects (shape, colour, grid cell), and an
analytic parser with no learning that reads colour and place only, as a cross-check.

The recogniser is an evaluator: it is trained on every colour-shape pair (the held-out pairs and
groups of four included) and on scenes of up to nine objects, so it reads held-out compositions and
any count. It trains on a mix of clean renders and renders degraded the way generated images are
(`degrade`: a colour shift, blur, noise; JPEG only on request, since generated images are never
compressed), deterministically (fixed seed, one thread, deterministic algorithms) from its own
seeded scene stream, distinct from the shards' `scene_rng`. Like the digits classifier it is cached
on disk under a hash of its code, the renderer's code and output, the image size and its
hyperparameters (safetensors, JSON metadata, written atomically), so a machine trains it once
(about a minute and a half on one thread at 32x32).

Architecture (`ShapesCNN`): three 3x3 convs (one 2x2 max pool) and an adaptive average pool to the
3x3 grid (so any side 16..64 gives one vector per grid cell), a 1x1 dense layer and a 1x1 embedding
per cell (`features`: the nine cells' embeddings before their ReLU, [N, 9 * 16]), and two 1x1 heads
per cell: "what" logits (empty or one of SHAPES) and colour logits (COLOURS).

Accuracy (`Recogniser.table`, `measure`) per attribute on fresh renders, clean and degraded:
shape and colour: fraction of true objects whose cell is read with the right shape / colour;
place: fraction of scenes whose set of occupied cells is read exactly; count: fraction of scenes
whose object count is read exactly.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from dtrain.data import shapes as world
from dtrain.data.shapes import COLOUR_NAMES, COLOURS, GRID, SHAPES, Scene, Seen, render, sample_scene, split_scene
from dtrain.eval.features import cache_dir, deterministic_cpu

CELLS = GRID * GRID
TRAIN_STREAM = 7  # np.random.default_rng([seed, TRAIN_STREAM, i]): the training scenes
EVAL_STREAM = 8  # the table's held-out scenes (tests draw fresh ones from other seeds)
EVAL_SEED = 1
EVAL_DEGRADE_SEED = 999_983  # the table's degradation; training degrades with seeds below 10**6
METADATA_KEY = "dtrain.recogniser"
# the 32-pixel recogniser as trained by this code, shipped so a fresh machine measures with it at once
# instead of training it (90 s); looked up by the same key as the cache, so changed code trains anew
BUNDLED = Path(__file__).resolve().parent / "weights"


# ---------------------------------------------------------------------------------------------
# Degradation


def degrade(x: torch.Tensor, seed: int, strength: float = 1.0, jpeg: float = 0.0) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] degraded the way generated images are, deterministically from
    `seed` (the same seed and images give the same result): per image a colour shift (per-channel gain
    in 1 +- 0.1 and offset +- 0.06), a Gaussian blur (sigma up to 1 px at 32 pixels, scaled with the
    side), additive Gaussian noise (std up to 0.08) and, with probability `jpeg`, JPEG at quality
    70..95. Each amount is drawn uniformly up to `strength` times its maximum."""
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"degrade takes RGB images [N, 3, H, W], got {list(x.shape)}")
    n, _, h, w = x.shape
    rng = np.random.default_rng([int(seed), 0x5EED])
    gain = 1 + strength * rng.uniform(-0.1, 0.1, size=(n, 3, 1, 1))
    offset = strength * rng.uniform(-0.06, 0.06, size=(n, 3, 1, 1))
    sigma_max = max(h, w) / 32
    sigma = strength * sigma_max * rng.uniform(0, 1, size=n)
    noise_std = strength * rng.uniform(0, 0.08, size=(n, 1, 1, 1))
    jpeg_on = rng.random(n) < jpeg
    quality = rng.integers(70, 96, size=n)
    noise = rng.standard_normal(size=x.shape, dtype=np.float32)

    y = x.detach().float().cpu() * torch.from_numpy(gain).float() + torch.from_numpy(offset).float()
    # separable Gaussian blur, one kernel per image (a grouped conv over the N * 3 channels)
    radius = int(np.ceil(3 * sigma_max))
    taps = np.arange(-radius, radius + 1)
    kern = np.exp(-0.5 * (taps[None] / np.maximum(sigma[:, None], 1e-6)) ** 2)
    kern[sigma < 1e-3] = (taps == 0)  # no blur
    kern = torch.from_numpy(kern / kern.sum(1, keepdims=True)).float().repeat_interleave(3, 0)  # [N * 3, 2r + 1]
    y = F.pad(y.reshape(1, n * 3, h, w), [radius] * 4, mode="replicate")
    y = F.conv2d(y, kern.view(n * 3, 1, -1, 1), groups=n * 3)
    y = F.conv2d(y, kern.view(n * 3, 1, 1, -1), groups=n * 3).view(n, 3, h, w)
    y = y + torch.from_numpy(noise) * torch.from_numpy(noise_std).float()
    y = y.clamp(-1, 1)
    for i in np.flatnonzero(jpeg_on):
        u8 = ((y[i] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        buf = io.BytesIO()
        Image.fromarray(u8).save(buf, format="JPEG", quality=int(quality[i]))
        back = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32)
        y[i] = torch.from_numpy(back).permute(2, 0, 1) / 127.5 - 1
    return y.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Scenes, images, labels


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, S, S, 3] -> float [N, 3, S, S] in [-1, 1] (as shards are decoded)."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def scene_of(rng: np.random.Generator, image_size: int, many: float, heldout: float) -> Scene:
    """A scene of the recogniser's mix: with probability `heldout` a heldout-split scene (a held-out
    pair first or a group of four), with probability `many` up to nine objects, else up to four."""
    u = rng.random()
    if u < heldout:
        return split_scene(rng, "heldout", image_size, 4)
    return sample_scene(rng, image_size, GRID * GRID if u < heldout + many else 4)


def scenes_and_images(image_size: int, n: int, seed: int, stream: int, many: float = 0.15,
                      heldout: float = 0.2) -> tuple[list[Scene], torch.Tensor]:
    """n scenes drawn from np.random.default_rng([seed, stream, i]) and their renders [N, 3, S, S]."""
    scenes = [scene_of(np.random.default_rng([seed, stream, i]), image_size, many, heldout) for i in range(n)]
    images = np.stack([render(s, image_size) for s in scenes])
    return scenes, to_tensor(images)


def eval_set(image_size: int, n: int = 2000, seed: int = EVAL_SEED) -> tuple[list[Scene], torch.Tensor]:
    """Held-out scenes (a stream the recogniser never trains on) and their clean renders."""
    return scenes_and_images(image_size, n, seed, EVAL_STREAM)


def labels(scenes: list[Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """(what [N, 9]: 0 empty, 1 + shape index; colour [N, 9]: colour index, -100 at empty cells)."""
    what = torch.zeros(len(scenes), CELLS, dtype=torch.long)
    colour = torch.full((len(scenes), CELLS), -100, dtype=torch.long)
    for i, s in enumerate(scenes):
        for t in s.things:
            what[i, t.cell] = 1 + SHAPES.index(t.shape)
            colour[i, t.cell] = COLOUR_NAMES.index(t.colour)
    return what, colour


# ---------------------------------------------------------------------------------------------
# The network


class ShapesCNN(nn.Module):
    """Three 3x3 convs (a 2x2 max pool after the first), an adaptive average pool to the 3x3 grid, a
    dense layer per cell, a 1x1 embedding per cell and 1x1 heads per cell: "what" (empty or a shape)
    and colour. Any input side works (the adaptive pool makes the grid); `stride` 2 in the first conv
    keeps 48..64-pixel images as cheap as 32-pixel ones, and images under 24 pixels skip the max pool
    (their objects are 3..5 pixels wide). With `sub` > 1 the pool makes a (3 * sub)-
    square grid aligned with the cells and the dense layer reads each cell's sub x sub block (where in
    its cell an object sits kept): no more accurate at 32 pixels than sub = 1, and slower."""

    def __init__(self, widths: tuple[int, ...] = (32, 48, 64), embed: int = 16, sub: int = 1, hidden: int = 64,
                 stride: int = 1, max_pool: bool = True):
        super().__init__()
        c1, c2, c3 = widths
        self.trunk = nn.Sequential(
            nn.Conv2d(3, c1, 3, padding=1, stride=stride), nn.ReLU(), nn.MaxPool2d(2) if max_pool else nn.Identity(),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(GRID * sub),  # one bin per cell (sub x sub bins per cell)
            nn.Conv2d(c3, hidden, sub, stride=sub), nn.ReLU(),  # [N, hidden, 3, 3]: one vector per grid cell
        )
        self.embed = nn.Conv2d(hidden, embed, 1)
        self.what = nn.Conv2d(embed, 1 + len(SHAPES), 1)
        self.colour = nn.Conv2d(embed, len(COLOURS), 1)

    def cells(self, x: torch.Tensor) -> torch.Tensor:
        """Per-cell embeddings before their ReLU: [N, embed, 3, 3]."""
        return self.embed(self.trunk(x))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, 3, S, S] in [-1, 1] -> (what logits [N, 1 + shapes, 9], colour logits [N, colours, 9])."""
        h = F.relu(self.cells(x))
        return self.what(h).flatten(2), self.colour(h).flatten(2)


@dataclass(frozen=True)
class RecogniserSpec:
    """Everything that decides the recogniser's weights besides code and renderer (all in the cache key)."""
    scenes: int = 16000
    epochs: int = 4
    batch_size: int = 8  # many small steps: batches of 128 in the same time read shape at 0.45-0.62
    lr: float = 5e-3
    weight_decay: float = 1e-4
    widths: tuple[int, ...] = (32, 48, 64)
    embed: int = 16  # features: 9 cells x embed
    sub: int = 1
    hidden: int = 64
    what_weight: float = 5.0  # the "what" loss's weight against colour's: shape is the slow one to learn
    clean: float = 0.3  # fraction of each epoch's images left clean; the rest degraded with a fresh seed
    many: float = 0.15  # scenes of up to nine objects (counts above four)
    heldout: float = 0.2  # heldout-split scenes (held-out pairs first, groups of four)
    seed: int = 0


def make_net(image_size: int, spec: RecogniserSpec) -> ShapesCNN:
    """The net for an image size: the convs after the first see 8..16 pixels a side (a stride-2 first
    conv from 48 pixels up, no max pool under 24), so every size costs about as much as 32 pixels."""
    return ShapesCNN(spec.widths, spec.embed, spec.sub, spec.hidden, stride=2 if image_size >= 48 else 1,
                     max_pool=image_size >= 24)


def loss_of(net: ShapesCNN, x: torch.Tensor, what: torch.Tensor, colour: torch.Tensor,
            what_weight: float = 1.0) -> torch.Tensor:
    """Cross-entropy on "what" over all nine cells (times `what_weight`) plus colour cross-entropy on
    occupied cells."""
    w, c = net(x)
    return what_weight * F.cross_entropy(w, what) + F.cross_entropy(c, colour, ignore_index=-100)


def train_recogniser(image_size: int, spec: RecogniserSpec) -> ShapesCNN:
    """AdamW with a one-cycle schedule, one thread, deterministic algorithms, seeded init, data and
    batch order: the same inputs give bit-identical weights. Each epoch degrades the images with a
    fresh seed and keeps a `clean` fraction of them clean. The caller's RNG state, thread count and
    determinism setting are restored afterwards."""
    with deterministic_cpu():
        scenes, x = scenes_and_images(image_size, spec.scenes, spec.seed, TRAIN_STREAM, spec.many, spec.heldout)
        what, colour = labels(scenes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            net = make_net(image_size, spec)
            opt = torch.optim.AdamW(net.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
            steps = spec.epochs * -(-len(x) // spec.batch_size)
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=spec.lr, total_steps=steps, pct_start=0.2)
            order = torch.Generator().manual_seed(spec.seed)
            net.train()
            for epoch in range(spec.epochs):
                xd = degrade(x, seed=spec.seed * 1000 + epoch)
                keep = torch.rand(len(x), generator=order) < spec.clean
                xe = torch.where(keep.view(-1, 1, 1, 1), x, xd)
                for idx in torch.randperm(len(x), generator=order).split(spec.batch_size):
                    loss = loss_of(net, xe[idx], what[idx], colour[idx], spec.what_weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
    return net.eval()


# the code that decides the weights (part of the cache key), and the renderer's
_CODE = "".join(inspect.getsource(obj) for obj in (deterministic_cpu, degrade, to_tensor, scene_of, scenes_and_images,
                                                     labels, ShapesCNN, make_net, loss_of, train_recogniser)).encode()
_WORLD = "".join(inspect.getsource(getattr(world, name)) for name in (
    "sample_scene", "split_scene", "render", "_filled", "_held_out", "groups", "_background", "_polygon")
    if callable(getattr(world, name, None))).encode()


def _key(image_size: int, spec: RecogniserSpec) -> str:
    """Hash of the code, the world (its code, palette and a few renders: a renderer that draws
    differently retrains), the image size and the hyperparameters."""
    h = hashlib.sha256()
    h.update(_CODE)
    h.update(_WORLD)
    h.update(json.dumps({"image_size": image_size, "shapes": SHAPES, "colours": COLOURS, "held_out": world.HELD_OUT,
                         "grid": GRID, **asdict(spec)}, sort_keys=True).encode())
    _, probe = scenes_and_images(image_size, 16, spec.seed, TRAIN_STREAM, spec.many, spec.heldout)
    h.update(probe.numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Reading images back


def _check(x: torch.Tensor, image_size: int, who: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != (3, image_size, image_size):
        raise ValueError(f"{who} reads RGB images [N, 3, {image_size}, {image_size}] in [-1, 1], got {list(x.shape)}")


def decode(what: torch.Tensor, colour: torch.Tensor) -> list[list[Seen]]:
    """Per-cell class indices (what [N, 9], colour [N, 9]) -> objects per image, sorted by cell."""
    out = []
    for w, c in zip(what.tolist(), colour.tolist()):
        out.append([Seen(SHAPES[wi - 1], COLOUR_NAMES[ci], cell) for cell, (wi, ci) in enumerate(zip(w, c)) if wi > 0])
    return out


class Recogniser:
    """The trained recogniser: `read(x)` -> objects per image, `features(x)` [N, 9 * embed] (a feature
    net for Frechet distance), `logits(x)`; `table` holds its accuracy (see `measure_all`)."""

    def __init__(self, net: ShapesCNN, name: str, image_size: int, table: dict, train_seconds: float, path: Path):
        self.net, self.name, self.image_size = net, name, image_size
        self.table, self.train_seconds, self.path = table, train_seconds, path

    @torch.no_grad()
    def _run(self, fn, x: torch.Tensor, batch: int = 1024):
        _check(x, self.image_size, f"the shapes recogniser ({self.name})")
        outs = [fn(x[i:i + batch].float().cpu()) for i in range(0, max(len(x), 1), batch)]
        return tuple(torch.cat(p) for p in zip(*outs)) if isinstance(outs[0], tuple) else torch.cat(outs)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] in [-1, 1] -> [N, 9 * embed] float32: the per-cell embeddings before their ReLU."""
        return self._run(lambda b: self.net.cells(b).flatten(1), x)

    def logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what [N, 1 + shapes, 9], colour [N, colours, 9])."""
        return self._run(self.net, x)

    def read(self, x: torch.Tensor) -> list[list[Seen]]:
        """The objects of each image, sorted by cell."""
        w, c = self.logits(x)
        return decode(w.argmax(1), c.argmax(1))


# ---------------------------------------------------------------------------------------------
# The analytic parser


_PALETTE = np.array([COLOURS[c] for c in COLOUR_NAMES], dtype=np.float32) / 127.5 - 1  # [colours, 3]


def analytic_read(x: torch.Tensor, threshold: float = 0.5, min_fraction: float = 0.05) -> list[list[Seen]]:
    """Colour and place of the objects of each image [N, 3, S, S] in [-1, 1], with no learning.
    The background is the median of the image's grey, not bright pixels (the world's backgrounds are
    grey at levels 20..109 of 255; every colour but white is saturated, and white is brighter); a
    pixel farther than `threshold` from it (RGB distance) belongs to an object. A cell holds an object
    where at least `min_fraction` of its interior (the cell less a margin of S/32 pixels, where blur
    spills a neighbour's edge) does, and at least 2 pixels; the object's colour is the COLOURS entry
    nearest to the median of its most distinct half of pixels in the cell. shape is None."""
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise ValueError(f"analytic_read reads RGB images [N, 3, S, S] in [-1, 1], got {list(x.shape)}")
    x = x.detach().float().cpu()
    n, _, s, _ = x.shape
    flat = x.flatten(2)  # [N, 3, S*S]
    grey = ((flat.amax(1) - flat.amin(1)) < 0.3) & (flat.mean(1) < 0.4)  # [N, S*S]
    bg = torch.where(grey[:, None], flat, torch.full_like(flat, float("nan"))).nanmedian(2).values  # [N, 3]
    bg = torch.where(bg.isnan(), flat.median(2).values, bg)  # no grey pixel at all: the median pixel
    dist = (x - bg[:, :, None, None]).norm(dim=1).numpy()  # [N, S, S]
    pixels = x.permute(0, 2, 3, 1).numpy()
    edges = np.arange(GRID + 1) * s / GRID
    margin = max(1, round(s / 32))
    centre = np.arange(s) + 0.5
    cell_of = np.minimum(np.floor(centre * GRID / s).astype(int), GRID - 1)
    inner = np.abs(centre[:, None] - edges[None]).min(1) > margin  # [S]: farther than the margin from any edge
    cell_px = cell_of[:, None] * GRID + cell_of[None, :]  # [S, S] cell of each pixel
    inner_px = inner[:, None] & inner[None, :]
    need = max(2.0, min_fraction * (inner_px & (cell_px == 0)).sum())
    obj = dist > threshold
    out = []
    for i in range(n):
        seen = []
        for cell in range(CELLS):
            here = cell_px == cell
            if (obj[i] & here & inner_px).sum() < need:
                continue
            d = dist[i][obj[i] & here]
            core = pixels[i][obj[i] & here][d >= np.median(d)]
            rgb = np.median(core, axis=0)
            seen.append(Seen(None, COLOUR_NAMES[int(((_PALETTE - rgb) ** 2).sum(1).argmin())], cell))
        out.append(seen)
    return out


# ---------------------------------------------------------------------------------------------
# Accuracy


def measure(reads: list[list[Seen]], scenes: list[Scene]) -> dict:
    """Accuracy of objects read against the scenes' truth: shape, colour (per true object: its cell
    read with the right shape / colour; shape left out where the reader tells none), place (per scene:
    the set of occupied cells exactly), count (per scene: the number of objects exactly)."""
    if len(reads) != len(scenes):
        raise ValueError(f"{len(reads)} reads for {len(scenes)} scenes")
    objects = shape = colour = place = count = 0
    with_shape = any(o.shape is not None for r in reads for o in r)
    for seen, scene in zip(reads, scenes):
        at = {o.cell: o for o in seen}
        for t in scene.things:
            o = at.get(t.cell)
            objects += 1
            shape += o is not None and o.shape == t.shape
            colour += o is not None and o.colour == t.colour
        place += set(at) == {t.cell for t in scene.things}
        count += len(seen) == len(scene.things)
    objects, n = max(objects, 1), max(len(scenes), 1)
    out = {"shape": shape / objects} if with_shape else {}
    return out | {"colour": colour / objects, "place": place / n, "count": count / n}


def agreement(a: list[list[Seen]], b: list[list[Seen]]) -> dict:
    """How far two readers agree, with no ground truth: over the objects either reads (cells either
    calls occupied), colour: both read an object there of the same colour; place: both read an object
    there; count (per image): both read as many objects."""
    objects = colour = place = count = 0
    for ra, rb in zip(a, b, strict=True):
        ca, cb = {o.cell: o.colour for o in ra}, {o.cell: o.colour for o in rb}
        for cell in set(ca) | set(cb):
            objects += 1
            place += cell in ca and cell in cb
            colour += cell in ca and cell in cb and ca[cell] == cb[cell]
        count += len(ra) == len(rb)
    return {"colour": colour / max(objects, 1), "place": place / max(objects, 1), "count": count / max(len(a), 1)}


def measure_all(rec: Recogniser | ShapesCNN, scenes: list[Scene], x: torch.Tensor,
                degrade_seed: int = EVAL_DEGRADE_SEED) -> dict:
    """The accuracy table of a recogniser (or a bare net) on scenes and their clean renders x, and on x
    degraded with `degrade_seed`: {"recogniser": {"clean": ..., "degraded": ...}, "analytic": {...},
    "agreement": {...}, "n_scenes", "n_objects", "degrade_seed"}."""
    if isinstance(rec, ShapesCNN):
        rec = Recogniser(rec, "unsaved", x.shape[-1], {}, 0.0, Path())
    table = {"recogniser": {}, "analytic": {}, "agreement": {}, "n_scenes": len(scenes),
             "n_objects": sum(len(s.things) for s in scenes), "degrade_seed": degrade_seed}
    for kind, images in (("clean", x), ("degraded", degrade(x, degrade_seed))):
        ours, theirs = rec.read(images), analytic_read(images)
        table["recogniser"][kind] = measure(ours, scenes)
        table["analytic"][kind] = measure(theirs, scenes)
        table["agreement"][kind] = agreement(ours, theirs)
    return table


def recogniser_table(rec: Recogniser | dict) -> str:
    """The accuracy table as plain text: recogniser and analytic parser, clean and degraded, and their
    agreement."""
    t = rec if isinstance(rec, dict) else rec.table
    cols = ("shape", "colour", "place", "count")
    head = f"{'reader':<12}{'images':<10}" + "".join(f"{c:>8}" for c in cols)
    lines = [head, "-" * len(head)]
    for row in ("recogniser", "analytic", "agreement"):
        for kind in ("clean", "degraded"):
            vals = t[row][kind]
            lines.append(f"{row:<12}{kind:<10}" + "".join(f"{vals[c]:>8.4f}" if c in vals else f"{'-':>8}" for c in cols))
    lines.append(f"{t['n_scenes']} held-out scenes, {t['n_objects']} objects; shape, colour per object, place, count "
                 f"per scene; agreement per object read by either (colour, place) and per scene (count)")
    if not isinstance(rec, dict):
        lines.append(f"{rec.name}: trained in {rec.train_seconds} s")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loading, training, caching


def shapes_recogniser(image_size: int = 32, directory: str | Path | None = None, retrain: bool = False,
                      spec: RecogniserSpec = RecogniserSpec()) -> Recogniser:
    """The shapes recogniser for `image_size`: loaded from `<directory>/recogniser-<hash>.safetensors`
    (default: $DTRAIN_CACHE or ~/.cache/dtrain, then the weights shipped in the package), else trained
    (about 85 s on one thread at 32x32, two minutes at 64), measured on held-out renders (`measure_all`
    on `eval_set`) and written to the directory atomically."""
    if not world.SIZES[0] <= image_size <= world.SIZES[1]:
        raise ValueError(f"image_size {image_size}: the shapes world renders {world.SIZES[0]} to {world.SIZES[1]} pixels")
    key = _key(image_size, spec)
    path = Path(directory or cache_dir()) / f"recogniser-{key}.safetensors"
    if not path.is_file() and directory is None and (BUNDLED / path.name).is_file():
        path = BUNDLED / path.name
    name = f"shapes{image_size}-{key}"
    net, info = make_net(image_size, spec), None
    if path.is_file() and not retrain:
        try:
            net.load_state_dict(load_file(str(path)))
            with safe_open(str(path), framework="pt") as f:
                info = json.loads(f.metadata()[METADATA_KEY])
            net.eval()
        except Exception as e:  # an unreadable cache file is retrained over, never trusted
            warnings.warn(f"retraining the shapes recogniser: cached {path} is unreadable ({e})")
            info = None
    if info is None:
        start = time.perf_counter()
        net = train_recogniser(image_size, spec)
        seconds = time.perf_counter() - start
        scenes, x = eval_set(image_size)
        table = measure_all(net, scenes, x)
        info = {"table": table, "train_seconds": round(seconds, 2), "image_size": image_size, "spec": asdict(spec),
                "torch": torch.__version__}
        if path.parent == BUNDLED:  # retrained: into the cache, never over the package's file
            path = cache_dir() / path.name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # atomic: concurrent trainers never see half a file
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp),
                  metadata={"format": "pt", METADATA_KEY: json.dumps(info)})
        os.replace(tmp, path)
    return Recogniser(net, name, image_size, info["table"], info["train_seconds"], path)

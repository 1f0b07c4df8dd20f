"""The shapes world: RGB scenes of coloured shapes with exact ground truth, captioned from a small
grammar, written as shards in img2dataset's WebDataset layout (what users' caption data comes in).

A scene holds 1 to `max_objects` objects, each a shape in a colour, in its own cell of a 3x3 grid
(jittered inside the cell, so objects never overlap), on a plain or textured grey background.
Everything is drawn from a generator seeded by (seed, split, shard, index): the same arguments give
the same bytes on every machine, and the world has no end (any number of shards).

A sample is `{__key__, png, txt, json, cls}`: the render, its caption, the scene as JSON (objects
with shape, colour, cell and pixel box; background) and `cls`, the class of the caption's first
object (colour-major: colour * len(SHAPES) + shape), for class-conditional models.

Captions come from a grammar that parses back into the objects it was written from:

    caption := group ("," group)* " and " group | group
    group   := count colour shape[s] [place]
    count   := "a" | "an" | "two" | "three" | "four"
    place   := "at the" CELL         (a single object: its cell)
             | "on the left" | "on the right" | "at the top" | "at the bottom"   (a group in one column/row)

A group is the objects of one colour and shape; a group of several objects that do not share a
column or row of the grid is captioned without a place. `parse_caption` gives back one object per
counted thing, with the cells its place allows (None: anywhere).

Held-out compositions (`HELD_OUT`): some colour-shape pairs and one count never appear in the
train and val splits; the `heldout` split holds scenes that contain at least one of them.
`dataset.json` next to the shards records the world (palette, shapes, held-out, splits).
"""
from __future__ import annotations

import io
import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, ImageDraw

from dtrain.data.shards import DataError, encode_png

SHAPES = ("circle", "square", "triangle", "cross", "diamond")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "cross": "crosses",
           "diamond": "diamonds"}
# Saturated and far apart in RGB, so blur, noise and a colour shift leave each one nearest to itself.
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 220, 40),
           "magenta": (215, 55, 215), "cyan": (40, 215, 225), "white": (245, 245, 245), "orange": (245, 140, 25)}
COLOUR_NAMES = tuple(COLOURS)
GRID = 3
CELLS = ("top left", "top middle", "top right", "middle left", "center", "middle right",
         "bottom left", "bottom middle", "bottom right")  # cell = row * GRID + col
REGIONS = {"on the left": (0, 3, 6), "on the right": (2, 5, 8), "at the top": (0, 1, 2),
           "at the bottom": (6, 7, 8)}
COUNTS = ("zero", "a", "two", "three", "four")
SPLITS = ("train", "val", "heldout")
META_FILE = "dataset.json"
# Pairs and counts the train and val splits never show (the heldout split always does).
HELD_OUT = {"pairs": (("green", "circle"), ("yellow", "square"), ("magenta", "triangle"), ("cyan", "cross"),
                      ("orange", "diamond")),
            "counts": (4,)}
SIZES = (16, 64)  # image sides the renderer supports


class CaptionError(DataError):
    """Text that is not a caption of the shapes grammar."""


@dataclass(frozen=True)
class Thing:
    """One object of a scene: shape and colour names, grid cell, box (x0, y0, x1, y1) in pixels."""
    shape: str
    colour: str
    cell: int
    box: tuple[float, float, float, float]


@dataclass(frozen=True)
class Seen:
    """An object read back from an image (by the recogniser or the analytic parser)."""
    shape: str | None  # None where a reader tells colour and place only (the analytic parser)
    colour: str
    cell: int


@dataclass(frozen=True)
class Scene:
    things: tuple[Thing, ...]
    background: dict = field(default_factory=dict)  # {"kind", "level", "contrast", "period"}

    def to_json(self) -> dict:
        return {"objects": [{**asdict(t), "box": list(t.box)} for t in self.things], "background": self.background}


def class_of(colour: str, shape: str) -> int:
    """The class index of a colour-shape pair (colour-major)."""
    return COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)


def class_name(label: int) -> str:
    return f"{COLOUR_NAMES[label // len(SHAPES)]} {SHAPES[label % len(SHAPES)]}"


NUM_CLASSES = len(COLOURS) * len(SHAPES)


# ---------------------------------------------------------------------------------------------
# Sampling scenes


def _held_out(scene: Scene) -> bool:
    pairs = {(t.colour, t.shape) for t in scene.things}
    return bool(pairs & set(HELD_OUT["pairs"])) or any(len(g) in HELD_OUT["counts"] for g in groups(scene.things))


def sample_scene(rng: np.random.Generator, image_size: int, max_objects: int = 4, repeat: float = 0.35) -> Scene:
    """A random scene: 1..max_objects objects in distinct cells; each object repeats the previous
    one's colour and shape with probability `repeat`, so groups (counting) are common."""
    n = int(rng.integers(1, max_objects + 1))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    cell_px = image_size / GRID
    things, prev = [], None
    for cell in cells:
        if prev is not None and rng.random() < repeat:
            shape, colour = prev
        else:
            shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOUR_NAMES[rng.integers(len(COLOURS))]
        side = cell_px * rng.uniform(0.6, 0.9)
        slack = cell_px - side  # jitter within the cell: never across its edges, so no overlaps
        r, c = divmod(int(cell), GRID)
        x0, y0 = c * cell_px + rng.uniform(0, slack), r * cell_px + rng.uniform(0, slack)
        things.append(Thing(shape, colour, int(cell), tuple(round(float(v), 3) for v in (x0, y0, x0 + side, y0 + side))))
        prev = (shape, colour)
    kind = ("plain", "stripes", "checker", "noise")[rng.integers(4)]
    background = {"kind": kind, "level": int(rng.integers(20, 90)), "contrast": int(rng.integers(6, 20)),
                  "period": int(rng.integers(2, 6)), "seed": int(rng.integers(2**31))}
    return Scene(tuple(things), background)


def split_scene(rng: np.random.Generator, split: str, image_size: int, max_objects: int = 4) -> Scene:
    """A scene of a split: train/val reject held-out compositions; heldout forces one in."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: one of {SPLITS}")
    while True:
        scene = sample_scene(rng, image_size, max_objects)
        if split != "heldout" and not _held_out(scene):
            return scene
        if split == "heldout":
            if rng.random() < 0.5 and max_objects >= max(HELD_OUT["counts"]):  # a held-out count: a group of 4
                colour, shape = COLOUR_NAMES[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]
                scene = Scene(_filled(rng, image_size, max(HELD_OUT["counts"]), colour, shape), scene.background)
            else:  # a held-out pair as the first object
                colour, shape = HELD_OUT["pairs"][rng.integers(len(HELD_OUT["pairs"]))]
                first = scene.things[0]
                scene = Scene((Thing(shape, colour, first.cell, first.box),) + scene.things[1:], scene.background)
            return scene


def _filled(rng: np.random.Generator, image_size: int, n: int, colour: str, shape: str) -> tuple[Thing, ...]:
    """n objects of one colour and shape in distinct random cells."""
    base = sample_scene(rng, image_size, max_objects=GRID * GRID, repeat=0.0)
    while len(base.things) < n:
        base = sample_scene(rng, image_size, max_objects=GRID * GRID, repeat=0.0)
    return tuple(Thing(shape, colour, t.cell, t.box) for t in base.things[:n])


# ---------------------------------------------------------------------------------------------
# Rendering

SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges


def _background(bg: dict, size: int) -> np.ndarray:
    """uint8 [size, size, 3] grey background: plain, stripes, checker or value noise."""
    level, contrast, period = bg["level"], bg["contrast"], bg["period"]
    yy, xx = np.mgrid[0:size, 0:size]
    if bg["kind"] == "stripes":
        v = level + contrast * (((xx + yy) // period) % 2)
    elif bg["kind"] == "checker":
        v = level + contrast * (((xx // period) + (yy // period)) % 2)
    elif bg["kind"] == "noise":
        v = level + np.random.default_rng(bg["seed"]).integers(0, contrast + 1, size=(size, size))
    else:
        v = np.full((size, size), level)
    return np.repeat(np.clip(v, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _polygon(shape: str, x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]] | None:
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "cross":
        a, b = w * 0.17, h * 0.17  # arm half-widths: thin enough to read as a cross at 32 pixels
        return [(cx - a, y0), (cx + a, y0), (cx + a, cy - b), (x1, cy - b), (x1, cy + b), (cx + a, cy + b),
                (cx + a, y1), (cx - a, y1), (cx - a, cy + b), (x0, cy + b), (x0, cy - b), (cx - a, cy - b)]
    return None


def render(scene: Scene, image_size: int) -> np.ndarray:
    """uint8 [S, S, 3] image of a scene."""
    if not SIZES[0] <= image_size <= SIZES[1]:
        raise ValueError(f"image_size {image_size} outside the supported {SIZES[0]}..{SIZES[1]}")
    big = image_size * SUPERSAMPLE
    shapes = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    draw = ImageDraw.Draw(shapes)
    for t in scene.things:
        box = [v * SUPERSAMPLE for v in t.box]
        fill = COLOURS[t.colour] + (255,)
        poly = _polygon(t.shape, *box)
        if poly:
            draw.polygon(poly, fill=fill)
        elif t.shape == "circle":
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    # PIL resizes RGBA premultiplied: edge pixels keep the shape's colour, their alpha is the coverage
    rgba = np.asarray(shapes.resize((image_size, image_size), Image.Resampling.BOX), dtype=np.float32)
    alpha = rgba[..., 3:] / 255.0
    base = _background(scene.background, image_size).astype(np.float32)
    out = base * (1 - alpha) + rgba[..., :3] * alpha
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# Captions


def groups(things) -> list[list]:
    """Objects grouped by (colour, shape), in order of each group's first object."""
    out: dict[tuple[str, str], list] = {}
    for t in things:
        out.setdefault((t.colour, t.shape), []).append(t)
    return list(out.values())


def _place(cells: list[int]) -> str | None:
    if len(cells) == 1:
        return f"at the {CELLS[cells[0]]}"
    for phrase, region in REGIONS.items():
        if set(cells) <= set(region):
            return phrase
    return None


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """The scene in words: one phrase per colour-shape group, places where the grammar has them."""
    phrases = []
    for g in groups(scene.things):
        colour, shape, n = g[0].colour, g[0].shape, len(g)
        words = f"{article(colour)} {colour} {shape}" if n == 1 else f"{COUNTS[n]} {colour} {PLURALS[shape]}"
        place = _place([t.cell for t in g])
        phrases.append(f"{words} {place}" if place else words)
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


_SINGULAR = {p: s for s, p in PLURALS.items()}
_PLACES = {f"at the {c}": (i,) for i, c in enumerate(CELLS)} | REGIONS
_GROUP = re.compile(r"^(a|an|two|three|four) ({c}) ({s})(?: ({p}))?$".format(
    c="|".join(COLOUR_NAMES), s="|".join(list(SHAPES) + list(PLURALS.values())),
    p="|".join(re.escape(p) for p in sorted(_PLACES, key=len, reverse=True))))


@dataclass(frozen=True)
class Wanted:
    """One object a caption asks for: shape, colour and the cells its place allows (None: anywhere)."""
    shape: str
    colour: str
    cells: tuple[int, ...] | None


def parse_caption(text: str) -> list[Wanted]:
    """A caption of the grammar -> one Wanted per object it counts; CaptionError names what does not parse."""
    text = text.strip().rstrip(".").lower()
    head, sep, last = text.rpartition(" and ")
    parts = (head.split(", ") + [last]) if sep else [text]
    wanted = []
    for part in parts:
        m = _GROUP.match(part.strip())
        if not m:
            raise CaptionError(f"caption {text!r}: {part!r} is not '<count> <colour> <shape> [place]' of the shapes "
                               f"grammar (colours {', '.join(COLOUR_NAMES)}; shapes {', '.join(SHAPES)})")
        count, colour, noun, place = m.groups()
        n = 1 if count in ("a", "an") else COUNTS.index(count)
        plural = noun in _SINGULAR
        if plural != (n > 1):
            raise CaptionError(f"caption {text!r}: {part!r}: count and noun disagree")
        cells = _PLACES[place] if place else None
        if cells is not None and len(cells) < n:
            raise CaptionError(f"caption {text!r}: {part!r}: {n} objects cannot share one cell")
        wanted += [Wanted(_SINGULAR.get(noun, noun), colour, cells)] * n
    return wanted


# ---------------------------------------------------------------------------------------------
# Shards


def scene_rng(seed: int, split: str, shard: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), shard, index])


def make_sample(seed: int, split: str, shard: int, index: int, image_size: int, max_objects: int = 4) -> dict:
    """One sample in img2dataset's layout (+ cls)."""
    scene = split_scene(scene_rng(seed, split, shard, index), split, image_size, max_objects)
    key = f"{SPLITS.index(split)}{shard:05d}{index:05d}"
    text = caption(scene)
    meta = {"key": key, "caption": text, "status": "success", "width": image_size, "height": image_size,
            "split": split, **scene.to_json()}
    return {"__key__": key, "png": encode_png(render(scene, image_size)), "txt": text.encode(),
            "json": json.dumps(meta).encode(), "cls": str(class_of(scene.things[0].colour, scene.things[0].shape)).encode()}


def write_shard(path: str, seed: int, split: str, shard: int, count: int, image_size: int, max_objects: int) -> str:
    """One shard, written to a temporary name and renamed (a reader never sees half a shard); byte for byte
    the same on every run."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as sink:  # mtime fixed: the same bytes every run
        for i in range(count):
            sink.write(make_sample(seed, split, shard, i, image_size, max_objects))
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class ShapesSpec:
    image_size: int = 32
    train_shards: int = 8
    per_shard: int = 1000
    val: int = 2000
    heldout: int = 1000
    max_objects: int = 4
    seed: int = 0

    def check(self) -> None:
        if not SIZES[0] <= self.image_size <= SIZES[1]:
            raise DataError(f"image_size {self.image_size}: the shapes world renders {SIZES[0]} to {SIZES[1]} pixels")
        if not 1 <= self.max_objects <= GRID * GRID:
            raise DataError(f"max_objects {self.max_objects}: 1 to {GRID * GRID} (one object per grid cell)")
        if min(self.train_shards, self.per_shard) < 1 or min(self.val, self.heldout) < 0:
            raise DataError("train_shards and per_shard must be >= 1, val and heldout >= 0")


def shard_plan(spec: ShapesSpec, out: Path) -> list[tuple]:
    """(path, seed, split, shard, count, image_size, max_objects) for every shard: train shards of
    per_shard samples; val and heldout split into shards of at most per_shard."""
    plan = [(str(out / f"train-{i:06d}.tar"), spec.seed, "train", i, spec.per_shard) for i in range(spec.train_shards)]
    for split, total in (("val", spec.val), ("heldout", spec.heldout)):
        for i, start in enumerate(range(0, total, spec.per_shard)):
            plan.append((str(out / f"{split}-{i:06d}.tar"), spec.seed, split, i, min(spec.per_shard, total - start)))
    return [p + (spec.image_size, spec.max_objects) for p in plan]


def world_meta(spec: ShapesSpec, shards: dict[str, list[str]]) -> dict:
    return {"world": "shapes", "version": 1, **asdict(spec), "shapes": list(SHAPES),
            "colours": {k: list(v) for k, v in COLOURS.items()}, "grid": GRID, "cells": list(CELLS),
            "regions": {k: list(v) for k, v in REGIONS.items()}, "num_classes": NUM_CLASSES,
            "classes": [class_name(k) for k in range(NUM_CLASSES)],
            "held_out": {"pairs": [list(p) for p in HELD_OUT["pairs"]], "counts": list(HELD_OUT["counts"])},
            "splits": {k: [os.path.basename(p) for p in v] for k, v in shards.items()}}


def write_shapes(out: str | Path, spec: ShapesSpec = ShapesSpec(), use_ray: bool = True) -> dict[str, list[str]]:
    """Every shard of the spec, one Ray task each (in this process when use_ray is False: same bytes),
    and OUT/dataset.json. Returns {split: [shard paths]}."""
    spec.check()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = shard_plan(spec, out)
    if use_ray:
        from dtrain.runtime import run_tasks

        paths = run_tasks(write_shard, plan, desc="shapes shards")
    else:
        paths = [write_shard(*p) for p in plan]
    shards = {split: [p for p, a in zip(paths, plan) if a[2] == split] for split in SPLITS}
    tmp = out / f".{META_FILE}.tmp"
    tmp.write_text(json.dumps(world_meta(spec, shards), indent=1))
    os.replace(tmp, out / META_FILE)
    return shards


def read_meta(directory: str | Path) -> dict:
    """OUT/dataset.json of `dtrain data shapes`; DataError when the directory holds none."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise DataError(f"{path} not found: not a shapes world directory (write one with `dtrain data shapes`)")
    meta = json.loads(path.read_text())
    if meta.get("world") != "shapes":
        raise DataError(f"{path} describes world {meta.get('world')!r}, not 'shapes'")
    return meta


def scene_from_json(meta: dict) -> Scene:
    """The Scene a sample's json holds."""
    things = tuple(Thing(o["shape"], o["colour"], int(o["cell"]), tuple(o["box"])) for o in meta["objects"])
    return Scene(things, meta.get("background", {}))


def image_of(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))

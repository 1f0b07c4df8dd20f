"""Evaluate images of the shapes world against the captions they were asked for.

Each image is read back into objects by a reader (the recogniser, or for tests the scenes' own
ground truth) and compared with the objects its caption asks for (`parse_caption`). Asked and seen
objects are paired by an optimal assignment (Hungarian, on the number of attributes that agree, so
a wrong colour is scored as a wrong colour and not as a missing object plus an extra one). Figures:

- shape_acc, colour_acc: fraction of asked objects whose paired seen object has that attribute
  (an asked object left unpaired counts wrong);
- place_acc: the same for the asked objects whose caption names a place (cell or row/column);
- count_acc: fraction of images in which every shape the caption names is seen exactly as many
  times as asked, and nothing else is seen (GenEval's counting, with extra objects counted);
- binding_acc: fraction of images in which every asked object is seen with its shape, colour and
  place and no other object is seen;
- fd: squared Frechet distance (`dtrain.eval.frechet`) in the recogniser's features against real
  renders of the same distribution, beside its noise floor (real against real, at the same n) and
  a bootstrap confidence interval over the samples.

Real renders are drawn from the world's generator with the validation split's distribution, at
shard numbers the writer never uses (`REFERENCE_SHARD` on), so references of any size exist and
never coincide with a written validation image.
"""
from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import ray
import torch
from scipy.optimize import linear_sum_assignment

from dtrain.checkpoint import read_meta, read_tokenizer, resolve
from dtrain.data.shapes import (HELD_OUT, META_FILE, NUM_CLASSES, Seen, Wanted, article, caption, class_name,
                                class_of, parse_caption, read_meta as read_world, render, scene_rng, split_scene)
from dtrain.data.shards import MissingField, caption_of, decode_sample, expand_urls, tar_samples
from dtrain.diffusion.samplers import nfe
from dtrain.eval import eval_seeds
from dtrain.eval.digits import _cached_model, _eval_chunk, as_stored
from dtrain.eval.frechet import frechet_distance, gaussian_stats
from dtrain.eval.recogniser import shapes_recogniser
from dtrain.generation import conditions, image_shape

REFERENCE_SHARD = 1_000_000  # reference renders use val-split seeds from this shard number on
ATTRIBUTES = ("shape", "colour", "place")


def _agree(w: Wanted, s: Seen) -> tuple[bool, bool, bool]:
    return w.shape == s.shape, w.colour == s.colour, w.cells is None or s.cell in w.cells


def score_image(wanted: Sequence[Wanted], seen: Sequence[Seen]) -> dict:
    """Per-image figures: counts of right attributes among the asked objects, count and binding (bools)."""
    pairs: list[tuple[Wanted, Seen | None]] = [(w, None) for w in wanted]
    if wanted and seen:
        gain = np.array([[sum(_agree(w, s)) + 1 for s in seen] for w in wanted])  # +1: pairing beats leaving out
        rows, cols = linear_sum_assignment(gain, maximize=True)
        for r, c in zip(rows, cols):
            pairs[r] = (wanted[r], seen[c])
    right = {a: 0 for a in ATTRIBUTES}
    placed = sum(w.cells is not None for w in wanted)
    for w, s in pairs:
        if s is None:
            continue
        ok = _agree(w, s)
        right["shape"] += ok[0]
        right["colour"] += ok[1]
        right["place"] += ok[2] and w.cells is not None
    count = Counter(w.shape for w in wanted) == Counter(s.shape for s in seen)
    binding = len(seen) == len(wanted) and all(s is not None and all(_agree(w, s)) for w, s in pairs)
    return {"objects": len(wanted), "placed": placed, **right, "count": count, "binding": binding}


def score(captions: Sequence[str], seen: Sequence[Sequence[Seen]]) -> dict:
    """Figures over images (module docstring): captions[i] is what image i was asked for, seen[i] what
    a reader found in it."""
    if len(captions) != len(seen):
        raise ValueError(f"{len(captions)} captions for {len(seen)} images")
    per = [score_image(parse_caption(c), s) for c, s in zip(captions, seen)]
    objects, placed = sum(p["objects"] for p in per), sum(p["placed"] for p in per)
    return {"n": len(per), "objects": objects,
            "shape_acc": sum(p["shape"] for p in per) / max(objects, 1),
            "colour_acc": sum(p["colour"] for p in per) / max(objects, 1),
            "place_acc": sum(p["place"] for p in per) / placed if placed else None,
            "count_acc": float(np.mean([p["count"] for p in per])) if per else 0.0,
            "binding_acc": float(np.mean([p["binding"] for p in per])) if per else 0.0}


def reference_scenes(n: int, image_size: int, seed: int = 0, max_objects: int = 4, offset: int = 0):
    """n validation-distribution scenes at shard numbers the writer never uses; `offset` picks a
    disjoint set (the noise floor compares two)."""
    shard = REFERENCE_SHARD + offset
    return [split_scene(scene_rng(seed, "val", shard + i // 100_000, i % 100_000), "val", image_size, max_objects)
            for i in range(n)]


def as_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 [H, W, 3] images -> [N, 3, H, W] in [-1, 1], as the shard reader gives them."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


def reference_images(n: int, image_size: int, seed: int = 0, max_objects: int = 4, offset: int = 0) -> torch.Tensor:
    return as_tensor([render(s, image_size) for s in reference_scenes(n, image_size, seed, max_objects, offset)])


def bootstrap_fd(features: torch.Tensor, ref: tuple[np.ndarray, np.ndarray], rounds: int = 20, seed: int = 0,
                 z: float = 1.645) -> tuple[float, float]:
    """A 90% interval (z = 1.645) for FD at this n from the samples drawn: FD +- z times the standard
    deviation of FD over `rounds` resamples (with replacement) of the samples' features against fixed
    reference statistics. The resamples' spread is used, not their quantiles: repeated samples bias
    a resample's FD upwards (fewer distinct points), which would put the whole interval above FD."""
    f = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    rng = np.random.default_rng(seed)
    fds = [frechet_distance(*gaussian_stats(f[rng.integers(0, len(f), len(f))]), *ref) for _ in range(rounds)]
    fd, spread = frechet_distance(*gaussian_stats(f), *ref), z * float(np.std(fds, ddof=1))
    return max(fd - spread, 0.0), fd + spread


def fd_figures(features: torch.Tensor, ref_features: torch.Tensor, floor_features: torch.Tensor,
               rounds: int = 20, seed: int = 0) -> dict:
    """FD of samples against the reference, its bootstrap interval, and the noise floor: a second real
    set of the samples' size against the same reference."""
    ref = gaussian_stats(ref_features)
    lo, hi = bootstrap_fd(features, ref, rounds, seed)
    return {"fd": frechet_distance(*gaussian_stats(features), *ref), "fd_ci": [lo, hi],
            "noise_floor_fd": frechet_distance(*gaussian_stats(floor_features[:len(features)]), *ref)}


def floor_curve(features_of: Callable[[torch.Tensor], torch.Tensor], sizes: Sequence[int], image_size: int,
                seed: int = 0, max_objects: int = 4) -> list[dict]:
    """FD between two disjoint sets of real renders of n images each, for each n in `sizes`: what a
    perfect model scores at that n (FD is biased upwards at small n), with its bootstrap interval."""
    n_max = max(sizes)
    ref = features_of(reference_images(n_max, image_size, seed, max_objects, offset=0))
    other = features_of(reference_images(n_max, image_size, seed, max_objects, offset=1))
    rows = []
    for n in sizes:
        stats = gaussian_stats(ref[:n])
        lo, hi = bootstrap_fd(other[:n], stats, seed=seed)
        rows.append({"n": n, "floor_fd": frechet_distance(*gaussian_stats(other[:n]), *stats), "ci": [lo, hi]})
    return rows


# ---------------------------------------------------------------------------------------------
# A class-conditional checkpoint of the world (class = the first object's colour and shape)


def shapes_world(val_shards: str) -> dict | None:
    """The world's dataset.json beside shapes shards, or None for other data."""
    directory = Path(expand_urls(val_shards)[0]).parent
    return read_world(directory) if (directory / META_FILE).is_file() else None


def class_captions(labels: Sequence[int]) -> list[str]:
    """What a class label asks for: one object of its colour and shape, anywhere."""
    return [f"{article(class_name(int(k)))} {class_name(int(k))}" for k in labels]


def eval_prompts(n: int, n_heldout: int, world: dict) -> tuple[list[str], torch.Tensor]:
    """A text model's fixed evaluation prompts: the captions of n validation-distribution scenes (at
    reference shards disjoint from the FD references) and of n_heldout scenes holding a held-out
    composition; and the mask [n + n_heldout] of the seen ones."""
    size, seed, k = world["image_size"], world["seed"], world["max_objects"]
    seen = reference_scenes(n, size, seed, k, offset=2)
    held = [split_scene(scene_rng(seed, "heldout", REFERENCE_SHARD + 2, i), "heldout", size, k) for i in range(n_heldout)]
    return [caption(s) for s in seen + held], torch.arange(n + n_heldout) < n


def _asked(cfg, samples_per_class: int, n_prompts: int, world: dict, tokenizer: str | None):
    """(conditions, captions they ask for, mask of the seen ones): every class `samples_per_class` times,
    class-interleaved so any prefix is balanced (held-out pairs apart); or a text model's n_prompts
    evaluation prompts plus a quarter as many held-out ones."""
    if cfg.model.conditioning == "text":
        prompts, seen = eval_prompts(n_prompts, n_prompts // 4, world)
        return conditions(cfg, tokenizer, prompts), prompts, seen
    held = {class_of(c, s) for c, s in HELD_OUT["pairs"]}
    labels = torch.arange(NUM_CLASSES).repeat(samples_per_class)
    return labels, class_captions(labels.tolist()), torch.tensor([int(k) not in held for k in labels])


def _by_objects(captions: Sequence[str], read: Sequence, mask: torch.Tensor) -> dict:
    """score() per number of objects the caption asks for, over the masked images."""
    counts = [len(parse_caption(c)) for c in captions]
    return {str(k): score([c for c, n, m in zip(captions, counts, mask) if m and n == k],
                          [r for r, n, m in zip(read, counts, mask) if m and n == k])
            for k in sorted({n for n, m in zip(counts, mask) if m})}


def evaluate_shapes_checkpoint(ckpt, steps_list=(1, 4, 16), samples_per_class: int = 10, seed: int = 0,
                               guidance: float | None = None, val_shards: str | None = None,
                               samplers: Sequence[str] = ("euler",), use_ray: bool | None = None, recogniser=None,
                               log: Callable[[str], None] | None = None, n_prompts: int = 400) -> dict:
    """Attribute, count and binding accuracy and FD (recogniser features) of a checkpoint of the shapes
    world, per sampler and step count. A class model is asked for every class `samples_per_class` times; a text
    model for `n_prompts` fixed evaluation prompts (`eval_prompts`), each with a fixed seed. What the
    training split held out (class pairs; scenes with a held-out composition) is scored apart
    (`heldout`), since the model never saw it; a text model's figures are also given per number of
    objects asked for (`by_objects`). The recogniser reads real renders too: its figures on them
    (`real`) say how far it can be trusted."""
    path = str(resolve(ckpt))
    (_, cfg), meta = _cached_model(path)
    shards = val_shards or cfg.data.val_shards
    world = shapes_world(shards)
    if world is None:
        raise ValueError(f"{shards}: no dataset.json of the shapes world beside them (`dtrain data shapes`)")
    shape = image_shape(cfg, meta)
    text = cfg.model.conditioning == "text"
    if shape != (3, world["image_size"], world["image_size"]) or (not text and cfg.model.num_classes != NUM_CLASSES):
        raise ValueError(f"the checkpoint makes {cfg.model.num_classes}-class images of shape {list(shape)}; the "
                         f"world has {NUM_CLASSES} classes at {[3, world['image_size'], world['image_size']]}")
    rec = recogniser or shapes_recogniser(world["image_size"])
    g = float(cfg.sample.guidance if guidance is None else guidance)
    conds, captions, seen_mask = _asked(cfg, samples_per_class, n_prompts, world, read_tokenizer(path))
    seeds = eval_seeds(len(conds), seed)
    n = int(seen_mask.sum())
    real = reference_images(2 * n, world["image_size"], world["seed"], world["max_objects"])
    ref_f, floor_f = rec.features(real[:n]), rec.features(real[n:])
    real_scenes = reference_scenes(n, world["image_size"], world["seed"], world["max_objects"], offset=0)
    result = {"checkpoint": path, "step": read_meta(path).get("step"), "world": shards, "guidance": g,
              "samplers": list(samplers), "recogniser": rec.name, "conditioning": cfg.model.conditioning,
              "n_samples": n, "n_heldout": len(conds) - n,
              "real": score([caption(s) for s in real_scenes], rec.read(real[:n])), "rows": []}
    chunk = 200
    runs = [(sampler, steps) for sampler in samplers for steps in steps_list]
    args = [(path, conds[i:i + chunk], seeds[i:i + chunk], steps, g, sampler, None)
            for sampler, steps in runs for i in range(0, len(conds), chunk)]
    if ray.is_initialized() if use_ray is None else use_ray:
        from dtrain.runtime import run_tasks

        parts = run_tasks(_eval_chunk, args, desc="shapes eval sampling")
    else:
        parts = [_eval_chunk(*a) for a in args]
    per_row = len(range(0, len(conds), chunk))
    for r, (sampler, steps) in enumerate(runs):
        x = as_stored(torch.cat([p[0] for p in parts[r * per_row:(r + 1) * per_row]]))
        read = rec.read(x)
        row = {"sampler": sampler, "steps": steps, "nfe": nfe(sampler, steps, g),
               **score([c for c, m in zip(captions, seen_mask) if m], [s for s, m in zip(read, seen_mask) if m]),
               **fd_figures(rec.features(x[seen_mask]), ref_f, floor_f, seed=seed),
               "heldout": score([c for c, m in zip(captions, seen_mask) if not m],
                                [s for s, m in zip(read, seen_mask) if not m])}
        if text:
            row["by_objects"] = _by_objects(captions, read, seen_mask)
        result["rows"].append(row)
        if log:
            log(format_row(row))
    return result


def format_row(r: dict) -> str:
    by = "".join(f"  {k} obj: attr {_attributes(v):.3f} binding {v['binding_acc']:.3f}"
                 for k, v in r.get("by_objects", {}).items())
    return (f"{r['sampler']:8} steps {r['steps']:3d}  nfe {r['nfe']:3d}  shape {r['shape_acc']:.3f}  "
            f"colour {r['colour_acc']:.3f}  count {r['count_acc']:.3f}  binding {r['binding_acc']:.3f}  fd {r['fd']:.3f} "
            f"[{r['fd_ci'][0]:.3f}, {r['fd_ci'][1]:.3f}]  floor {r['noise_floor_fd']:.3f}  "
            f"held-out: binding {r['heldout']['binding_acc']:.3f}{by}")


def _attributes(r: dict) -> float:
    """Attribute accuracy: the mean of shape and colour accuracy (and place where captions ask one)."""
    accs = [r["shape_acc"], r["colour_acc"]] + ([r["place_acc"]] if r["place_acc"] is not None else [])
    return sum(accs) / len(accs)


def format_table(result: dict) -> str:
    real = result["real"]
    return "\n".join([format_row(r) for r in result["rows"]] + [
        f"n {result['n_samples']} (+{result['n_heldout']} of held-out pairs), recogniser {result['recogniser']}; "
        f"real renders read by it: shape {real['shape_acc']:.3f} colour {real['colour_acc']:.3f} place "
        f"{real['place_acc']:.3f} count {real['count_acc']:.3f} binding {real['binding_acc']:.3f}"])


# ---------------------------------------------------------------------------------------------
# Any images with the captions they were asked for (img2dataset-layout shards: image + txt)


def load_captioned(urls: str, limit: int | None = None) -> tuple[torch.Tensor, list[str]]:
    """Images [N, C, H, W] in [-1, 1] and their captions from shards of (image, txt) samples."""
    xs, texts = [], []
    for sample in itertools.chain.from_iterable(map(tar_samples, expand_urls(urls))):
        text = caption_of(sample)
        if not text:
            raise MissingField(f"sample {sample.get('__key__')} of {sample.get('__url__')} has no caption (txt): "
                               "scoring needs the caption each image was asked for")
        xs.append(decode_sample(sample)[0])
        texts.append(text)
        if limit and len(xs) >= limit:
            break
    return torch.stack(xs), texts


def score_shards(urls: str, world: dict | None = None, recogniser=None, seed: int = 0, limit: int | None = None) -> dict:
    """Attribute, count and binding accuracy of the images in `urls` against their captions, and FD in
    the recogniser's features against as many real renders of `world` (a dataset.json; default: the
    generator's defaults at the images' size), with its noise floor and bootstrap interval."""
    x, captions = load_captioned(urls, limit)
    if x.shape[1] != 3 or x.shape[2] != x.shape[3]:
        raise ValueError(f"{urls}: images of shape {list(x.shape[1:])}; the shapes world is square RGB")
    size = x.shape[-1]
    world = world or {"image_size": size, "seed": 0, "max_objects": 4}
    if world["image_size"] != size:
        raise ValueError(f"{urls}: {size}-pixel images, the world renders {world['image_size']}")
    rec = recogniser or shapes_recogniser(size)
    n = len(x)
    real = reference_images(2 * n, size, world["seed"], world["max_objects"])
    return {"shards": urls, "recogniser": rec.name, **score(captions, rec.read(x)),
            **fd_figures(rec.features(x), rec.features(real[:n]), rec.features(real[n:]), seed=seed)}

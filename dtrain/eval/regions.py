"""Region control, measured on the shapes world (issue 31): does giving each object its own prompt in its
own box (`dtrain.regions`) make a text model draw scenes of 2 to 4 objects right, against the plain
caption of the same scene?

Scenes come from the world's generator with the validation split's distribution at shard numbers the
writer and the other evaluations never use (`REGION_SHARD`), exactly `k` objects each for k in
`counts`. For every scene the same seed, steps and guidance sample:

- `plain`: the scene's caption (what `dtrain eval` asks);
- `multidiffusion` and `attention`: a region spec (`scene_regions`): the background gets the empty
  prompt (the grammar's captions say nothing about the background, and the empty prompt is the null
  condition) or, with background="caption", the scene's caption; each object its own one-object
  caption (`object_prompt`: the world's caption of a scene of that object alone, "a red circle at the
  top left", the form every one-object training caption has; place=False drops the place) in its pixel
  box converted to image fractions and padded by `PAD` pixels.

Each image is read back (the recogniser, or any reader) and scored against the scene's caption with
`dtrain.eval.shapes.score` (binding, count exact, place, shape and colour accuracy), plus `number_acc`:
the fraction of images in which as many objects are seen as asked, whatever their shapes (count exact
also needs every shape right, and shape is what the shapes models are weakest at). NFE per image is
`region_nfe` (plain: `samplers.nfe`); seconds per image are wall-clock per scene, one image per call for
every method, reading excluded.
"""
from __future__ import annotations

import time
from typing import Callable, Sequence

import torch

from dtrain.data.shapes import Scene, Seen, Thing, article, caption, parse_caption, scene_rng, split_scene
from dtrain.data.shapes import render as render_scene
from dtrain.diffusion import samplers
from dtrain.eval.digits import as_stored
from dtrain.eval.shapes import REFERENCE_SHARD, as_tensor, score
from dtrain.generation import conditions, render
from dtrain.regions import RegionSpec, region_nfe, render_regions, validate_regions

REGION_SHARD = REFERENCE_SHARD + 31  # val-distribution scenes of this measurement (issue 31): shards of their own
PAD = 1.0  # pixels added around an object's box (its anti-aliased edge, and room for a blob a little larger)
METHODS = ("plain", "multidiffusion", "attention")
BACKGROUNDS = ("empty", "caption")

Reader = Callable[[torch.Tensor], Sequence[Sequence[Seen]]]


def scenes_by_count(n: int, counts: Sequence[int] = (2, 3, 4), image_size: int = 32, seed: int = 0,
                    max_objects: int = 4, shard: int = REGION_SHARD) -> dict[int, list[Scene]]:
    """{k: the first n scenes of exactly k objects} of one fixed stream of validation-distribution scenes
    (`scene_rng(seed, "val", shard, i)`, i = 0, 1, ...): the same arguments give the same scenes."""
    if any(not 1 <= k <= max_objects for k in counts):
        raise ValueError(f"object counts {list(counts)}: each in 1..{max_objects}")
    out: dict[int, list[Scene]] = {k: [] for k in counts}
    i = 0
    while any(len(v) < n for v in out.values()):
        scene = split_scene(scene_rng(seed, "val", shard, i), "val", image_size, max_objects)
        k = len(scene.things)
        if k in out and len(out[k]) < n:
            out[k].append(scene)
        i += 1
    return out


def object_prompt(thing: Thing, place: bool = True) -> str:
    """An object's own one-object caption: the world's caption of a scene holding it alone ("a red circle
    at the top left"), or without the place ("a red circle")."""
    if place:
        return caption(Scene((thing,)))
    return f"{article(thing.colour)} {thing.colour} {thing.shape}"


def fraction_box(thing: Thing, image_size: int, pad: float = PAD) -> tuple[float, float, float, float]:
    """The object's pixel box grown by `pad` pixels on each side, in image fractions clipped to [0, 1]."""
    x0, y0, x1, y1 = thing.box
    clip = lambda v: min(max(v / image_size, 0.0), 1.0)  # noqa: E731
    return clip(x0 - pad), clip(y0 - pad), clip(x1 + pad), clip(y1 + pad)


def scene_regions(scene: Scene, image_size: int, background: str = "empty", pad: float = PAD,
                  place: bool = True) -> RegionSpec:
    """The region spec of a scene: the background prompt (empty, or the scene's caption) and one object
    per thing, its `object_prompt` in its `fraction_box`; validated as a request's would be."""
    if background not in BACKGROUNDS:
        raise ValueError(f"background {background!r}: one of {', '.join(BACKGROUNDS)}")
    return validate_regions({
        "background": {"prompt": "" if background == "empty" else caption(scene)},
        "objects": [{"prompt": object_prompt(t, place), "box": list(fraction_box(t, image_size, pad))}
                    for t in scene.things]})


def score_counts(captions: Sequence[str], seen: Sequence[Sequence[Seen]]) -> dict:
    """`shapes.score` of images against their captions, with number_acc (as many objects seen as asked)."""
    figures = score(captions, seen)
    figures["asked_objects"] = figures.pop("objects")  # "objects" is the object count of a row of the table
    asked = [len(parse_caption(c)) for c in captions]
    figures["number_acc"] = sum(len(s) == a for s, a in zip(seen, asked)) / max(len(asked), 1)
    return figures


def _tokens(tokenizer: str | None, text: str) -> int | None:
    if not tokenizer:
        return None
    from tokenizers import Tokenizer

    return len(Tokenizer.from_str(tokenizer).encode(text).ids)


@torch.no_grad()
def evaluate_regions(net, cfg, meta: dict, reader: Reader, tokenizer: str | None = None, n: int = 48,
                     counts: Sequence[int] = (2, 3, 4), steps: int = 16, guidance: float = 2.0,
                     sampler: str = "euler", seed: int = 0, methods: Sequence[str] = METHODS,
                     background: str = "empty", place: bool = True, pad: float = PAD, world_seed: int = 0,
                     keep_images: int = 0, log: Callable[[str], None] | None = None) -> dict:
    """Binding, count and place accuracy of a text model's images of n scenes per object count, each
    sampled by every method in `methods` at one seed per scene (seed * 1_000_000 + 10_000 k + the scene's
    index among those of k objects, the same for every method); see the module docstring. world_seed
    picks the scenes (`scenes_by_count`). keep_images: the first that many scenes'
    images per count are returned under "images" ({k: {"captions", "real", method: [B, C, H, W]}})."""
    if cfg.model.conditioning != "text":
        raise ValueError("region control is measured on a text model (model.conditioning=text): objects are "
                         "given by their captions")
    if unknown := set(methods) - set(METHODS):
        raise ValueError(f"methods {sorted(unknown)}: not among {', '.join(METHODS)}")
    size = cfg.model.image_size
    scenes = scenes_by_count(n, counts, size, world_seed)
    plain_nfe = samplers.nfe(sampler, steps, guidance)
    result = {"steps": steps, "guidance": guidance, "sampler": sampler, "seed": seed, "n_per_count": n,
              "counts": list(counts), "methods": list(methods), "background": background, "object_place": place,
              "pad_px": pad, "max_tokens": cfg.model.max_tokens, "rows": [], "images": {}}
    for k in counts:
        texts = [caption(s) for s in scenes[k]]
        specs = [scene_regions(s, size, background, pad, place) for s in scenes[k]]
        lengths = [_tokens(tokenizer, t) for t in texts]
        seeds = [seed * 1_000_000 + k * 10_000 + i for i in range(n)]
        images, seconds = {}, {}
        for method in methods:
            _sample(net, cfg, meta, tokenizer, method, texts[0], specs[0], seeds[0], steps, guidance, sampler)  # warm-up
            xs, spent = [], 0.0
            for text, spec, s in zip(texts, specs, seeds):
                start = time.perf_counter()
                xs.append(_sample(net, cfg, meta, tokenizer, method, text, spec, s, steps, guidance, sampler))
                spent += time.perf_counter() - start
            images[method], seconds[method] = as_stored(torch.cat(xs)), spent / n
        for method in methods:
            nfe = [plain_nfe if method == "plain" else region_nfe(sp, sampler, steps, guidance, method) for sp in specs]
            row = {"objects": k, "method": method, "nfe": sum(nfe) / n, "seconds_per_image": seconds[method],
                   **score_counts(texts, reader(images[method]))}
            result["rows"].append(row)
            if log:
                log(format_row(row))
        real = as_tensor([render_scene(s, size) for s in scenes[k]])
        result.setdefault("real", {})[str(k)] = score_counts(texts, reader(real))  # the reader's ceiling here
        result.setdefault("captions_over_max_tokens", {})[str(k)] = (
            None if lengths[0] is None else sum(n_tok > cfg.model.max_tokens for n_tok in lengths))
        if keep_images:
            kept = {m: images[m][:keep_images] for m in methods}
            result["images"][k] = {"captions": texts[:keep_images], "real": real[:keep_images], **kept}
    result["gain"] = gains(result["rows"])
    result["met"] = [(r["objects"], r["method"]) for r in result["rows"]  # the target for region control
                     if r["method"] != "plain" and r["binding_acc"] >= 0.9 and r["count_acc"] >= 0.9]
    if not keep_images:
        del result["images"]
    return result


def _sample(net, cfg, meta, tokenizer, method, text, spec, seed, steps, guidance, sampler) -> torch.Tensor:
    """One image [1, C, H, W] of a scene: its caption (plain) or its region spec by `method`."""
    if method == "plain":
        return render(net, cfg, meta, conditions(cfg, tokenizer, [text]), [seed], steps, guidance, sampler=sampler)
    return render_regions(net, cfg, meta, spec, [seed], steps, guidance, sampler=sampler, method=method,
                          tokenizer=tokenizer)


def gains(rows: Sequence[dict]) -> dict:
    """{k: {method: {binding, count, place, number}}}: each region method's accuracy less the plain
    prompt's on the same scenes (where both were measured)."""
    plain = {r["objects"]: r for r in rows if r["method"] == "plain"}
    out: dict = {}
    for r in rows:
        p = plain.get(r["objects"])
        if r["method"] == "plain" or p is None:
            continue
        out.setdefault(str(r["objects"]), {})[r["method"]] = {
            "binding": r["binding_acc"] - p["binding_acc"], "count": r["count_acc"] - p["count_acc"],
            "place": None if r["place_acc"] is None or p["place_acc"] is None else r["place_acc"] - p["place_acc"],
            "number": r["number_acc"] - p["number_acc"]}
    return out


def _f(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def _signed(g: dict | None, key: str) -> str:
    return "-" if g is None or g[key] is None else f"{g[key]:+.3f}"


def format_row(r: dict) -> str:
    return (f"{r['objects']} objects  {r['method']:14} nfe {r['nfe']:5.1f}  {r['seconds_per_image']:.3f} s/image  "
            f"shape {_f(r['shape_acc'])}  colour {_f(r['colour_acc'])}  place {_f(r['place_acc'])}  "
            f"count {_f(r['count_acc'])}  number {_f(r['number_acc'])}  binding {_f(r['binding_acc'])}")


def format_table(result: dict) -> str:
    """A markdown table: per object count and method, NFE, seconds per image, the accuracies and the
    binding and count gains over the plain prompt."""
    gain = result.get("gain", {})
    lines = ["| objects | method | NFE / image | s / image | shape | colour | place | count exact | objects seen = asked "
             "| binding | binding gain | count gain |", "|" + "---|" * 12]
    for r in result["rows"]:
        g = gain.get(str(r["objects"]), {}).get(r["method"])
        lines.append(f"| {r['objects']} | {r['method']} | {r['nfe']:.0f} | {r['seconds_per_image']:.3f} | "
                     f"{_f(r['shape_acc'])} | {_f(r['colour_acc'])} | {_f(r['place_acc'])} | {_f(r['count_acc'])} | "
                     f"{_f(r['number_acc'])} | {_f(r['binding_acc'])} | {_signed(g, 'binding')} | {_signed(g, 'count')} |")
    if result.get("real"):
        lines.append("\nReal renders of the same scenes read by the reader: " + "; ".join(
            f"{k} objects binding {_f(v['binding_acc'])} count {_f(v['count_acc'])}" for k, v in result["real"].items()))
    lines.append(f"\n{result['n_per_count']} scenes per object count, {result['sampler']} {result['steps']} steps, "
                 f"guidance {result['guidance']}, background prompt: {result['background']}, object prompts "
                 f"{'with' if result['object_place'] else 'without'} their place, boxes padded by "
                 f"{result['pad_px']:g} px. Binding >= 0.9 and count exact >= 0.9 with region control: "
                 + (", ".join(f"{m} at {k} objects" for k, m in result["met"]) or "nowhere"))
    return "\n".join(lines)


def save_region_grid(result: dict, path, per_count: int = 2):
    """A captioned PNG: for the first `per_count` kept scenes of each count, a row of the real render and
    each method's image (in `result["methods"]` order)."""
    from dtrain.images import save_captioned_grid

    rows, texts = [], []
    for k, im in result["images"].items():
        for i in range(min(per_count, len(im["captions"]))):
            rows += [im["real"][i:i + 1]] + [im[m][i:i + 1] for m in result["methods"]]
            texts.append(im["captions"][i])
    return save_captioned_grid(torch.cat(rows), path, texts, ncol=1 + len(result["methods"]))

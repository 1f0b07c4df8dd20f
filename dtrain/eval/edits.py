"""Inversion editing, measured on the shapes world (issue 31): change one object's colour and nothing else.

Sources are real renders of the world (the recogniser reads them exactly, so whatever it reads wrong
after an edit the edit did), scenes of `objects` objects from the validation distribution at shard
numbers of their own (`EDIT_SHARD`), every object a different colour-shape pair. Per scene one object
is picked and a new colour for it (`edit_cases`, seeded): never its own, never a held-out pair, never
another object's pair, so the target caption is the source caption with one colour word swapped (and
"a" <-> "an" before it): the same words in the same order, what prompt-to-prompt's alignment by position wants.

Every edit runs `dtrain.editing.edit` from the source caption to the target caption at each strength,
for each variant: with or without attention replacement, with or without a mask (the edited object's
pixel box padded by `PAD` pixels). Figures per variant and strength, over the images:

- success: the reader sees an object of the target colour in the edited object's cell;
- others_kept: every other object is seen with its shape, colour and cell (the preservation the
  target asks for); edited_shape_kept: the edited object's cell holds its shape still;
- target_binding: the image reads exactly as the target caption (`score_image`'s binding);
- success_and_kept: both success and others_kept on the same image;
- psnr_outside: PSNR in dB (peak-to-peak 2 in [-1, 1]) of the pixels outside the edited object's box
  against the source, pooled over the images (10 log10(4 / mean squared error)): inf where all of them
  are unchanged there, as a masked edit's are;
- nfe per image (inversion included), seconds per image (the batch's wall-clock / its size).

Round trip (inversion exactness): `editing.round_trip_error` on model samples of the source captions,
and the same on the real renders (invert, regenerate under the same caption, RMS against the render),
per scheme and refinement count against NFE.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from dtrain.data.shapes import (COLOUR_NAMES, HELD_OUT, Scene, Seen, Thing, caption, parse_caption, render,
                                scene_rng, split_scene)
from dtrain.editing import edit, round_trip_error
from dtrain.eval.digits import as_stored
from dtrain.eval.shapes import REFERENCE_SHARD, as_tensor, score_image
from dtrain.generation import conditions

EDIT_SHARD = REFERENCE_SHARD + 32  # the edit sources: val-distribution scenes at shards of their own
STRENGTHS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # 0: the input itself (no network call), where every curve starts
PAD = 1.0  # pixels around the edited object's box: the mask, and what "outside" excludes
# (name, attention_replace, mask)
VARIANTS = (("plain", False, False), ("attention replace", True, False), ("mask", False, True),
            ("mask + attention replace", True, True))
REFINES = (0, 1, 2, 3, 5)  # round trip: 0 is plain Euler reversal, else fixed-point refinements per step

Reader = Callable[[torch.Tensor], Sequence[Sequence[Seen]]]


@dataclass(frozen=True)
class EditCase:
    """A source scene, the index of the object to recolour and its new colour."""
    scene: Scene
    index: int
    colour: str

    @property
    def thing(self) -> Thing:
        return self.scene.things[self.index]

    @property
    def target(self) -> Scene:
        t = self.thing
        things = list(self.scene.things)
        things[self.index] = Thing(t.shape, self.colour, t.cell, t.box)
        return Scene(tuple(things), self.scene.background)

    @property
    def others(self) -> list[Seen]:
        return [Seen(t.shape, t.colour, t.cell) for i, t in enumerate(self.scene.things) if i != self.index]


def edit_cases(n: int, objects: int = 2, image_size: int = 32, seed: int = 0, shard: int = EDIT_SHARD) -> list[EditCase]:
    """The first n scenes of exactly `objects` objects with distinct colour-shape pairs from one fixed
    stream of validation-distribution scenes, each with its object to edit and its new colour (module
    docstring), drawn from np.random.default_rng([seed, shard, i]): the same arguments, the same cases."""
    if not 1 <= objects <= 4:
        raise ValueError(f"objects {objects}: 1 to 4 (the validation distribution's scenes)")
    held = set(HELD_OUT["pairs"])
    cases, i = [], 0
    while len(cases) < n:
        scene = split_scene(scene_rng(seed, "val", shard, i), "val", image_size, 4)
        pairs = [(t.colour, t.shape) for t in scene.things]
        if len(scene.things) == objects and len(set(pairs)) == objects:
            rng = np.random.default_rng([seed, shard, i])
            index = int(rng.integers(objects))
            shape = scene.things[index].shape
            choices = [c for c in COLOUR_NAMES if (c, shape) not in held and (c, shape) not in pairs]
            cases.append(EditCase(scene, index, choices[int(rng.integers(len(choices)))]))
        i += 1
    return cases


def box_mask(thing: Thing, image_size: int, pad: float = PAD) -> torch.Tensor:
    """[S, S] float: 1 on the pixels the object's box grown by `pad` pixels touches, 0 elsewhere."""
    x0, y0, x1, y1 = thing.box
    c0, r0 = max(math.floor(x0 - pad), 0), max(math.floor(y0 - pad), 0)
    c1, r1 = min(math.ceil(x1 + pad), image_size), min(math.ceil(y1 + pad), image_size)
    m = torch.zeros(image_size, image_size)
    m[r0:r1, c0:c1] = 1.0
    return m


def psnr(mse: float) -> float:
    """dB for images in [-1, 1] (peak-to-peak 2); inf for a mean squared error of 0."""
    return math.inf if mse <= 0 else 10 * math.log10(4.0 / mse)


def edit_figures(cases: Sequence[EditCase], source: torch.Tensor, edited: torch.Tensor,
                 seen: Sequence[Sequence[Seen]], masks: torch.Tensor) -> dict:
    """The figures of one variant and strength (module docstring): sources and edits [N, C, S, S], what
    the reader saw in the edits, the edited objects' box masks [N, S, S]."""
    success, kept, shape_kept, binding = [], [], [], []
    for case, s in zip(cases, seen):
        t = case.thing
        success.append(any(o.cell == t.cell and o.colour == case.colour for o in s))
        kept.append(all(o in s for o in case.others))
        shape_kept.append(any(o.cell == t.cell and o.shape == t.shape for o in s))
        binding.append(score_image(parse_caption(caption(case.target)), s)["binding"])
    outside = (1 - masks)[:, None].expand_as(source)  # [N, C, S, S]
    sq = ((edited.float() - source.float()) ** 2 * outside).sum() / outside.sum().clamp_min(1)
    mean = lambda v: float(np.mean(v)) if v else 0.0  # noqa: E731
    return {"success": mean(success), "others_kept": mean(kept), "edited_shape_kept": mean(shape_kept),
            "target_binding": mean(binding), "success_and_kept": mean([a and b for a, b in zip(success, kept)]),
            "psnr_outside": psnr(float(sq))}


@torch.no_grad()
def evaluate_edits(net, cfg, reader: Reader, tokenizer: str | None = None, n: int = 32, objects: int = 2,
                   strengths: Sequence[float] = STRENGTHS, steps: int = 16, guidance: float = 2.0,
                   scheme: str = "fixed_point", refine: int | None = None, variants=VARIANTS, seed: int = 0,
                   pad: float = PAD, refines: Sequence[int] = REFINES, round_trip_n: int = 8,
                   log: Callable[[str], None] | None = None) -> dict:
    """Edit success against preservation of a text model's colour edits of n real renders, per variant
    (name, attention_replace, mask) and strength, and the round trip per scheme against NFE (module
    docstring). round_trip_n: images of the round trip (0: none)."""
    if cfg.model.conditioning != "text":
        raise ValueError("the edit measurement asks for a colour word swapped in a caption: it needs a text model "
                         "(model.conditioning=text)")
    size = cfg.model.image_size
    cases = edit_cases(n, objects, size, seed)
    x = as_tensor([render(c.scene, size) for c in cases])
    src = conditions(cfg, tokenizer, [caption(c.scene) for c in cases])
    tgt = conditions(cfg, tokenizer, [caption(c.target) for c in cases])
    masks = torch.stack([box_mask(c.thing, size, pad) for c in cases])
    truth = [sorted([Seen(t.shape, t.colour, t.cell) for t in c.scene.things], key=lambda o: o.cell) for c in cases]
    read_source = reader(x)
    result = {"n": n, "objects": objects, "steps": steps, "guidance": guidance, "scheme": scheme,
              "refine": refine, "seed": seed, "pad_px": pad, "sources": "real renders",
              "source_read_exact": float(np.mean([list(r) == t for r, t in zip(read_source, truth)])),
              "examples": [{"source": caption(c.scene), "target": caption(c.target)} for c in cases[:4]],
              "rows": []}
    for name, replace, masked in variants:
        for strength in strengths:
            start = time.perf_counter()
            out = edit(net, cfg, x, src, tgt, strength, steps, guidance, scheme, refine,
                       masks if masked else None, replace)
            seconds = (time.perf_counter() - start) / n
            y = as_stored(out.image)
            row = {"variant": name, "attention_replace": replace, "mask": masked, "strength": strength,
                   "nfe": out.nfe, "seconds_per_image": seconds, **edit_figures(cases, x, y, reader(y), masks)}
            result["rows"].append(row)
            if log:
                log(format_row(row))
    result["met"] = [(r["variant"], r["strength"]) for r in result["rows"] if r["success"] >= 0.9 and r["others_kept"] >= 0.95]
    if round_trip_n:
        result["round_trip"] = round_trips(net, cfg, x[:round_trip_n], src[:round_trip_n], steps, guidance, refines, seed)
    return result


@torch.no_grad()
def round_trips(net, cfg, x: torch.Tensor, cond: torch.Tensor, steps: int, guidance: float,
                refines: Sequence[int] = REFINES, seed: int = 0) -> list[dict]:
    """Per refine count (0: euler): `round_trip_error` on model samples of `cond` (image_rms, noise_rms)
    beside the round trip of the real images x (invert to the noise end, regenerate under the same
    condition: real_image_rms), with their NFE per image (inversion + regeneration, the same for both)."""
    rows = round_trip_error(net, cfg, cond, [seed * 1_000_000 + i for i in range(len(x))], steps, guidance, refines)
    for row in rows:
        r = row["refine"]
        back = edit(net, cfg, x, cond, cond, 1.0, steps, guidance, row["scheme"], r or None)
        row["real_image_rms"] = float((back.image.float() - x.float()).pow(2).mean().sqrt())
        row["real_nfe"] = back.nfe
    return rows


def _f(v: float) -> str:
    return "inf" if v == math.inf else f"{v:.3f}"


def format_row(r: dict) -> str:
    return (f"{r['variant']:24} strength {r['strength']:.1f}  nfe {r['nfe']:3d}  {r['seconds_per_image']:.3f} s/image  "
            f"success {r['success']:.3f}  others kept {r['others_kept']:.3f}  both {r['success_and_kept']:.3f}  "
            f"shape kept {r['edited_shape_kept']:.3f}  binding {r['target_binding']:.3f}  "
            f"psnr outside {_f(r['psnr_outside'])} dB")


def format_table(result: dict) -> str:
    """Markdown tables: the edits per variant and strength, then the round trip per scheme."""
    lines = ["| variant | strength | NFE / image | s / image | success | others kept | success and kept | edited shape kept "
             "| target binding | PSNR outside box (dB) |", "|" + "---|" * 10]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {r['strength']:.1f} | {r['nfe']} | {r['seconds_per_image']:.3f} | "
                     f"{r['success']:.3f} | {r['others_kept']:.3f} | {r['success_and_kept']:.3f} | "
                     f"{r['edited_shape_kept']:.3f} | {r['target_binding']:.3f} | {_f(r['psnr_outside'])} |")
    lines.append(f"\n{result['n']} real renders of {result['objects']} objects, one recoloured; {result['steps']} steps "
                 f"at strength 1, guidance {result['guidance']}, {result['scheme']} inversion; the reader reads the "
                 f"sources exactly in {result['source_read_exact']:.3f} of them. Success >= 0.9 with others kept >= 0.95: "
                 + (", ".join(f"{v} at {s}" for v, s in result["met"]) or "nowhere"))
    if result.get("round_trip"):
        lines += ["", "| scheme | refine | NFE / image | samples: image RMS | samples: noise RMS | real renders: image RMS |",
                  "|" + "---|" * 6]
        for r in result["round_trip"]:
            lines.append(f"| {r['scheme']} | {r['refine']} | {r['nfe']} | {r['image_rms']:.4f} | {r['noise_rms']:.3f} | "
                         f"{r['real_image_rms']:.4f} |")
    return "\n".join(lines)


def plot_edits(result: dict, path: str | Path | None, by_strength: str | Path | None = None) -> list[Path]:
    """At `path`, success against others kept, one curve per variant over the strengths (the target's corner
    is success >= 0.9 at others kept >= 0.95); at `by_strength`, success and others kept against strength."""
    from dtrain.plots import Panel, line_chart, panels

    series = lambda key: {v: [(r["strength"], r[key]) for r in result["rows"] if r["variant"] == v]  # noqa: E731
                          for v in dict.fromkeys(r["variant"] for r in result["rows"])}
    curve = {v: [(r["others_kept"], r["success"]) for r in result["rows"] if r["variant"] == v]
             for v in dict.fromkeys(r["variant"] for r in result["rows"])}
    title = f"colour edits of {result['n']} real renders: success against others kept (a point per strength)"
    out = [] if path is None else [line_chart(path, curve, title=title, xlabel="other objects kept (fraction of images)",
                                              ylabel="edit success")]
    if by_strength:
        # the targets as unlabelled dashed lines (a label would sit under the legend): success 0.9, kept 0.95
        out.append(panels(by_strength, [Panel("edit success (dashed: 0.9)", series("success"), "success", hlines={"": 0.9}),
                                        Panel("other objects kept (dashed: 0.95)", series("others_kept"), "kept",
                                              hlines={"": 0.95})],
                          xlabel="strength", size=(640, 520)))
    return out

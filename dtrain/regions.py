"""Region control: a background condition and up to 8 objects, each a condition in a box, one image.

Two methods, both wrappers of the net `(x, t, cond, s=None) -> prediction`, so guidance, every sampler
(consistency and flow maps included) and distilled students run them unchanged through `generation.solve`:

- multidiffusion (Bar-Tal et al. 2023, the seed's CompositionalController): each network call evaluates
  the net once per region on the same x and composes the predictions with smoothed box masks. The
  prediction (velocity, eps, v, x0, a flow map's u) is affine in the same space for every region, so a
  convex per-pixel blend is again a prediction; guidance on the blend is the blend of per-region guidance.
- attention (regional cross-attention, text models on DiT or the SSM-hybrid): one call; every region's
  prompt is encoded on its own, the encodings are concatenated into one caption, and an image token
  attends to the background's tokens and to those of the objects whose box overlaps its patch.

The condition the wrapped net takes is the regions' conditions stacked, [B, R, ...] (background first):
guidance fills its unconditional half with the null value (or a negative prompt repeated per region),
and a row whose regions all hold the same condition is one plain evaluation, so the unconditional
half costs what it costs without regions.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

from dtrain.diffusion import samplers
from dtrain.errors import DtrainError
from dtrain.generation import conditions, render, solve
from dtrain.models.layers import Context

MAX_OBJECTS = 8
METHODS = ("multidiffusion", "attention")
SMOOTHING = 0.02  # the Gaussian feather of a box edge, as a fraction of the image side (~0.6 px at 32 px)
WHOLE = (0.0, 0.0, 1.0, 1.0)


class RegionError(DtrainError, ValueError):
    """A region spec that cannot run; the message starts with the field it names (regions.objects[1].box)."""


@dataclass(frozen=True)
class Region:
    """One condition (a prompt for a text model, a class label for a class model) and its box [x0, y0,
    x1, y1] in image fractions (x to the right, y down); the background's box is the whole image."""
    prompt: str | None = None
    class_label: int | None = None
    box: tuple[float, float, float, float] = WHOLE


@dataclass(frozen=True)
class RegionSpec:
    background: Region
    objects: tuple[Region, ...] = ()

    @property
    def regions(self) -> tuple[Region, ...]:
        return (self.background, *self.objects)

    @property
    def boxes(self) -> tuple[tuple[float, ...], ...]:
        return tuple(r.box for r in self.regions)


def validate_regions(data, field: str = "regions") -> RegionSpec:
    """A RegionSpec from plain data {"background": {"prompt" | "class_label"}, "objects": [{"prompt" |
    "class_label", "box": [x0, y0, x1, y1]}, ...]} (JSON, YAML or a request body), or a RegionError naming
    the field. Free of pydantic and of any model, so the HTTP schema can call it and map the error to 422;
    `check_model` then checks the spec against the model it runs on."""
    data = _mapping(data, field, {"background", "objects"})
    if "background" not in data:
        raise RegionError(f"{field}.background: missing (a prompt or class_label for the whole image)")
    background = _region(data["background"], f"{field}.background", boxed=False)
    objects = data.get("objects", [])
    if not isinstance(objects, (list, tuple)):
        raise RegionError(f"{field}.objects: a list of objects, got {type(objects).__name__}")
    if len(objects) > MAX_OBJECTS:
        raise RegionError(f"{field}.objects: {len(objects)} objects, at most {MAX_OBJECTS}")
    return RegionSpec(background, tuple(_region(o, f"{field}.objects[{i}]", boxed=True) for i, o in enumerate(objects)))


def _mapping(data, field: str, keys: set[str]) -> dict:
    if not isinstance(data, dict):
        raise RegionError(f"{field}: a mapping with {', '.join(sorted(keys))}, got {type(data).__name__}")
    unknown = sorted(set(data) - keys)
    if unknown:  # a typo ("object", "bbox") would otherwise be dropped without a word
        raise RegionError(f"{field}.{unknown[0]}: unknown field (expected {', '.join(sorted(keys))})")
    return data


def _region(data, field: str, boxed: bool) -> Region:
    data = _mapping(data, field, {"prompt", "class_label", "box"} if boxed else {"prompt", "class_label"})
    prompt, label = data.get("prompt"), data.get("class_label")
    if (prompt is None) == (label is None):
        raise RegionError(f"{field}.prompt: {'missing' if prompt is None else 'given with a class_label'} "
                          "(give a prompt for a text model or a class_label for a class model, one of the two)")
    if prompt is not None and not isinstance(prompt, str):
        raise RegionError(f"{field}.prompt: a string, got {type(prompt).__name__}")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
        raise RegionError(f"{field}.class_label: an integer >= 0, got {label!r}")
    if not boxed:
        return Region(prompt, label)
    return Region(prompt, label, _box(data.get("box"), f"{field}.box"))


def _box(box, field: str) -> tuple[float, float, float, float]:
    if box is None:
        raise RegionError(f"{field}: missing ([x0, y0, x1, y1] in image fractions)")
    if (not isinstance(box, (list, tuple)) or len(box) != 4
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)):
        raise RegionError(f"{field}: four numbers [x0, y0, x1, y1] in image fractions, got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        raise RegionError(f"{field}: {list(box)} reaches outside the image (every coordinate in [0, 1])")
    if not (x0 < x1 and y0 < y1):
        raise RegionError(f"{field}: {list(box)} has no area (x0 < x1 and y0 < y1 are needed)")
    return x0, y0, x1, y1


def load_regions(path: str | Path) -> RegionSpec:
    """A RegionSpec from a JSON or YAML file (by its suffix; YAML otherwise, a superset of JSON)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as e:
        raise RegionError(f"regions: cannot read {path}: {e}") from None
    return validate_regions(data)


def check_model(spec: RegionSpec, cfg, method: str = "multidiffusion") -> None:
    """RegionError unless the spec and method fit the model: prompts for a text model, class labels below
    model.num_classes for a class model, images (not vectors), regional attention on text models only."""
    m = cfg.model
    if method not in METHODS:
        raise RegionError(f"method: {method!r}, not one of {', '.join(METHODS)}")
    if m.arch == "mlp":
        raise RegionError("regions: boxes need an image model; this one (model.arch=mlp) samples vectors")
    text = m.conditioning == "text"
    for name, r in zip(["background", *(f"objects[{i}]" for i in range(len(spec.objects)))], spec.regions):
        if text and r.prompt is None:
            raise RegionError(f"regions.{name}.prompt: missing (a text model takes prompts, not class labels)")
        if not text and r.class_label is None:
            raise RegionError(f"regions.{name}.class_label: missing (a class model takes class labels, not prompts)")
        if not text and r.class_label >= m.num_classes:
            raise RegionError(f"regions.{name}.class_label: {r.class_label} outside 0..{m.num_classes - 1}")
    if method == "attention" and not text:
        raise RegionError("method attention restricts cross-attention to the caption: it needs a text model "
                          "(model.conditioning=text); use multidiffusion")


def region_conditions(cfg, spec: RegionSpec, tokenizer: str | None = None) -> torch.Tensor:
    """The regions' conditions [R, ...], background first: token ids [R, L] (a frozen encoder's embeddings
    [R, L, E]) for a text model, class labels [R] for a class model."""
    if cfg.model.conditioning == "text":
        return conditions(cfg, tokenizer, [r.prompt for r in spec.regions])
    return torch.tensor([r.class_label for r in spec.regions])


# ---- masks ----

def _profile(lo: torch.Tensor, hi: torch.Tensor, n: int, smoothing: float) -> torch.Tensor:
    """[K, n]: how much of each of n pixels along one axis the intervals [lo, hi] [K] cover. Sharp
    (smoothing 0): the share of the pixel inside. Else the interval's indicator blurred by a Gaussian of
    std `smoothing` (image fractions) at the pixel's centre; an edge on the image border is no edge to
    feather, so the interval runs on beyond it (a box of the whole image is 1 everywhere)."""
    edges = torch.arange(n + 1, dtype=torch.float64) / n
    left, right = edges[:-1], edges[1:]
    if smoothing == 0:
        inside = torch.minimum(hi[:, None], right) - torch.maximum(lo[:, None], left)
        return inside.clamp(min=0) / (right - left)  # a covered pixel is exactly 1
    lo = torch.where(lo <= 0, -math.inf, lo)[:, None]
    hi = torch.where(hi >= 1, math.inf, hi)[:, None]
    centre = (left + right) / 2
    return torch.special.ndtr((centre - lo) / smoothing) - torch.special.ndtr((centre - hi) / smoothing)


def box_masks(boxes, height: int, width: int, smoothing: float = 0.0) -> torch.Tensor:
    """[K, H, W] float64 in [0, 1]: each box [x0, y0, x1, y1] (K x 4, fractions) on an H x W grid."""
    b = torch.as_tensor(boxes, dtype=torch.float64).view(-1, 4)
    ys = _profile(b[:, 1], b[:, 3], height, smoothing)  # [K, H]
    xs = _profile(b[:, 0], b[:, 2], width, smoothing)  # [K, W]
    return ys[:, :, None] * xs[:, None, :]


def region_weights(boxes, height: int, width: int, smoothing: float = SMOOTHING) -> torch.Tensor:
    """[R, H, W] float64 per-pixel blend weights summing to 1, background (boxes[0], the whole image)
    first. An object owns its box (weight = its mask m); the background takes prod(1 - m) of what the
    objects leave; where objects overlap they share. A box of the whole image thus gives its region's
    prediction alone (plain sampling), and at smoothing 0 a region weighs exactly 0 outside its box.
    The sum before normalising is >= 1 everywhere (1 - prod(1 - m) <= sum m), so no division by ~0."""
    m = box_masks(boxes[1:], height, width, smoothing)  # [R - 1, H, W] (none: the background alone)
    raw = torch.cat([torch.prod(1 - m, dim=0, keepdim=True), m])
    return raw / raw.sum(0)


def patch_access(boxes, grid: int) -> torch.Tensor:
    """[N, R] bool over row-major patches: which regions' tokens a patch may attend to, the background's
    always, an object's where its box overlaps the patch at all (so even a box smaller than a patch has one)."""
    return (box_masks(boxes, grid, grid) > 0).flatten(1).T


def regional_context(net: nn.Module, cond: torch.Tensor, boxes) -> tuple[torch.Tensor, Context]:
    """A text backbone's (adaLN vector y [b, D], Context) for regional attention from the regions' conditions
    cond [b, R, L] (or [b, R, L, E]). Each region's prompt is encoded on its own, so a prompt's tokens
    never see another's in the text encoder; the concatenated caption is [b, R (L + 1), D], with a
    query mask [b, N, R (L + 1)] from the boxes. y is the mean of the regions' pooled vectors: the adaLN
    path sees the scene as a whole, as the plain prompt of the scene would give it."""
    b, R = cond.shape[:2]
    ctx, pooled = net.text(cond.flatten(0, 1))  # tokens [b R, M, D], mask [b R, M], pooled [b R, D]
    M = ctx.tokens.shape[1]
    query = patch_access(boxes, net.grid).to(cond.device).repeat_interleave(M, dim=1)  # [N, R M]
    return (pooled.view(b, R, -1).mean(1),
            Context(ctx.tokens.reshape(b, R * M, -1), ctx.mask.reshape(b, R * M), query.expand(b, -1, -1)))


class RegionNet(nn.Module):
    """The net over stacked region conditions: (x [B, C, H, W], t [B], cond [B, R, ...], s) -> the
    composed prediction [B, C, H, W]. A Module (holding the net) so that generation.solve's precision
    cast, eval mode and device handling see the net's weights."""

    def __init__(self, net: nn.Module, boxes, method: str = "multidiffusion", smoothing: float = SMOOTHING):
        super().__init__()
        if method not in METHODS:
            raise RegionError(f"method: {method!r}, not one of {', '.join(METHODS)}")
        if method == "attention" and getattr(net, "text", None) is None:
            raise RegionError("method attention needs a backbone that cross-attends to a caption (DiT or the "
                              "SSM-hybrid with model.conditioning=text)")
        self.net, self.method, self.smoothing = net, method, float(smoothing)
        self.boxes = tuple(tuple(float(v) for v in b) for b in boxes)  # python floats: a dtype cast leaves them be

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        if cond.shape[1] != len(self.boxes):
            raise ValueError(f"{cond.shape[1]} conditions per image for {len(self.boxes)} regions")
        same = (cond == cond[:, :1]).flatten(1).all(1)  # [B]: every region holds one condition (the null half)
        if bool(same.all()):
            return self.net(x, t, cond[:, 0], s)
        regional = self._multidiffusion if self.method == "multidiffusion" else self._attention
        if not bool(same.any()):
            return regional(x, t, cond, s)
        rows = lambda v, keep: None if v is None else v[keep]
        out_r = regional(x[~same], t[~same], cond[~same], rows(s, ~same))
        out = out_r.new_empty(len(x), *out_r.shape[1:])
        out[~same] = out_r
        out[same] = self.net(x[same], t[same], cond[same, 0], rows(s, same)).to(out.dtype)
        return out

    def _multidiffusion(self, x, t, cond, s):
        b, R = cond.shape[:2]
        rep = lambda v: None if v is None else v.repeat(R, *[1] * (v.ndim - 1))  # region-major [R b, ...]
        pred = self.net(rep(x), rep(t), cond.transpose(0, 1).flatten(0, 1), rep(s))  # one batch, R evaluations
        pred = pred.view(R, b, *pred.shape[1:])
        w = region_weights(self.boxes, x.shape[-2], x.shape[-1], self.smoothing)  # [R, H, W]
        dtype = torch.promote_types(pred.dtype, torch.float32)  # blend in float32 even for a bf16 net
        return (w.to(pred.device, dtype)[:, None, None] * pred.to(dtype)).sum(0)

    def _attention(self, x, t, cond, s):
        y, context = regional_context(self.net, cond, self.boxes)
        return self.net.forward_conditioned(x, t, y, context, s)


def region_nfe(spec: RegionSpec, sampler: str, steps: int, guidance: float, method: str = "multidiffusion") -> int:
    """Network evaluations per image: multidiffusion evaluates the conditional side once per region (once
    in all when every region holds the same condition) and the unconditional side once; regional attention
    keeps samplers.nfe, each call with an R times longer caption and R text-encoder passes."""
    plain = samplers.nfe(sampler, steps, guidance)
    distinct = len({(r.prompt, r.class_label) for r in spec.regions})
    if method == "attention" or distinct == 1:
        return plain
    conditional = samplers.nfe(sampler, steps, 1.0)
    return conditional * len(spec.regions) + (plain - conditional)


def _stacked(net, cfg, spec, seeds, tokenizer, negative, method, smoothing):
    """(RegionNet, its conditions [B, R, ...], the negative [B, R, ...] or None) for `generation.solve`."""
    check_model(spec, cfg, method)
    R = len(spec.regions)
    cond = region_conditions(cfg, spec, tokenizer)
    cond = cond.unsqueeze(0).expand(len(seeds), *cond.shape).contiguous()
    if isinstance(negative, str):
        negative = conditions(cfg, tokenizer, [negative] * len(seeds))
    if negative is not None:  # one negative per image, the same for every region: a single evaluation
        negative = negative.unsqueeze(1).expand(-1, R, *negative.shape[1:]).contiguous()
    return RegionNet(net, spec.boxes, method, smoothing), cond, negative


def solve_regions(net: nn.Module, cfg, spec: RegionSpec, seeds: list[int], steps: int, guidance: float,
                  precision: str = "fp32", sampler: str = "euler", method: str = "multidiffusion",
                  tokenizer: str | None = None, negative: str | torch.Tensor | None = None, watermark=None,
                  live: Optional[Callable[[], torch.Tensor]] = None, smoothing: float = SMOOTHING) -> torch.Tensor:
    """`generation.solve` under region control: [B, C, h, w] for B = len(seeds) images of one spec.
    tokenizer: a text model's tokenizer JSON (as `generation.conditions`); negative: a text model's negative
    prompt, or its ids [B, L]. Costs `region_nfe(spec, sampler, steps, guidance, method)` calls per image."""
    run, cond, negative = _stacked(net, cfg, spec, seeds, tokenizer, negative, method, smoothing)
    return solve(run, cfg, cond, seeds, steps, guidance, precision, sampler, watermark, live, negative)


def render_regions(net: nn.Module, cfg, meta: dict, spec: RegionSpec, seeds: list[int], steps: int, guidance: float,
                   precision: str = "fp32", sampler: str = "euler", method: str = "multidiffusion",
                   tokenizer: str | None = None, negative: str | torch.Tensor | None = None, watermark=None,
                   live: Optional[Callable[[], torch.Tensor]] = None, smoothing: float = SMOOTHING) -> torch.Tensor:
    """`generation.render` under region control: images [B, C, H, W] in [-1, 1], decoded when latent."""
    run, cond, negative = _stacked(net, cfg, spec, seeds, tokenizer, negative, method, smoothing)
    return render(run, cfg, meta, cond, seeds, steps, guidance, precision, sampler, watermark, live, negative)

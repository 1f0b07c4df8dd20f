"""`dtrain bench watermark`: how reliably the served watermark is found, per checkpoint (model stage),
on clean images and after each attack, and what it costs in image quality.

Per checkpoint, with its own sampler, steps and guidance (cfg.sample) and a fresh key: N watermarked
images and N plain ones (other seeds) as uint8 PNG pixels, each attacked, then the noise is recovered
by inverting the checkpoint's ODE and scored (dtrain.watermark). TPR at 1% FPR: the share of
watermarked scores above the plain scores' 99th percentile; `tpr_p01`/`fpr_p01`: the shares whose
binomial p-value is below 0.01, the detector's own decision. Quality: `dtrain eval`'s FD (digits
features) of the watermarked and plain samples against the same real images.
"""
from __future__ import annotations

import io
import time
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter

from dtrain.checkpoint import load_model, read_meta, read_tokenizer, resolve
from dtrain.eval import eval_seeds
from dtrain.eval.shapes import eval_prompts, fd_figures, reference_images, shapes_world
from dtrain.generation import conditions, render
from dtrain.images import to_uint8
from dtrain.watermark import WatermarkKey, detect, dihedral, recover_noise


def _pil(img: np.ndarray) -> Image.Image:
    return Image.fromarray(img)  # uint8 [H, W] (grayscale) or [H, W, 3], as to_uint8 gives


def _back(im: Image.Image, like: np.ndarray) -> np.ndarray:
    return np.asarray(im.convert(_pil(like).mode)).reshape(like.shape)


def jpeg(quality: int):
    def attack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        buf = io.BytesIO()
        _pil(img).save(buf, format="JPEG", quality=quality)
        return _back(Image.open(buf), img)
    return attack


def crop_resize(keep: float):
    """A centred crop keeping `keep` of each side, resized back to the full size (bicubic)."""
    def attack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        ch, cw = max(1, round(h * keep)), max(1, round(w * keep))
        top, left = (h - ch) // 2, (w - cw) // 2
        im = _pil(img).crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
        return _back(im, img)
    return attack


def resize(scale: float):
    """Down to `scale` of each side and back up (bicubic): detail lost to a smaller copy."""
    def attack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = img.shape[:2]
        small = _pil(img).resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
        return _back(small.resize((w, h), Image.BICUBIC), img)
    return attack


def rotate(degrees: float):
    def attack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _back(_pil(img).rotate(degrees, resample=Image.BILINEAR), img)
    return attack


def blur(radius: float):
    def attack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return _back(_pil(img).filter(ImageFilter.GaussianBlur(radius)), img)
    return attack


def gaussian_noise(std: float):
    """Additive noise of `std` (in [0, 1] intensity units), clipped and requantised."""
    def attack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        noisy = img.astype(np.float64) + rng.normal(0, 255 * std, img.shape)
        return np.clip(noisy.round(), 0, 255).astype(np.uint8)
    return attack


def symmetry(k: int):
    """The k-th symmetry of the square (dtrain.watermark.dihedral): k = 4 a left-right flip, 1 a quarter turn."""
    def attack(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = torch.from_numpy(img)
        x = x.movedim(-1, 0) if img.ndim == 3 else x  # [H, W, C] -> [C, H, W]: the image's own two axes last
        x = dihedral(x, k)
        return np.ascontiguousarray((x.movedim(0, -1) if img.ndim == 3 else x).numpy())
    return attack


ATTACKS: dict[str, Callable] = {
    "clean": lambda img, rng: img,
    "flip": symmetry(4),
    "rotate_90deg": symmetry(1),
    "jpeg_q50": jpeg(50),
    "crop_resize_0.75": crop_resize(0.75),
    "resize_0.5": resize(0.5),
    "rotate_3deg": rotate(3),
    "rotate_10deg": rotate(10),
    "blur_r0.5": blur(0.5),
    "noise_0.05": gaussian_noise(0.05),
}


def _as_input(images: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W(, C)] (PNG layout, as to_uint8 gives) -> float [N, C, H, W] in [-1, 1]."""
    x = torch.from_numpy(images).float() / 127.5 - 1
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def tpr_at_fpr(positive: np.ndarray, negative: np.ndarray, fpr: float = 0.01) -> float:
    """Share of positive scores above the negatives' (1 - fpr) quantile."""
    return float((positive > np.quantile(negative, 1 - fpr)).mean())


def score_images(net, cfg, images: np.ndarray, key: WatermarkKey, invert_steps: int | None,
                 sync: str = "none") -> list[dict]:
    return detect(recover_noise(net, cfg, _as_input(images), invert_steps, sync=sync), [key])


def _asked(ckpt: str, cfg, n: int) -> torch.Tensor:
    """The conditions of the n images: every class in turn, or a text model's evaluation prompts of the
    shapes world its validation shards come from (dtrain.eval.shapes.eval_prompts)."""
    if cfg.model.conditioning != "text":
        return torch.arange(n) % cfg.model.num_classes
    world = shapes_world(cfg.data.val_shards)
    if world is None:
        raise ValueError(f"{ckpt} is a text model whose validation shards are not the shapes world's: no prompts to ask")
    return conditions(cfg, read_tokenizer(ckpt), eval_prompts(n, 0, world)[0])


def run_checkpoint(ckpt: str, n: int = 200, invert_steps: int | None = None, seed: int = 0, quality: bool = True,
                   log: Callable[[str], None] = print, sync: str = "none",
                   attacks: tuple[str, ...] | None = None) -> tuple[list[dict], dict]:
    """(a row per attack, a summary of the checkpoint) for one checkpoint; `attacks`: names of ATTACKS
    (default all)."""
    unknown = sorted(set(attacks or ()) - set(ATTACKS))
    if unknown:
        raise ValueError(f"unknown attack {unknown[0]!r}: choose from {', '.join(ATTACKS)}")
    net, cfg = load_model(ckpt)
    meta, s = read_meta(ckpt), cfg.sample
    stage = meta.get("stage", "pretrain")
    key = WatermarkKey.generate()
    labels = _asked(ckpt, cfg, n)
    marked_seeds, plain_seeds = eval_seeds(n, seed), eval_seeds(n, seed + 1)
    marked = to_uint8(render(net, cfg, meta, labels, marked_seeds, s.steps, s.guidance, "fp32", s.sampler, key))
    plain = to_uint8(render(net, cfg, meta, labels, plain_seeds, s.steps, s.guidance, "fp32", s.sampler))
    rng = np.random.default_rng(seed)
    rows = []
    for name, attack in ATTACKS.items():
        if attacks and name not in attacks:
            continue
        start = time.perf_counter()
        pos = score_images(net, cfg, np.stack([attack(i, rng) for i in marked]), key, invert_steps, sync)
        seconds = (time.perf_counter() - start) / n
        neg = score_images(net, cfg, np.stack([attack(i, rng) for i in plain]), key, invert_steps, sync)
        sp, sn = np.array([d["score"] for d in pos]), np.array([d["score"] for d in neg])
        rows.append({"stage": stage, "attack": name, "tpr_at_1pct_fpr": tpr_at_fpr(sp, sn),
                     "tpr_p01": float(np.mean([d["watermarked"] for d in pos])),
                     "fpr_p01": float(np.mean([d["watermarked"] for d in neg])),
                     "score_marked": float(sp.mean()), "score_plain": float(sn.mean()), "sync": sync,
                     "detect_s_per_image": seconds})
        log(f"{stage:9} {name:17} TPR@1%FPR {rows[-1]['tpr_at_1pct_fpr']:.3f}  score "
            f"{rows[-1]['score_marked']:.3f} vs {rows[-1]['score_plain']:.3f}  {seconds * 1e3:.0f} ms/image")
    tpr = {r["attack"]: r["tpr_at_1pct_fpr"] for r in rows}
    attacked = [v for a, v in tpr.items() if a != "clean"] or [float("nan")]
    summary = {"checkpoint": ckpt, "stage": stage, "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance,
               "invert_steps": invert_steps or s.steps, "n": n, "signs_per_image": int(np.prod(marked.shape[1:])),
               "sync": sync, "clean_tpr": tpr.get("clean"), "worst_attack_tpr": min(attacked),
               "mean_attack_tpr": float(np.mean(attacked))}
    if quality:
        world = shapes_world(cfg.data.val_shards)
        summary["quality"] = _quality(ckpt, key, s) if world is None else _shapes_quality(marked, plain, world)
        log(f"{stage:9} FD plain {summary['quality']['fd_plain']:.3f}  watermarked "
            f"{summary['quality']['fd_watermarked']:.3f}")
    return rows, summary


def _quality(ckpt: str, key: WatermarkKey, s) -> dict:
    """`dtrain eval`'s FD and class accuracy of the plain and the watermarked samples (same seeds)."""
    from dtrain.eval.digits import evaluate_checkpoint

    out = {}
    for label, wm in (("plain", None), ("watermarked", key)):
        r = evaluate_checkpoint(ckpt, steps_list=[s.steps], samplers=(s.sampler,), use_ray=False, watermark=wm)
        out[f"fd_{label}"], out[f"class_acc_{label}"] = r["rows"][0]["fd"], r["rows"][0]["class_acc"]
    out["noise_floor_fd"], out["n_samples"] = r["noise_floor_fd"], r["rows"][0]["n_samples"]
    return out


def _shapes_quality(marked: np.ndarray, plain: np.ndarray, world: dict) -> dict:
    """FD in the shapes recogniser's features of the watermarked and the plain samples (same prompts, other
    seeds) against the same real renders, each with its bootstrap interval, beside the noise floor."""
    from dtrain.eval.recogniser import shapes_recogniser

    rec, n = shapes_recogniser(world["image_size"]), len(marked)
    args = (n, world["image_size"], world["seed"], world["max_objects"])
    ref, floor = rec.features(reference_images(*args)), rec.features(reference_images(*args, offset=1))
    out = {"n_samples": n, "feature_net": "shapes recogniser"}
    for label, images in (("plain", plain), ("watermarked", marked)):
        f = fd_figures(rec.features(_as_input(images)), ref, floor)
        out[f"fd_{label}"], out[f"fd_ci_{label}"], out["noise_floor_fd"] = f["fd"], f["fd_ci"], f["noise_floor_fd"]
    return out


def run(checkpoints: list[str], n: int = 200, invert_steps: int | None = None, seed: int = 0, quality: bool = True,
        log: Callable[[str], None] = print, sync: str = "none",
        attacks: tuple[str, ...] | None = None) -> tuple[list[dict], dict]:
    rows, summaries = [], []
    for c in checkpoints:
        r, s = run_checkpoint(str(resolve(c)), n, invert_steps, seed, quality, log, sync, attacks)
        rows += r
        summaries.append(s)
    return rows, {"scheme": "gaussian-shading", "checkpoints": summaries,
                  "target": {"clean_tpr_at_1pct_fpr": 0.99, "every_attack_tpr_at_1pct_fpr": 0.95}}

"""Both classes of the detector's data, as uint8 RGB pixels [N, H, W, 3]:

- real: the images of real shards (the shapes world's, digits, any WebDataset image shards);
- generated: shards written by `write_generated`, which samples one checkpoint (`dtrain.generation.render`,
  what `dtrain sample` runs, with the checkpoint's own sampler, steps and guidance) into
  DIR/gen-NNNNNN.tar, each sample `{__key__, png, generator, json}` (generator: the generator's name, the
  label), and DIR/generator.json, the manifest naming the generator and how it sampled. `generate`
  samples several checkpoints, one Ray task each.

A generator's name is its identity: the detector records the names it trained on, and evaluation
counts a generator as held out when its name is not among them. `training_generators` refuses a held-out
name among the training generators, and watermarked samples (the detector must not learn the mark; a
watermarked generator is evaluated apart, its rows flagged `watermarked`).
"""
from __future__ import annotations

import io
import itertools
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from dtrain.checkpoint import load_model, read_config, read_meta, read_tokenizer, resolve
from dtrain.data.shards import IMAGES, encode_png, expand_urls, tar_samples
from dtrain.detector.errors import DetectorError
from dtrain.generation import conditions, render
from dtrain.images import to_uint8

MANIFEST = "generator.json"


class DetectorDataError(DetectorError):
    pass


def _conditions(ckpt: str, cfg, n: int) -> torch.Tensor:
    """Every class in turn; a text model's shapes-world evaluation prompts (its validation shards' world),
    or the empty prompt where its data is not the shapes world."""
    if cfg.model.conditioning != "text":
        return torch.arange(n) % cfg.model.num_classes
    from dtrain.eval.shapes import eval_prompts, shapes_world

    world = shapes_world(cfg.data.val_shards)
    prompts = eval_prompts(n, 0, world)[0] if world is not None else [""] * n
    return conditions(cfg, read_tokenizer(ckpt), prompts)


def sample_checkpoint(ckpt: str, n: int, seed: int = 0, batch: int = 64, watermark=None) -> np.ndarray:
    """n samples of a checkpoint as uint8 RGB [n, H, W, 3] (grayscale repeated), seeds seed..seed+n-1;
    watermark: a dtrain.watermark.WatermarkKey whose mark the samples carry (None: plain)."""
    net, cfg = load_model(ckpt)
    meta, s = read_meta(ckpt), cfg.sample
    cond = _conditions(ckpt, cfg, n)
    out = []
    for i in range(0, n, batch):
        x = render(net, cfg, meta, cond[i:i + batch], list(range(seed + i, seed + min(n, i + batch))),
                   s.steps, s.guidance, "fp32", s.sampler, watermark)
        img = to_uint8(x)
        out.append(np.repeat(img[..., None], 3, axis=-1) if img.ndim == 3 else img)
    return np.concatenate(out)


def check_name(name: str) -> str:
    if not name or any(c in name for c in "/\\= \t\n") or name.startswith("."):
        raise DetectorDataError(f"generator name {name!r}: a non-empty word without '/', '=' or spaces")
    return name


def write_images(images: np.ndarray, out: str | Path, name: str, info: dict | None = None, seed: int = 0,
                 per_shard: int = 256) -> dict:
    """uint8 images [N, H, W(, 3)] of generator `name` into OUT/gen-NNNNNN.tar (each sample labelled `name`)
    and OUT/generator.json (`info` added to it); returns the manifest."""
    check_name(name)
    if len(images) < 1 or per_shard < 1:
        raise DetectorDataError(f"{len(images)} images, per_shard {per_shard}: both must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for k, lo in enumerate(range(0, len(images), per_shard)):
        path = out / f"gen-{k:06d}.tar"
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f, wds.TarWriter(f, mtime=0) as sink:
            for i in range(lo, min(len(images), lo + per_shard)):
                sink.write({"__key__": f"{i:08d}", "png": encode_png(images[i]), "generator": name.encode(),
                            "json": json.dumps({"generator": name, "seed": seed + i}).encode()})
        os.replace(tmp, path)
        shards.append(path.name)
    manifest = {"generator": name, **(info or {}), "n": len(images), "seed": seed,
                "image_shape": list(images.shape[1:]), "shards": shards}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def write_generated(ckpt: str, out: str | Path, name: str, n: int = 256, seed: int = 0, per_shard: int = 256,
                    watermarked: bool = False) -> dict:
    """Sample `ckpt` n times (seeds seed..seed+n-1) into generated shards at OUT (`write_images`);
    `watermarked`: with the keyed watermark of a fresh key, as served images carry (the manifest says so)."""
    check_name(name)
    if n < 1:
        raise DetectorDataError(f"n {n}: at least one image")
    ckpt = str(Path(resolve(ckpt)).resolve())
    key = None
    if watermarked:
        from dtrain.watermark import WatermarkKey

        key = WatermarkKey.generate()
    start = time.perf_counter()
    images = sample_checkpoint(ckpt, n, seed, watermark=key)
    seconds = time.perf_counter() - start
    meta, s = read_meta(ckpt), read_config(ckpt).sample
    info = {"checkpoint": ckpt, "stage": meta.get("stage", "pretrain"), "step": meta.get("step"),
            "sampler": s.sampler, "steps": s.steps, "guidance": s.guidance, "sample_seconds": round(seconds, 2),
            "watermarked": watermarked, "watermark_key_id": key.key_id if key else None}
    return write_images(images, out, name, info, seed, per_shard)


def generate(checkpoints: dict[str, str], out_root: str | Path, n: int = 256, seed: int = 0, use_ray: bool = True,
             address: str | None = None, watermarked: bool = False) -> list[dict]:
    """`write_generated` for every {name: checkpoint} into OUT_ROOT/<name>, one Ray task per checkpoint (in
    this process when use_ray is False)."""
    for name in checkpoints:
        check_name(name)
    args = [(str(ckpt), str(Path(out_root) / name), name, n, seed, 256, watermarked)
            for name, ckpt in checkpoints.items()]
    if not use_ray:
        return [write_generated(*a) for a in args]
    from dtrain.runtime import ensure_ray, run_tasks

    ensure_ray(address, 1)
    return run_tasks(write_generated, args, desc="generated shards")


def read_manifest(directory: str | Path) -> dict:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise DetectorDataError(f"{directory}: no {MANIFEST}, not a generated-shard directory "
                                "(write one with `dtrain detector generate`)")
    return json.loads(path.read_text())


def _rgb(sample: dict) -> np.ndarray:
    key = next((k for k in IMAGES if k in sample), None)
    if key is None:
        raise DetectorDataError(f"sample {sample.get('__key__')} of {sample.get('__url__')} holds no image "
                                f"({', '.join(IMAGES)})")
    return np.asarray(Image.open(io.BytesIO(sample[key])).convert("RGB"))


def load_real(urls: str, limit: int | None = None) -> np.ndarray:
    """The first `limit` (default all) images of real shards (brace patterns, '::'-joined), uint8 RGB."""
    samples = itertools.chain.from_iterable(map(tar_samples, expand_urls(urls)))
    images = [_rgb(s) for s in itertools.islice(samples, limit)]
    if not images:
        raise DetectorDataError(f"{urls}: no images")
    return np.stack(images)


def is_watermarked(directory: str | Path) -> bool:
    return bool(read_manifest(directory).get("watermarked"))


def load_generated(directory: str | Path, limit: int | None = None) -> tuple[str, np.ndarray]:
    """(generator name, its first `limit` images) of a directory written by `write_generated`."""
    manifest = read_manifest(directory)
    paths = [str(Path(directory) / s) for s in manifest["shards"]]
    samples = itertools.chain.from_iterable(map(tar_samples, paths))
    images = []
    for s in itertools.islice(samples, limit):
        if s.get("generator", b"").decode() != manifest["generator"]:
            raise DetectorDataError(f"{s.get('__url__')}: sample {s.get('__key__')} is labelled "
                                    f"{s.get('generator')!r}, the manifest names {manifest['generator']!r}")
        images.append(_rgb(s))
    return manifest["generator"], np.stack(images)


def training_generators(directories: list[str], held_out: list[str] = ()) -> list[str]:
    """The generator names of the training directories; DetectorDataError when one is held out, when a name
    repeats, or when there is none."""
    if not directories:
        raise DetectorDataError("no generated shards to train on: give --generated DIR (repeatable)")
    manifests = [read_manifest(d) for d in directories]
    marked = [m["generator"] for m in manifests if m.get("watermarked")]
    if marked:
        raise DetectorDataError(f"generator {marked[0]!r} is watermarked: the detector trains on unwatermarked "
                                "samples (else it learns the watermark); evaluate it apart")
    names = [m["generator"] for m in manifests]
    leaked = sorted(set(names) & set(held_out))
    if leaked:
        raise DetectorDataError(f"generator {leaked[0]!r} is held out of training but its shards were given for "
                                "training: drop it from --generated or from --held-out")
    if len(set(names)) != len(names):
        raise DetectorDataError(f"a generator is given twice for training: {names}")
    return names


def check_shapes(real: np.ndarray, generated: dict[str, np.ndarray]) -> None:
    for name, images in generated.items():
        if images.shape[1:] != real.shape[1:]:
            raise DetectorDataError(f"generator {name!r} makes images of {list(images.shape[1:])}, the real ones are "
                                    f"{list(real.shape[1:])}: the detector compares images of one size")

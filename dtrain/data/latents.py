"""Encode image shards into VAE latent shards with a Ray Data job (latent-space training).

Input: `{__key__, png, cls}` shards. Output: one shard per input shard, same file name, same keys in
the same order, `{__key__, latent.npy, cls}` where latent.npy is float32 [C, h, w] =
(mean of the VAE posterior - shift_factor) * scaling_factor (Stable Diffusion's convention; SD3/Flux
VAEs add the shift). The reader (`dtrain.data.shards`) hands latents to training as stored.
A `latents.json` next to the shards records the VAE, the factors and the latent shape.

The VAE is a diffusers AutoencoderKL in a local directory (`save_pretrained`); nothing is fetched
from the Hugging Face Hub. On a multi-node cluster the shards, the VAE directory and `out_dir` must be
on storage every node sees, as for training.
"""
from __future__ import annotations

import json
import os
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from dtrain import storage
from dtrain.data.shards import DataError, absolute_urls, decode_sample, encode_npy, expand_urls, load_images


def load_vae(vae_dir: str | Path):
    """An AutoencoderKL from a local `save_pretrained` directory, in eval mode; never touches the Hub."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is first imported
    from diffusers import AutoencoderKL

    # low_cpu_mem_usage=False: the default wants `accelerate`, which we do not need for a VAE
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True, low_cpu_mem_usage=False)
    return vae.eval().requires_grad_(False)


def decode_latents(vae, z: torch.Tensor, scaling_factor: float, shift_factor: float = 0.0) -> torch.Tensor:
    """Latents as stored [B, c, h, w] -> images [B, C, H, W] in [-1, 1]: the inverse of the encoder's
    `(mean - shift) * scale` below, then the VAE's decoder (clamped: a decoder may overshoot)."""
    with torch.no_grad():
        return vae.decode(z / scaling_factor + shift_factor).sample.clamp(-1, 1)


def latents_meta(urls: str) -> dict | None:
    """What a checkpoint trained on the shards `urls` records under meta["latents"] so that sampling
    decodes through the same VAE: {vae_dir, scaling_factor, shift_factor} from the `latents.json`
    next to the first shard, or None for image shards."""
    info = storage.sibling(expand_urls(urls)[0], "latents.json")
    if not storage.exists(info):
        return None
    d = json.loads(storage.read_text(info))
    return {"vae_dir": d["vae_dir"], "scaling_factor": float(d["scaling_factor"]),
            "shift_factor": float(d.get("shift_factor") or 0.0)}


class _ShardEncoder:
    """Ray Data actor: loads the VAE once, then encodes whole shards, one `map_batches` row each.
    A shard per call keeps file names, keys and order exactly, and every actor writes its own files."""

    def __init__(self, vae_dir: str, out_dir: str, batch_size: int, scale: float, shift: float):
        from dtrain.runtime import pin_threads

        pin_threads()  # the actor's one CPU: a pool as large as the cluster's CPUs must not oversubscribe it
        self.vae, self.out_dir, self.batch_size = load_vae(vae_dir), Path(out_dir), batch_size
        self.scale, self.shift = scale, shift

    @torch.no_grad()
    def _encode(self, chunk: list[dict]) -> np.ndarray:
        x = torch.stack([decode_sample(s)[0] for s in chunk])  # [B, C, H, W] in [-1, 1]
        if x.shape[1] == 1:
            x = x.expand(-1, self.vae.config.in_channels, -1, -1)  # grayscale -> the VAE's channels
        z = (self.vae.encode(x).latent_dist.mean - self.shift) * self.scale  # [B, c, h, w]
        return z.float().numpy()

    def _encode_shard(self, src: str) -> tuple[int, tuple[int, ...]]:
        out = self.out_dir / Path(src).name
        tmp = out.with_name(out.name + ".tmp")  # a retried or killed task never leaves half a shard
        samples = iter(wds.DataPipeline(wds.SimpleShardList([src]), wds.tarfile_to_samples()))
        count, shape = 0, ()
        with wds.TarWriter(str(tmp)) as sink:
            while chunk := list(islice(samples, self.batch_size)):
                z = self._encode(chunk)
                for s, zi in zip(chunk, z):
                    sink.write({"__key__": s["__key__"], "latent.npy": encode_npy(zi), "cls": s["cls"]})
                count, shape = count + len(z), z.shape[1:]
        os.replace(tmp, out)
        return count, shape

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        counts, shapes = zip(*(self._encode_shard(str(s)) for s in batch["src"]))
        # shapes as JSON text: an empty shard has none, so they need not stack into one array
        return {"src": batch["src"], "count": np.array(counts), "shape": np.array([json.dumps(s) for s in shapes])}


def encode_shards(urls: str, vae_dir: str | Path, out_dir: str | Path, batch_size: int = 64,
                  scaling_factor: float | None = None, address: str | None = None) -> list[str]:
    """Encode the image shards `urls` (brace patterns, '::'-joined) into latent shards in `out_dir`,
    spread over an actor pool as large as the cluster's CPUs (capped at the shard count).
    scaling_factor: default the VAE config's. address: a Ray cluster (default: a local one, or the
    one this process is already connected to). Returns the written shard paths, in input order."""
    import ray

    from dtrain.runtime import ensure_ray

    shards = expand_urls(absolute_urls(urls))  # absolute: Ray workers run elsewhere
    names = [Path(s).name for s in shards]
    if len(set(names)) != len(names):
        raise DataError("input shards share file names; output shards are named after them")
    vae_dir, out_dir = Path(vae_dir).resolve(), Path(out_dir).resolve()
    if not (vae_dir / "config.json").is_file():
        raise DataError(f"{vae_dir} is not a diffusers AutoencoderKL directory (no config.json)")
    cfg = json.loads((vae_dir / "config.json").read_text())
    scale = float(cfg.get("scaling_factor", 1.0) if scaling_factor is None else scaling_factor)
    shift = float(cfg.get("shift_factor") or 0.0)
    # checked here: inside an actor the same mistake surfaces as a long Ray Data traceback
    channels, want = load_images(shards[0], limit=1)[0].shape[1], cfg.get("in_channels", 3)
    if channels not in (1, want):
        raise DataError(f"{channels}-channel images for a VAE that takes {want} channels ({vae_dir})")
    out_dir.mkdir(parents=True, exist_ok=True)

    ensure_ray(address)
    actors = max(1, min(len(shards), int(ray.cluster_resources().get("CPU", 1))))
    rows = ray.data.from_items([{"src": s} for s in shards]).map_batches(
        _ShardEncoder, batch_size=1, num_cpus=1, compute=ray.data.ActorPoolStrategy(size=actors),
        fn_constructor_kwargs=dict(vae_dir=str(vae_dir), out_dir=str(out_dir), batch_size=batch_size,
                                   scale=scale, shift=shift),
    ).take_all()
    shapes = {r["shape"] for r in rows if r["count"]}
    if len(shapes) != 1:
        raise DataError(f"expected one latent shape from non-empty shards, got {sorted(shapes) or 'none'}")
    (out_dir / "latents.json").write_text(json.dumps({
        "vae_dir": str(vae_dir), "scaling_factor": scale, "shift_factor": shift,
        "shape": json.loads(shapes.pop()), "count": int(sum(r["count"] for r in rows)), "shards": names,
    }, indent=2) + "\n")
    return [str(out_dir / n) for n in names]

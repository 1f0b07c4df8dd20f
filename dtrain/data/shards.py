"""WebDataset shards: write (image, class) samples; read them back as batches split by rank.

A sample is `{__key__, png, cls}`: a PNG image (grayscale or RGB) and an integer class label, or
`{__key__, latent.npy, cls}`: precomputed VAE latents [C, h, w] (written by `dtrain.data.latents`), or
`{__key__, x.npy, noise.npy, cls, seed}`: a reflow pair, a teacher's sample and the noise it started
from (written by `dtrain.train.pairs`).
Reading is deterministic: epoch e shuffles the shard list with (seed, e), rank r takes every
world-th shard, DataLoader worker w every n-th of those, and the sample buffer is seeded too, so a
resumed run can skip exactly the batches it already consumed.
"""
from __future__ import annotations

import io
import os
import random
import warnings
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image


class DataError(ValueError):
    """Shards that cannot feed the requested run."""


def encode_png(img: np.ndarray) -> bytes:
    """uint8 [H, W] or [H, W, 3] -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def encode_npy(a: np.ndarray) -> bytes:
    """An array -> .npy bytes (latents, reflow pairs)."""
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_shards(samples, out_pattern: str, per_shard: int) -> list[str]:
    """samples: iterable of (uint8 image, int label). out_pattern like 'dir/train-%06d.tar'."""
    Path(out_pattern).parent.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(out_pattern, maxcount=per_shard, verbose=0) as sink:
        for i, (img, label) in enumerate(samples):
            sink.write({"__key__": f"{i:08d}", "png": encode_png(img), "cls": str(int(label)).encode()})
        return [str(Path(out_pattern % k)) for k in range(sink.shard)]


def expand_urls(urls: str) -> list[str]:
    shards = [u for part in urls.split("::") for u in braceexpand.braceexpand(part)]
    local = [s for s in shards if "://" not in s]
    missing = [s for s in local if not Path(s).is_file()]
    if missing:
        raise DataError(f"{len(missing)} shard(s) not found, e.g. {missing[0]} (run `dtrain data digits`?)")
    return shards


class CorruptShards:
    """Handler for unreadable tar data: warn, count and go on, or stop the run (on_corrupt=fail).
    With loader_workers > 0 each loader process keeps its own count."""

    def __init__(self, fail: bool = False):
        self.fail, self.count = fail, 0

    def __call__(self, exn: Exception) -> bool:
        if self.fail:
            raise DataError(f"corrupt shard data (data.on_corrupt=fail): {exn}") from exn
        self.count += 1
        warnings.warn(f"skipping corrupt shard data ({self.count} so far on this rank): {exn}")
        return True


def absolute_urls(urls: str) -> str:
    """Local shard paths made absolute, since Ray workers do not run in the driver's directory."""
    return "::".join(p if "://" in p else os.path.abspath(p) for p in urls.split("::"))


PICKLED = {"pickle", "pkl", "pyd", "pth", "pt"}  # extensions whose decoding would run pickle


def _array(data: bytes, key: str) -> torch.Tensor:
    try:
        return torch.tensor(np.load(io.BytesIO(data), allow_pickle=False), dtype=torch.float32)
    except ValueError as e:  # an object array: loading it would unpickle
        raise DataError(f"{key}: {e}; dtrain never unpickles shard data: write numeric .npy arrays") from None


def decode_sample(sample: dict) -> tuple:
    """(x [C, H, W], label) or, for a reflow pair, (x, label, noise [C, H, W]). A sample holding a
    pickled payload is refused before anything is decoded: shard data never runs pickle."""
    pickled = sorted(k for k in sample if k.rsplit(".", 1)[-1] in PICKLED)
    if pickled:
        raise DataError(f"sample {sample.get('__key__')} of {sample.get('__url__')} holds {pickled}: dtrain never "
                        "unpickles shard data; write arrays as .npy and images as .png")
    if "noise.npy" in sample:
        return _array(sample["x.npy"], "x.npy"), int(sample["cls"]), _array(sample["noise.npy"], "noise.npy")
    if "latent.npy" in sample:  # latents are used as encoded: already scaled, no [-1, 1] mapping
        return _array(sample["latent.npy"], "latent.npy"), int(sample["cls"])
    img = np.asarray(Image.open(io.BytesIO(sample["png"])), dtype=np.float32) / 127.5 - 1.0  # [-1, 1]
    x = torch.from_numpy(img)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # [C, H, W]
    return x, int(sample["cls"])


def epoch_dataset(urls: str, rank: int, world: int, epoch: int, seed: int, batch_size: int,
                  shuffle_buffer: int, on_corrupt: CorruptShards | None = None) -> wds.DataPipeline:
    """One epoch of this rank's batches. Corrupt tar data goes to `on_corrupt` (default: skip and warn)."""
    shards = expand_urls(urls)
    if len(shards) < world:
        raise DataError(f"{len(shards)} shard(s) for {world} workers: every worker needs one; write more shards")
    random.Random(seed * 100_003 + epoch).shuffle(shards)
    return wds.DataPipeline(
        wds.SimpleShardList(shards[rank::world]),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=on_corrupt or CorruptShards()),
        wds.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(f"{seed}/{epoch}/{rank}")),
        wds.map(decode_sample),
        wds.batched(batch_size, partial=False),
    )


def train_batches(urls: str, rank: int, world: int, seed: int, batch_size: int, shuffle_buffer: int,
                  loader_workers: int = 0, skip: int = 0,
                  on_corrupt: CorruptShards | None = None) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless stream of (x [B, C, H, W], labels [B]) for this rank, epoch after epoch: images in
    [-1, 1], or latents as stored; pair shards add their noise (x, labels, noise [B, C, H, W]).
    `skip` batches are dropped first: that is how a resumed run continues where it stopped."""
    epoch, seen = 0, 0
    while True:
        ds = epoch_dataset(urls, rank, world, epoch, seed, batch_size, shuffle_buffer, on_corrupt)
        loader = wds.WebLoader(ds, batch_size=None, num_workers=loader_workers) if loader_workers else ds
        produced = 0
        for x, y, *rest in loader:
            produced += 1
            seen += 1
            if seen > skip:
                yield x, torch.as_tensor(y), *rest
        if produced == 0:
            raise DataError(f"rank {rank} got no full batch of {batch_size} from {urls} in epoch {epoch}")
        epoch += 1


def load_images(urls: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or the first `limit`) samples of some shards, in order: for evaluation and tests."""
    xs, ys = [], []
    for sample in wds.DataPipeline(wds.SimpleShardList(expand_urls(urls)), wds.tarfile_to_samples()):
        x, y, *_ = decode_sample(sample)
        xs.append(x)
        ys.append(y)
        if limit and len(xs) >= limit:
            break
    return torch.stack(xs), torch.tensor(ys)

"""WebDataset shards: write (image, class) samples; read them back as batches split by rank.

A sample is `{__key__, png, cls}`: a PNG image (grayscale or RGB) and an integer class label, or
img2dataset's layout `{__key__, jpg|jpeg|png|webp, txt, json}`: an image (RGBA and palette images
become RGB), its UTF-8 caption and metadata, usually without `cls`. A sample with a caption but no
`cls` gets label -1, "no class", which a class model embeds as the null label; a text model
(model.conditioning=text) reads the caption instead (`captions=True`). Or
`{__key__, latent.npy, cls}`: precomputed VAE latents [C, h, w] (written by `dtrain.data.latents`), or
`{__key__, x.npy, noise.npy, cls, seed}`: a reflow pair, a teacher's sample and the noise it started
from (written by `dtrain.train.pairs`).
Reading is deterministic: epoch e shuffles the shard list with (seed, e), rank r takes every
world-th shard, DataLoader worker w every n-th of those. Samples are shuffled within each shard only
(a buffer of `shuffle_buffer` samples seeded with (seed, e, shard name), emptied at every shard's
end), then batched across shard boundaries, so where a sample lands depends on its own shard and the
sample counts of the shards before it, never on their contents. That is what makes resuming cheap:
a resumed run skips whole epochs and whole shards by arithmetic on per-shard sample counts (tar
headers, `shard_count`) and drops the first samples of the current shard before they are decoded.
Shards may live on object storage (s3://, gs://: any URI pyarrow opens; webdataset's own openers
have none for s3): they are read through pyarrow's filesystems, as Ray Train writes checkpoints.
A sample without an image (or latents) or without a label (`cls`, or a non-empty `txt`) raises
`MissingField`; in training it goes to the `on_corrupt` handler as unreadable tar data does: skipped
with a warning and counted with the corrupt data (`CorruptShards.count`), or fatal with
data.on_corrupt=fail. Skipped samples still count in the per-shard sample counts that resuming uses.
"""
from __future__ import annotations

import contextlib
import io
import itertools
import os
import random
import re
import tarfile
import warnings
from pathlib import Path
from typing import Iterator

import braceexpand
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from dtrain.errors import DtrainError
from dtrain import storage


class DataError(DtrainError, ValueError):
    """Shards that cannot feed the requested run."""


class MissingField(DataError):
    """A sample without an image (or latents) or without a label (`cls` or a caption)."""


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
    """Brace patterns, '::'-joined -> shard paths or URIs, every one checked to exist."""
    shards = [u for part in urls.split("::") for u in braceexpand.braceexpand(part)]
    missing = [s for s in shards if not (storage.exists(s) if storage.is_uri(s) else Path(s).is_file())]
    if missing:
        raise DataError(f"{len(missing)} shard(s) not found, e.g. {missing[0]} (run `dtrain data digits`?)")
    return shards


def tar_samples(url: str, handler=wds.reraise_exception) -> Iterator[dict]:
    """The raw samples of one shard, local or at a URI; read errors go to `handler` as in webdataset."""
    if not storage.is_uri(url):
        return wds.tarfile_to_samples(handler=handler)([{"url": url}])
    return group_by_keys(tar_file_expander(_remote_stream(url, handler), handler=handler), handler=handler)


def _remote_stream(url: str, handler):
    try:
        stream = storage.open_stream(url)
    except Exception as e:  # as webdataset's url_opener: the handler decides
        if handler(e):
            return
        raise
    with stream:  # closed once the reader has gone through it
        yield {"url": url, "stream": stream}


class CorruptShards:
    """Handler for unreadable tar data and samples missing a field (`MissingField`): warn, count and
    go on, or stop the run (on_corrupt=fail).
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
IMAGES = ("png", "jpg", "jpeg", "webp")  # image keys, the first present is decoded


def _array(data: bytes, key: str) -> torch.Tensor:
    try:
        return torch.tensor(np.load(io.BytesIO(data), allow_pickle=False), dtype=torch.float32)
    except ValueError as e:  # an object array: loading it would unpickle
        raise DataError(f"{key}: {e}; dtrain never unpickles shard data: write numeric .npy arrays") from None


def decode_sample(sample: dict, captions: bool = False) -> tuple:
    """(x [C, H, W], label) or, for a reflow pair, (x, label, noise [C, H, W]); with `captions` the label
    is the sample's caption (txt, a str) instead. A sample holding a pickled payload is refused before
    anything is decoded: shard data never runs pickle."""
    pickled = sorted(k for k in sample if k.rsplit(".", 1)[-1] in PICKLED)
    if pickled:
        raise DataError(f"sample {sample.get('__key__')} of {sample.get('__url__')} holds {pickled}: dtrain never "
                        "unpickles shard data; write arrays as .npy and images as .png")
    if "noise.npy" in sample:
        return _array(sample["x.npy"], "x.npy"), _label(sample, captions), _array(sample["noise.npy"], "noise.npy")
    if "latent.npy" in sample:  # latents are used as encoded: already scaled, no [-1, 1] mapping
        return _array(sample["latent.npy"], "latent.npy"), _label(sample, captions)
    ext = next((e for e in IMAGES if e in sample), None)
    if ext is None:
        raise _missing(sample, f"image ({'/'.join(IMAGES)})")
    label = _label(sample, captions)
    with Image.open(io.BytesIO(sample[ext])) as im:
        if im.mode not in ("L", "RGB"):  # palette via RGBA, so its transparency converts cleanly
            im = (im.convert("RGBA") if im.mode == "P" else im).convert("L" if im.mode in ("1", "LA") else "RGB")
        img = np.asarray(im, dtype=np.float32) / 127.5 - 1.0  # [-1, 1]
    x = torch.from_numpy(img)
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)  # [C, H, W]
    return x, label


def caption_of(sample: dict) -> str:
    """A raw sample's caption (its txt, stripped; "" where it has none)."""
    return sample.get("txt", b"").decode("utf-8", errors="replace").strip()


def _label(sample: dict, captions: bool = False) -> int | str:
    """`cls`, or -1 ("no class", embedded as the null label) for a sample with a caption instead; with
    `captions`, the caption itself, or its precomputed embeddings (emb.npy) where the sample has them."""
    text = caption_of(sample)
    if captions:
        if "emb.npy" in sample:  # a frozen text encoder's embeddings, precomputed (dtrain.data.text_encoders)
            return _array(sample["emb.npy"], "emb.npy")
        if text:
            return text
        raise _missing(sample, "caption (a non-empty txt; a text model trains on captions)")
    if "cls" in sample:
        return int(sample["cls"])
    if text:
        return -1
    raise _missing(sample, "label (cls, or a non-empty caption in txt)")


def _missing(sample: dict, what: str) -> MissingField:
    keys = sorted(k for k in sample if not k.startswith("__"))
    return MissingField(f"sample {sample.get('__key__')} of {sample.get('__url__')} has no {what}; it has {keys}")


def _decoded(samples, handler, captions: bool = False) -> Iterator[tuple]:
    """decode_sample over `samples`; a sample missing a field goes to `handler`, which skips it by
    returning True (False stops, as in webdataset). Other errors, pickled payloads among them, propagate."""
    for sample in samples:
        try:
            yield decode_sample(sample, captions)
        except MissingField as e:
            if handler(e):
                continue
            break


def shard_count(url: str) -> tuple[int, tuple[Exception, ...]]:
    """(samples, read errors) of one shard: what `tar_samples` yields from it, counted from the tar
    headers without decoding. A shard on object storage is read once as a stream (its bytes, not its
    decoded samples). Cached per (path, size, mtime) in this process."""
    if storage.is_uri(url):
        info = storage.file_info(url)
        key, size = (url, info.size, info.mtime_ns), info.size
    else:
        st = os.stat(url)
        key, size = (os.path.abspath(url), st.st_size, st.st_mtime_ns), st.st_size
    if key not in _COUNTS:
        try:
            _COUNTS[key] = (_count_headers(url, size), ())
        except Exception:  # corrupt, compressed or unusual tar: count what the reader itself gets (no decoding)
            errors = []  # as text: webdataset's exceptions hold the open file
            n = sum(1 for _ in tar_samples(url, handler=lambda e: errors.append(DataError(str(e))) or True))
            _COUNTS[key] = (n, tuple(errors))
    return _COUNTS[key]


_COUNTS: dict[tuple, tuple[int, tuple[Exception, ...]]] = {}
_SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator drops these names


def _count_headers(path: str, size: int) -> int:
    """Samples in an uncompressed tar from its headers alone, grouped as webdataset groups them: a new
    sample wherever the key (path up to the basename's first dot) changes. Raises on anything the
    streaming reader might read differently, so the caller counts by reading instead."""
    n, key, suffixes = 0, None, set()
    for name in _regular_members(path, size):
        if ("/" not in name and name.startswith("__") and name.endswith("__")) or _SKIP_META.match(name):
            continue
        prefix, suffix = base_plus_ext(name)
        if prefix is None:
            continue
        if prefix != key:
            n, key, suffixes = n + 1, prefix, set()
        if suffix.lower() in suffixes:
            raise ValueError(f"{path}: duplicate {name}")  # the reader reports it; let it count too
        suffixes.add(suffix.lower())
    return n


def _regular_members(path: str, size: int) -> Iterator[str]:
    """Names of the regular files of a plain tar from its headers (tarfile seeks over member data; an
    object's stream is read through)."""
    remote = storage.is_uri(path)  # "r:" / "r|": no compression; a compressed shard is counted by reading
    with (storage.open_stream(path) if remote else contextlib.nullcontext()) as stream, \
            tarfile.open(None if remote else path, "r|" if remote else "r:", fileobj=stream) as tar:
        for m in tar:
            if m.sparse is not None or (not m.isfile() and m.size):
                raise tarfile.ReadError(f"{path}: unusual member {m.name}")
            if m.isfile():
                if m.offset_data + m.size > size:
                    raise tarfile.ReadError(f"{path}: truncated at {m.name}")
                yield m.name


def _shuffled(samples, bufsize: int, rng: random.Random):
    """Buffer shuffle of one shard's samples: fill `bufsize`, then emit a random buffered sample for
    each new one; the rest in random order at the end. A buffer larger than the shard shuffles it
    fully, exactly as a buffer of the shard's size would."""
    buf = []
    for s in samples:
        if len(buf) < bufsize:
            buf.append(s)
            continue
        k = rng.randrange(bufsize)
        yield buf[k]
        buf[k] = s
    rng.shuffle(buf)
    yield from buf


def _rank_shards(shards: list[str], rank: int, world: int, epoch: int, seed: int) -> list[str]:
    shards = list(shards)
    random.Random(seed * 100_003 + epoch).shuffle(shards)
    return shards[rank::world]


class EpochDataset(torch.utils.data.IterableDataset):
    """One epoch of one rank's batches; each DataLoader worker w of n reads shards[w::n] and batches
    its own samples. `skip_rounds` > 0 (resuming): every worker first drops that many of its batches,
    whole shards by their counts, then the first samples of the next shard before decoding."""

    def __init__(self, shards, epoch, seed, batch_size, shuffle_buffer, on_corrupt, skip_rounds=0, counts=None,
                 captions=False):
        self.shards, self.epoch, self.seed, self.batch_size = shards, epoch, seed, batch_size
        self.shuffle_buffer, self.on_corrupt = max(1, shuffle_buffer), on_corrupt
        self.skip_rounds, self.counts, self.captions = skip_rounds, counts, captions

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        mine = self.shards[info.id::info.num_workers] if info else self.shards
        skip = 0
        if self.skip_rounds:
            own = sum(self.counts[u][0] for u in mine) // self.batch_size
            skip = min(self.skip_rounds, own) * self.batch_size
        todo = _drops(mine, skip, self.counts, self.on_corrupt)
        samples = itertools.chain.from_iterable(self._shard(u, drop) for u, drop in todo)
        return wds.batched(self.batch_size, partial=False)(_decoded(samples, self.on_corrupt, self.captions))

    def _shard(self, url: str, drop: int):
        raw = tar_samples(url, handler=self.on_corrupt)
        rng = random.Random(f"{self.seed}/{self.epoch}/{os.path.basename(url)}")
        return itertools.islice(_shuffled(raw, self.shuffle_buffer, rng), drop, None)  # raw: dropped undecoded


def _drops(urls: list[str], skip: int, counts, on_corrupt):
    """(url, samples to drop from its shuffled stream) for the shards still to read after skipping
    `skip` samples; wholly skipped shards are not opened, their read errors are reported as a replay would."""
    for u in urls:
        if skip and skip >= counts[u][0]:
            skip -= counts[u][0]
            for e in counts[u][1]:
                on_corrupt(e)
            continue
        yield u, skip
        skip = 0


def epoch_dataset(urls: str, rank: int, world: int, epoch: int, seed: int, batch_size: int,
                  shuffle_buffer: int, on_corrupt: CorruptShards | None = None, skip_rounds: int = 0,
                  counts: dict | None = None, captions: bool = False) -> EpochDataset:
    """One epoch of this rank's batches. Corrupt tar data and samples missing a field go to `on_corrupt`
    (default: skip and warn)."""
    shards = expand_urls(urls)
    if len(shards) < world:
        raise DataError(f"{len(shards)} shard(s) for {world} workers: every worker needs one; write more shards")
    return EpochDataset(_rank_shards(shards, rank, world, epoch, seed), epoch, seed, batch_size, shuffle_buffer,
                        on_corrupt or CorruptShards(), skip_rounds, counts, captions)


def _skip_position(shards, rank, world, seed, batch_size, workers, skip, on_corrupt):
    """Where `skip` batches of this rank end: (epoch, whole rounds of worker batches every worker drops
    in it, batches left to drop from the loader, shard counts).
    A DataLoader yields its workers' batches round-robin, in order, leaving out exhausted workers, so
    round j holds batch j of every worker that has more than j batches this epoch."""
    counts, epoch = {}, 0
    while True:
        mine = _rank_shards(shards, rank, world, epoch, seed)
        counts.update((u, shard_count(u)) for u in mine if u not in counts)  # only the shards it passes
        per_worker = [sum(counts[u][0] for u in mine[w::workers]) // batch_size for w in range(workers)]
        if sum(per_worker) == 0:
            raise DataError(f"rank {rank} gets no full batch of {batch_size} from its shards in epoch {epoch}")
        if skip < sum(per_worker):
            break
        skip -= sum(per_worker)  # a whole epoch, by arithmetic
        for u in mine:
            for e in counts[u][1]:
                on_corrupt(e)
        epoch += 1
    rounds = 0
    while skip >= (active := sum(b > rounds for b in per_worker)):
        skip, rounds = skip - active, rounds + 1
    return epoch, rounds, skip, counts


def train_batches(urls: str, rank: int, world: int, seed: int, batch_size: int, shuffle_buffer: int,
                  loader_workers: int = 0, skip: int = 0,
                  on_corrupt: CorruptShards | None = None, captions: bool = False) -> Iterator[tuple]:
    """Endless stream of (x [B, C, H, W], labels [B]) for this rank, epoch after epoch: images in
    [-1, 1], or latents as stored; pair shards add their noise (x, labels, noise [B, C, H, W]). With
    `captions`, a list of B captions takes the labels' place.
    `skip` batches are dropped first: that is how a resumed run continues where it stopped. Shards are
    skipped by their sample counts, without decoding."""
    on_corrupt = on_corrupt or CorruptShards()
    epoch, rounds, drop, counts = 0, 0, skip, None
    shards = expand_urls(urls)
    if skip and len(shards) >= world:  # too few shards: epoch_dataset says so below
        epoch, rounds, drop, counts = _skip_position(shards, rank, world, seed, batch_size, max(1, loader_workers),
                                                     skip, on_corrupt)
    while True:
        ds = epoch_dataset(urls, rank, world, epoch, seed, batch_size, shuffle_buffer, on_corrupt, rounds, counts,
                           captions)
        loader = wds.WebLoader(ds, batch_size=None, num_workers=loader_workers) if loader_workers else ds
        produced = 0
        for x, y, *rest in loader:
            produced += 1
            if drop:  # replay, or the < loader_workers batches of a partly skipped round
                drop -= 1
                continue
            yield x, (y if isinstance(y, torch.Tensor) else list(y) if captions else torch.as_tensor(y)), *rest
        if produced == 0 and not rounds:
            raise DataError(f"rank {rank} got no full batch of {batch_size} from {urls} in epoch {epoch}")
        epoch, rounds = epoch + 1, 0


def load_images(urls: str, limit: int | None = None, captions: bool = False) -> tuple[torch.Tensor, torch.Tensor | list]:
    """All (or the first `limit`) samples of some shards, in order: for evaluation and tests; with
    `captions`, their captions (a list) instead of labels. A sample missing a field raises
    `MissingField`: nothing is skipped."""
    xs, ys = [], []
    for sample in itertools.chain.from_iterable(map(tar_samples, expand_urls(urls))):
        x, y, *_ = decode_sample(sample, captions)
        xs.append(x)
        ys.append(y)
        if limit and len(xs) >= limit:
            break
    if captions:  # captions, or their precomputed embeddings stacked
        return torch.stack(xs), (torch.stack(ys) if ys and isinstance(ys[0], torch.Tensor) else ys)
    return torch.stack(xs), torch.tensor(ys)

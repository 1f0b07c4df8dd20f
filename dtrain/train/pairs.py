"""Reflow pairs (Liu et al. 2022, Alg. 1): (noise, condition, sample) couplings made by a teacher's ODE,
written as WebDataset shards by a Ray task job over every worker of the cluster.

Shard i holds the pairs of seeds [i * per_shard, (i + 1) * per_shard). A class teacher's seed s asks
for label s % num_classes (balanced classes), stored as `cls`. A text teacher's seed s asks for the
caption corpus[s % len(corpus)], where the corpus is the first `count` captions of the teacher's own
training shards (so the pairs cover what it learnt), encoded with the teacher's tokenizer; the caption
is stored as `txt`, which a text reflow student trains on (and encodes with the same tokenizer,
inherited from its parent). The corpus is read once by `generate_pairs`; each task gets its shard's
captions only. A shard is one task: it loads the teacher from its checkpoint,
solves in fixed chunks of CHUNK seeds, and writes its tar under a temporary name that is renamed
when complete. So a shard on disk is finished, a killed job reruns only the missing ones, and the
pairs do not depend on how many workers made them. `pairs.json` beside the shards records the
teacher and the sampler (the reflow stage's lineage); a rerun with other settings is refused.
The output may be a URI (s3://...): a shard is then written locally and uploaded whole (an object
store's put is atomic, so there too a shard that exists is finished).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from dtrain import checkpoint as ckpt_io
from dtrain import storage
from dtrain.data.captions import caption_corpus
from dtrain.data.shards import DataError, encode_npy, expand_urls
from dtrain.diffusion.samplers import initial_noise

PAIRS_FILE = "pairs.json"  # beside pair shards: the teacher and sampler that made them (and where the captions came from)
CHUNK = 64  # seeds per solver call inside a shard: fixed, so results never depend on the cluster
SHARD_NAME = "pairs-{:06d}.tar"


def write_pair_shard(teacher: str, out: str, index: int, per_shard: int, steps: int, sampler: str,
                     guidance: float, captions: list[str] | None = None) -> str:
    """Solve the teacher's ODE for shard `index`'s seeds and write their pairs; returns the shard path.
    A text teacher needs `captions`: the per_shard captions its seeds ask for, in seed order."""
    from dtrain.generation import conditions, solve

    net, cfg = ckpt_io.load_model(teacher)
    m = cfg.model
    text = m.conditioning == "text"
    if text and (captions is None or len(captions) != per_shard):
        raise DataError(f"pairs: a text teacher's shard needs its {per_shard} captions, got "
                        f"{'none' if captions is None else len(captions)}")
    tokenizer = ckpt_io.read_tokenizer(teacher) if text else None
    path = f"{out}/{SHARD_NAME.format(index)}"
    remote = storage.is_uri(out)
    if remote:
        fd, tmp = tempfile.mkstemp(suffix=".tar")
        os.close(fd)
    else:
        Path(out).mkdir(parents=True, exist_ok=True)
        tmp = str(Path(out) / f".{SHARD_NAME.format(index)}.tmp")
    with wds.TarWriter(tmp) as sink:
        for lo in range(index * per_shard, (index + 1) * per_shard, CHUNK):
            seeds = list(range(lo, min(lo + CHUNK, (index + 1) * per_shard)))
            if text:
                asked = [captions[s - index * per_shard] for s in seeds]
                cond = conditions(cfg, tokenizer, asked)  # token ids [B, max_tokens]
                fields = [{"txt": c.encode()} for c in asked]
            else:
                cond = torch.tensor(seeds) % m.num_classes  # [B]
                fields = [{"cls": str(y).encode()} for y in cond.tolist()]
            x = solve(net, cfg, cond, seeds, steps, guidance, "fp32", sampler)  # [B, C, h, w]
            noise = initial_noise(x.shape[1:], seeds)  # the same noise solve started from
            for s, f, xi, ni in zip(seeds, fields, x, noise):
                sink.write({"__key__": f"{s:09d}", "x.npy": encode_npy(xi.numpy().astype(np.float32)),
                            "noise.npy": encode_npy(ni.numpy().astype(np.float32)), **f,
                            "seed": str(s).encode()})
    if remote:
        storage.upload(tmp, path)
        os.unlink(tmp)
    else:
        os.replace(tmp, path)
    return path


def generate_pairs(teacher: str, out: str | Path, count: int, per_shard: int = 256, steps: int = 32,
                   sampler: str = "heun", guidance: float = 1.0) -> list[str]:
    """Pairs from `teacher` (a checkpoint or run dir, local or a URI) into `out` (a directory or a URI),
    on the connected Ray cluster (call dtrain.runtime.ensure_ray first). Finished shards are kept;
    returns every shard's path. A text teacher's pairs carry captions of its training shards (module
    docstring); pairs.json names those shards under `captions`."""
    from dtrain.runtime import run_tasks

    if count <= 0 or per_shard <= 0 or count % per_shard:
        raise DataError(f"pairs: count {count} must be a positive multiple of per_shard {per_shard}")
    ckpt = ckpt_io.locate(teacher)
    meta = ckpt_io.read_meta(ckpt)
    tcfg = ckpt_io.read_config(ckpt)
    text = tcfg.model.conditioning == "text"
    out = storage.absolute(out)
    info = {"teacher": ckpt, "teacher_stage": meta.get("stage"), "teacher_reflow_k": meta.get("reflow_k", 1),
            "teacher_step": meta.get("step"), "sampler": sampler, "steps": steps, "guidance": guidance,
            "count": count, "per_shard": per_shard}
    if text:  # only then: pairs.json of a class teacher stays as it was, so its pairs are still resumed
        info["captions"] = tcfg.data.train_shards
    if not storage.is_uri(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    existing = f"{out}/{PAIRS_FILE}"
    if storage.exists(existing) and json.loads(storage.read_text(existing)) != info:
        raise DataError(f"{out} holds pairs made with other settings ({existing}): choose another --out, "
                        f"or delete it to start over")
    storage.write_bytes(existing, json.dumps(info, indent=2).encode())
    lat = meta.get("latents")
    if isinstance(lat, dict):  # latent pairs decode through the teacher's VAE: the student records it too
        storage.write_bytes(f"{out}/latents.json", json.dumps(lat).encode())
    shards = [f"{out}/{SHARD_NAME.format(i)}" for i in range(count // per_shard)]
    todo = [i for i, p in enumerate(shards) if not storage.exists(p)]
    if todo:
        print(f"[dtrain] pairs: {len(todo)} of {len(shards)} shard(s) of {per_shard} from {ckpt} "
              f"({sampler}, {steps} steps, guidance {guidance})", flush=True)
        corpus = teacher_captions(tcfg, count) if text else None
        run_tasks(write_pair_shard, [(ckpt, out, i, per_shard, steps, sampler, guidance,
                                      _slice(corpus, i * per_shard, per_shard) if corpus else None) for i in todo],
                  desc="pair shards")
    if not storage.is_uri(out):
        for stale in Path(out).glob(".pairs-*.tmp"):  # left by a killed task; its shard was just rewritten
            stale.unlink(missing_ok=True)
    return shards


def teacher_captions(cfg, count: int) -> list[str]:
    """The caption corpus of a text teacher's pairs: the first `count` captions (no seed needs more) of its
    training shards, cfg.data.train_shards. DataError where they hold none."""
    urls = cfg.data.train_shards
    try:
        corpus = list(caption_corpus(urls, limit=count))
    except (OSError, ValueError) as e:
        raise DataError(f"pairs: a text teacher's pairs ask for the captions it trained on, but its training "
                        f"shards {urls} cannot be read here: {e}") from None
    if not corpus:
        raise DataError(f"pairs: the text teacher's training shards {urls} hold no captions (txt)")
    return corpus


def _slice(corpus: list[str], first: int, n: int) -> list[str]:
    """The captions of seeds first .. first + n - 1: seed s asks for corpus[s % len(corpus)]."""
    return [corpus[s % len(corpus)] for s in range(first, first + n)]


def shard_urls(out: str | Path, count: int, per_shard: int) -> str:
    """The brace URL of a pairs directory's (or prefix's) shards, for data.train_shards."""
    n = count // per_shard
    return f"{storage.absolute(out)}/pairs-{{000000..{n - 1:06d}}}.tar"



def read_pairs_info(urls: str) -> dict:
    """The `pairs.json` beside pair shards; DataError when the shards are not pairs."""
    info = storage.sibling(expand_urls(urls)[0], PAIRS_FILE)
    if not storage.exists(info):
        raise DataError(f"stage reflow trains on pairs, but {info} is missing: data.train_shards={urls} are not "
                        "pair shards (make them with `dtrain pairs TEACHER --out DIR`)")
    return json.loads(storage.read_text(info))

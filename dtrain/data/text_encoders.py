"""Frozen Hugging Face text encoders (CLIP or T5 text towers through `transformers`) and their
embeddings precomputed into shards, as `dtrain.data.latents` does for a VAE.

A caption becomes the encoder's last hidden states [max_tokens, E] with the padding positions set to
exactly zero: the backbone reads the mask back from the nonzero rows, and an all-zero caption is the
null condition of classifier-free guidance (the empty prompt "" maps to it, not to the encoding of its
start and end tokens). The encoder is named by `model.text_encoder`: a local directory
(`save_pretrained`) or a hub id, loaded with the tokenizer saved beside it. Nothing downloads unless the
user's environment allows the Hub (HF_HUB_OFFLINE is set to 1 here when unset).

Precomputed shards keep every input field and add `emb.npy` (float32 [max_tokens, E]); a record
`text_embeddings.json` beside them names the encoder and the length.
"""
from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from dtrain import storage
from dtrain.data.shards import DataError, caption_of, encode_npy, expand_urls, tar_samples

EMBEDDINGS_FILE = "text_embeddings.json"


def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is first imported
    import transformers

    return transformers


@functools.lru_cache(maxsize=2)
def load_text_encoder(name: str):
    """(tokenizer, model in eval mode with no gradients) of a CLIP or T5 text encoder, or any
    transformers encoder with a last_hidden_state; DataError naming the directory when it cannot load."""
    tf = _transformers()
    try:
        config = tf.AutoConfig.from_pretrained(name)
        kind = {"t5": tf.T5EncoderModel, "clip": tf.CLIPTextModel, "clip_text_model": tf.CLIPTextModel}.get(
            config.model_type, tf.AutoModel)
        model = kind.from_pretrained(name)
        tokenizer = tf.AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as e:
        raise DataError(f"model.text_encoder={name}: not a loadable transformers text encoder with its tokenizer "
                        f"({str(e).splitlines()[0]})") from None
    return tokenizer, model.eval().requires_grad_(False)


def embed_dim(name: str) -> int:
    """The width E of the encoder's hidden states."""
    config = load_text_encoder(name)[1].config
    return int(getattr(config, "hidden_size", None) or config.d_model)


@torch.no_grad()
def embed(name: str, captions: list[str], max_tokens: int) -> torch.Tensor:
    """Frozen embeddings [B, max_tokens, E] (float32) of `captions`: padding rows and the empty caption zero."""
    tokenizer, model = load_text_encoder(name)
    if tokenizer.pad_token is None:  # T5 has one; GPT-style tokenizers may not
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    batch = tokenizer(list(captions), padding="max_length", truncation=True, max_length=max_tokens,
                      return_tensors="pt")
    mask = batch["attention_mask"].bool()
    mask &= torch.tensor([bool(c.strip()) for c in captions])[:, None]  # "" is the null condition: all zero
    hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return (hidden.float() * mask[..., None]).contiguous()


def embed_shards(urls: str, name: str, out: str | Path, max_tokens: int, batch_size: int = 64) -> list[str]:
    """Every shard of `urls` again under `out` (same names, keys and order) with `emb.npy` added from its
    caption; written to a temporary name and renamed. Returns the new shards' paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for url in expand_urls(urls):
        path = out / Path(url).name
        tmp = out / f".{path.name}.tmp"
        with wds.TarWriter(str(tmp)) as sink:
            pending: list[dict] = []
            for sample in tar_samples(url):
                pending.append(sample)
                if len(pending) == batch_size:
                    _write_embedded(sink, pending, name, max_tokens)
                    pending = []
            _write_embedded(sink, pending, name, max_tokens)
        os.replace(tmp, path)
        paths.append(str(path))
    record = {"text_encoder": name, "max_tokens": max_tokens, "embed_dim": embed_dim(name)}
    storage.write_bytes(str(out / EMBEDDINGS_FILE), json.dumps(record, indent=2).encode())
    return paths


def _write_embedded(sink, samples: list[dict], name: str, max_tokens: int) -> None:
    if not samples:
        return
    texts = [caption_of(s) for s in samples]
    missing = [s["__key__"] for s, t in zip(samples, texts) if not t]
    if missing:
        raise DataError(f"samples {missing[:3]} of {samples[0].get('__url__')} have no caption (txt) to embed")
    for sample, e in zip(samples, embed(name, texts, max_tokens)):
        sink.write({**{k: v for k, v in sample.items() if k != "__url__" and not k.startswith("__local")},
                    "emb.npy": encode_npy(e.numpy().astype(np.float32))})

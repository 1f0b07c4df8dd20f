"""Captions as token ids: a tokenizer trained on the caption corpus with Hugging Face `tokenizers`.

BPE over lower-cased, whitespace-split words, [PAD] first (id 0 = dtrain.models.text.PAD_ID: the
empty caption encodes to all padding, the null condition) and [UNK] second. The tokenizer travels as
its JSON (`tokenizer.json`): in the run directory, in every checkpoint, in exported files, so a
checkpoint encodes prompts the way it was trained.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from dtrain.data.shards import DataError, caption_of, expand_urls, tar_samples
from dtrain.models.text import PAD_ID

PAD, UNK = "[PAD]", "[UNK]"
TOKENIZER_FILE = "tokenizer.json"


def train_tokenizer(captions: Iterable[str], vocab_size: int) -> Tokenizer:
    """A BPE tokenizer of at most `vocab_size` tokens learned from `captions`."""
    tok = Tokenizer(BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(captions, BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, UNK], show_progress=False))
    assert tok.token_to_id(PAD) == PAD_ID
    return tok


def from_json(text: str) -> Tokenizer:
    return Tokenizer.from_str(text)


def encode(tok: Tokenizer, captions: list[str], max_tokens: int) -> torch.Tensor:
    """Token ids [B, max_tokens] (long): each caption cut to max_tokens, padded with PAD_ID."""
    rows = [e.ids[:max_tokens] for e in tok.encode_batch(list(captions))]
    return torch.tensor([r + [PAD_ID] * (max_tokens - len(r)) for r in rows], dtype=torch.long).view(len(rows), max_tokens)


def caption_corpus(urls: str, limit: int | None = None) -> Iterator[str]:
    """The captions (txt) of the samples in `urls`, in order; samples without one are passed over."""
    texts = map(caption_of, itertools.chain.from_iterable(map(tar_samples, expand_urls(urls))))
    return itertools.islice((t for t in texts if t), limit)


def distinct_captions(urls: str, n: int) -> list[str]:
    """The first `n` distinct captions of `urls` (among their first 50 n): a text model's grid prompts."""
    return list(dict.fromkeys(caption_corpus(urls, 50 * n)))[:n]


def tokenizer_for(urls: str, vocab_size: int, limit: int = 200_000) -> Tokenizer:
    """A tokenizer trained on the first `limit` captions of `urls`; DataError where they hold none."""
    corpus = list(caption_corpus(urls, limit))
    if not corpus:
        raise DataError(f"{urls} holds no captions (txt): a text model (model.conditioning=text) trains on "
                        "captioned shards, or give model.tokenizer")
    return train_tokenizer(corpus, vocab_size)


def read_tokenizer_file(path: str | Path) -> str:
    """The JSON of a tokenizer file, checked to load; DataError naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"model.tokenizer: no such file {p}")
    text = p.read_text()
    try:
        from_json(text)
    except Exception as e:  # tokenizers raises its own exception type
        raise DataError(f"model.tokenizer: {p} is not a tokenizers JSON file: {e}") from None
    return text


def caption_encoder(text_encoder: str, max_tokens: int, tokenizer: str | None) -> Callable[[list[str]], torch.Tensor]:
    """captions -> a text model's condition (model.text_encoder, model.max_tokens): token ids by its tokenizer
    (JSON), or, over a frozen encoder, that encoder's embeddings (dtrain.data.text_encoders)."""
    if text_encoder:
        from dtrain.data.text_encoders import embed

        return lambda texts: embed(text_encoder, texts, max_tokens)
    if tokenizer is None:
        raise DataError("a text model trained from scratch encodes captions with its tokenizer: none was given")
    tok = from_json(tokenizer)
    return lambda texts: encode(tok, texts, max_tokens)

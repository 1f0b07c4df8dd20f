"""A frozen Hugging Face text encoder: a tiny randomly initialised CLIP text tower and T5 encoder, saved to a
local directory with a tokenizer and loaded the way a user's real one loads (nothing downloads); its
embeddings precomputed into shards equal the live ones, and a text model trains on either."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import webdataset as wds
from click.testing import CliRunner

from dtrain.config import load_config
from dtrain.data.captions import train_tokenizer
from dtrain.data.shards import encode_png, load_images, train_batches
from dtrain.diffusion import build_objective
from dtrain.generation import conditions, render
from dtrain.models import build_model

CAPTIONS = ["a red circle", "two blue squares at the top", "a green triangle and a red square",
            "three yellow crosses", "an orange diamond at the bottom left", "a blue circle"]


def save_encoder(path, kind: str) -> str:
    """A tiny random `transformers` text encoder and a fast tokenizer (trained on CAPTIONS) in `path`."""
    import transformers as tf

    tok = train_tokenizer(CAPTIONS, 64)
    fast = tf.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                      eos_token="[UNK]", bos_token="[UNK]")
    torch.manual_seed(0)
    if kind == "clip":
        model = tf.CLIPTextModel(tf.CLIPTextConfig(vocab_size=64, hidden_size=24, intermediate_size=48,
                                                   num_hidden_layers=1, num_attention_heads=2,
                                                   max_position_embeddings=16, pad_token_id=0,
                                                   bos_token_id=1, eos_token_id=1))
    else:
        model = tf.T5EncoderModel(tf.T5Config(vocab_size=64, d_model=24, d_kv=12, d_ff=48, num_layers=1,
                                              num_heads=2, pad_token_id=0))
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=["clip", "t5"])
def encoder_dir(request, tmp_path_factory):
    return save_encoder(tmp_path_factory.mktemp(request.param), request.param)


def frozen_cfg(encoder: str, *over):
    from dtrain.train.driver import with_text_encoder

    return with_text_encoder(load_config(None, [
        "model.size=tiny", "model.image_size=8", "model.in_channels=3", "model.conditioning=text",
        f"model.text_encoder={encoder}", "model.max_tokens=8", "model.text_depth=1", *over]))


def test_precomputed_embeddings_equal_live_ones_and_feed_training(tmp_path, encoder_dir):
    from dtrain.cli import main
    from dtrain.data.text_encoders import embed

    with wds.TarWriter(str(tmp_path / "a.tar")) as sink:
        for i, text in enumerate(CAPTIONS):
            sink.write({"__key__": f"{i:04d}", "png": encode_png(np.full((8, 8, 3), 30 * i, np.uint8)),
                        "txt": text.encode()})
    out = CliRunner().invoke(main, ["data", "embed", str(tmp_path / "a.tar"), "--encoder", encoder_dir,
                                    "--out", str(tmp_path / "emb"), "--max-tokens", "8"])
    assert out.exit_code == 0, out.output
    x, stored = load_images(str(tmp_path / "emb" / "a.tar"), captions=True)
    live = embed(encoder_dir, CAPTIONS, 8)
    assert stored.shape == live.shape == (6, 8, 24) and torch.equal(stored, live)
    assert torch.equal(x, load_images(str(tmp_path / "a.tar"))[0])  # the images are kept as they were
    assert (embed(encoder_dir, [""], 8) == 0).all()  # the empty prompt is the null condition: all zero

    cfg = frozen_cfg(encoder_dir)
    assert cfg.model.text_embed_dim == 24
    net = build_model(cfg.model)
    assert net.text.table is None and net.text.project.in_features == 24
    _, cond = next(train_batches(str(tmp_path / "emb" / "a.tar"), 0, 1, 0, 4, 1, captions=True))
    loss = build_objective(cfg.objective)(net, {"x": torch.randn(4, 3, 8, 8), "cond": cond}).mean()
    loss.backward()
    assert torch.isfinite(loss) and net.text.project.weight.grad is not None
    assert not any(k.startswith("text_encoder") for k in net.state_dict())  # the frozen weights stay outside


def test_prompts_sample_through_the_frozen_encoder(encoder_dir):
    cfg = frozen_cfg(encoder_dir)
    torch.manual_seed(0)
    net = build_model(cfg.model)
    for p in net.parameters():
        p.data.add_(0.2 * torch.randn_like(p))
    cond = conditions(cfg, None, ["a red circle", "three yellow crosses"])
    assert cond.shape == (2, 8, 24) and cond.is_floating_point()
    x = render(net.eval(), cfg, {}, cond, [0, 1], 2, 2.0)
    assert x.shape == (2, 3, 8, 8) and torch.isfinite(x).all()
    other = render(net, cfg, {}, conditions(cfg, None, ["three yellow crosses", "a red circle"]), [0, 1], 2, 2.0)
    assert not torch.allclose(x, other)  # the prompt reaches the image


def test_a_directory_that_is_no_encoder_is_refused_naming_it(tmp_path):
    from dtrain.data.shards import DataError
    from dtrain.data.text_encoders import embed_dim

    with pytest.raises(DataError, match="model.text_encoder"):
        embed_dim(str(tmp_path))

"""Text conditioning: the caption tokenizer, the text encoder and cross-attention in both backbones, the
null (empty) caption for guidance, captions read from shards, tokenizers in checkpoints, `dtrain sample
--prompt`. Tiny models, no Ray (the real-stack run is in test_shapes_e2e.py)."""
from __future__ import annotations

import pytest
import torch
import webdataset as wds
from click.testing import CliRunner

from dtrain.checkpoint import (TOKENIZER_FILE, CheckpointError, export, load_model, read_tokenizer,
                               write_inference_files)
from dtrain.config import ConfigError, load_config
from dtrain.data.captions import PAD, UNK, encode, from_json, tokenizer_for, train_tokenizer
from dtrain.data.shards import MissingField, decode_sample, encode_png, load_images, train_batches
from dtrain.diffusion.samplers import dropped, guided
from dtrain.generation import conditions, render
from dtrain.models import build_model, null_condition
from dtrain.models.text import PAD_ID

CAPTIONS = ["a red circle", "two blue squares at the top", "a green triangle and a red square",
            "three yellow crosses", "an orange diamond at the bottom left", "a blue circle"]


def text_cfg(*over, arch="dit"):
    return load_config(None, [f"model.arch={arch}", "model.size=tiny", "model.image_size=8", "model.patch_size=2",
                              "model.conditioning=text", "model.max_tokens=8", "model.vocab_size=64", *over])


def perturbed(net):
    """The net with every weight moved off its init (zero-initialised outputs would hide the condition)."""
    torch.manual_seed(1)
    for p in net.parameters():
        p.data.add_(0.2 * torch.randn_like(p))
    return net.eval()


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CAPTIONS, 64)


def test_the_tokenizer_pads_with_id_0_and_the_empty_caption_is_all_padding(tok):
    assert (tok.token_to_id(PAD), tok.token_to_id(UNK)) == (PAD_ID, 1)
    ids = encode(tok, ["A RED circle", "", "a red circle " * 10], 8)
    assert ids.shape == (3, 8) and ids.dtype == torch.long
    assert torch.equal(ids[0], encode(tok, ["a red circle"], 8)[0])  # lower-cased
    assert (ids[0, :3] != PAD_ID).all() and (ids[0, 3:] == PAD_ID).all()
    assert (ids[1] == PAD_ID).all()  # the null condition
    assert (ids[2] != PAD_ID).all()  # cut at max_tokens
    assert torch.equal(encode(from_json(tok.to_str()), CAPTIONS, 8), encode(tok, CAPTIONS, 8))  # the JSON round trip


@pytest.mark.parametrize("arch", ["dit", "ssm"])
def test_both_backbones_follow_the_caption_and_the_empty_one_is_their_null(tok, arch):
    cfg = text_cfg(arch=arch)
    net = perturbed(build_model(cfg.model))
    assert net.y_embed is None and all(b.cross is not None for b in net.blocks)
    x, t = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    ids = encode(tok, ["a red circle", "two blue squares at the top"], 8)
    out = net(x, t, ids)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert not torch.allclose(out[0], net(x, t, ids.flip(0))[0])  # another caption, another output
    null = torch.full_like(ids, null_condition(cfg.model))
    assert torch.isfinite(net(x, t, null)).all()  # the empty caption: only the start token, no NaN
    assert torch.equal(null, encode(tok, ["", ""], 8))


def test_padding_is_masked_out_so_the_caption_length_does_not_matter(tok):
    net = perturbed(build_model(text_cfg("model.max_tokens=12").model))
    x, t = torch.randn(1, 1, 8, 8), torch.full((1,), 0.3)
    assert torch.allclose(net(x, t, encode(tok, ["a red circle"], 6)), net(x, t, encode(tok, ["a red circle"], 12)),
                          atol=1e-5)
    with pytest.raises(ValueError, match="max_tokens"):
        net(x, t, torch.ones(1, 13, dtype=torch.long))


def test_caption_dropout_empties_whole_captions_in_training_only(tok):
    net = perturbed(build_model(text_cfg("model.class_dropout=0.5").model))
    x, t = torch.randn(64, 1, 8, 8), torch.full((64,), 0.5)
    ids = encode(tok, ["a red circle"] * 64, 8)
    full, empty = net(x, t, ids), net(x, t, torch.zeros_like(ids))
    net.train()
    torch.manual_seed(0)
    out = net(x, t, ids)
    as_full = torch.isclose(out, full, atol=1e-5).flatten(1).all(1)
    as_empty = torch.isclose(out, empty, atol=1e-5).flatten(1).all(1)
    assert (as_full ^ as_empty).all() and 10 < int(as_empty.sum()) < 54  # each row one or the other, about half


def test_guidance_and_dropout_make_token_rows_null_and_a_negative_prompt_replaces_the_empty_one():
    seen = []
    net = lambda x, t, c: seen.append(c) or torch.zeros_like(x)  # noqa: E731
    cond = torch.tensor([[5, 6, 0], [7, 0, 0]])
    guided(net, cond, 3.0, PAD_ID)(torch.zeros(2, 1), torch.zeros(2))
    assert torch.equal(seen[-1], torch.cat([cond, torch.zeros_like(cond)]))
    negative = torch.tensor([[9, 9, 0], [9, 0, 0]])
    guided(net, cond, 3.0, negative)(torch.zeros(2, 1), torch.zeros(2))
    assert torch.equal(seen[-1], torch.cat([cond, negative]))
    assert torch.equal(dropped(cond, torch.tensor([True, False]), PAD_ID), torch.tensor([[0, 0, 0], [7, 0, 0]]))
    assert torch.equal(dropped(torch.tensor([3, 4]), torch.tensor([False, True]), 10), torch.tensor([3, 10]))


def test_render_samples_prompts_and_a_negative_prompt_changes_them(tok):
    cfg = text_cfg()
    net = perturbed(build_model(cfg.model))
    cond = conditions(cfg, tok.to_str(), ["a red circle", "a blue circle"])
    plain = render(net, cfg, {}, cond, [0, 1], 2, 2.0)
    assert plain.shape == (2, 1, 8, 8)
    negative = conditions(cfg, tok.to_str(), ["a red circle"] * 2)
    assert not torch.allclose(plain, render(net, cfg, {}, cond, [0, 1], 2, 2.0, negative=negative))
    with pytest.raises(ValueError, match="text model"):
        conditions(load_config(None, []), None, ["a red circle"])


def _captioned_shard(path, captions):
    import numpy as np

    with wds.TarWriter(str(path)) as sink:
        for i, text in enumerate(captions):
            sink.write({"__key__": f"{i:04d}", "png": encode_png(np.full((8, 8, 3), 40 * i, np.uint8)),
                        "txt": text.encode(), "cls": b"3"})
    return str(path)


def test_shards_give_a_text_model_captions_and_refuse_a_sample_without_one(tmp_path):
    url = _captioned_shard(tmp_path / "a.tar", CAPTIONS[:4])
    x, texts = load_images(url, captions=True)
    assert texts == CAPTIONS[:4] and x.shape == (4, 3, 8, 8)
    assert load_images(url)[1].tolist() == [3] * 4  # a class model still reads cls
    x, y = next(train_batches(url, 0, 1, 0, 2, 1, captions=True))
    assert isinstance(y, list) and set(y) <= set(CAPTIONS[:4]) and len(y) == 2
    with pytest.raises(MissingField, match="caption"):
        decode_sample({"__key__": "k", "png": encode_png(__import__("numpy").zeros((8, 8), "uint8")), "cls": b"1"},
                      captions=True)
    assert tokenizer_for(url, 64).token_to_id("red") is not None


def test_a_text_checkpoint_carries_its_tokenizer_through_export_and_a_class_one_has_none(tmp_path, tok):
    cfg = text_cfg()
    net = build_model(cfg.model)
    write_inference_files(tmp_path / "c", net.state_dict(), cfg, {"step": 1}, tokenizer=tok.to_str())
    assert read_tokenizer(tmp_path / "c") == tok.to_str()
    assert read_tokenizer(export(tmp_path / "c", tmp_path / "m.safetensors")) == tok.to_str()
    (tmp_path / "c" / TOKENIZER_FILE).unlink()
    with pytest.raises(CheckpointError, match="tokenizer"):
        read_tokenizer(tmp_path / "c")
    plain = load_config(None, ["model.size=tiny", "model.image_size=8"])
    write_inference_files(tmp_path / "d", build_model(plain.model).state_dict(), plain, {"step": 1})
    assert read_tokenizer(tmp_path / "d") is None
    loaded, _ = load_model(tmp_path / "c")  # the weights load as for any model
    assert loaded.text is not None


def test_config_refuses_text_on_the_vector_backbone():
    with pytest.raises(ConfigError, match="model.conditioning"):
        load_config(None, ["model.arch=mlp", "model.conditioning=text"])
    with pytest.raises(ConfigError, match="model.max_tokens"):
        text_cfg("model.max_tokens=0")


def test_the_driver_trains_keeps_and_inherits_the_tokenizer(tmp_path, tok):
    from dtrain.train.driver import run_tokenizer

    url = _captioned_shard(tmp_path / "a.tar", CAPTIONS)
    cfg = text_cfg(f"data.train_shards={url}")
    text = run_tokenizer(cfg, tmp_path / "run")
    assert 1 not in encode(from_json(text), CAPTIONS, 8)  # learned from the captions: no unknown token in them
    assert (tmp_path / "run" / TOKENIZER_FILE).read_text() == text
    _captioned_shard(tmp_path / "a.tar", ["purple unicorns"] * 4)  # the data changed: the run keeps its tokenizer
    assert run_tokenizer(cfg, tmp_path / "run") == text
    write_inference_files(tmp_path / "parent", build_model(cfg.model).state_dict(), cfg, {"step": 1},
                          tokenizer=tok.to_str())
    child = text_cfg(f"data.train_shards={url}", f"stage.init_from={tmp_path / 'parent'}")
    assert run_tokenizer(child, tmp_path / "child") == tok.to_str()  # a later stage reads ids as its parent did
    with pytest.raises(ConfigError, match="model.vocab_size"):
        run_tokenizer(text_cfg(f"data.train_shards={url}", "model.vocab_size=4"), tmp_path / "small")
    assert run_tokenizer(load_config(None, []), tmp_path / "class") is None


def test_cli_sample_writes_a_prompt_grid_and_refuses_classes_on_a_text_model(tmp_path, tok):
    from dtrain.cli import main

    cfg = text_cfg()
    write_inference_files(tmp_path / "c", perturbed(build_model(cfg.model)).state_dict(), cfg, {"step": 1},
                          tokenizer=tok.to_str())
    out = CliRunner().invoke(main, ["sample", str(tmp_path / "c"), "--prompt", "a red circle", "--prompt",
                                    "two blue squares", "--per-class", "3", "--steps", "2", "--negative-prompt",
                                    "a blue circle", "--out", str(tmp_path / "g.png"), "--precision", "fp32"])
    assert out.exit_code == 0, out.output
    assert "2 prompts x 3" in out.output and (tmp_path / "g.png").stat().st_size > 0
    bad = CliRunner().invoke(main, ["sample", str(tmp_path / "c"), "--classes", "1"])
    assert bad.exit_code != 0 and "--prompt" in bad.output


@pytest.mark.parametrize("jvp", ["forward", "finite_difference"])
def test_both_distillations_run_on_prompts_with_text_guidance(tok, jvp):
    """Consistency and flow-map distillation of a text teacher: token-id conditions, the empty caption as the
    guidance null, caption dropout shared by teacher and student; a gradient reaches the student's encoder."""
    from dtrain.diffusion.consistency import ConsistencyDistillation
    from dtrain.diffusion.meanflow import MeanFlowLoss

    teacher = perturbed(build_model(text_cfg().model))
    teacher_fn = lambda x, t, c: teacher(x, t, c)  # noqa: E731
    batch = {"x": torch.randn(4, 1, 8, 8), "cond": encode(tok, CAPTIONS[:4], 8)}
    student = build_model(text_cfg().model)
    loss = ConsistencyDistillation(teacher_fn, teacher_fn, PAD_ID, guidance=2.0, cond_dropout=0.5)(student, batch)
    loss.mean().backward()
    assert torch.isfinite(loss).all() and student.text.table.weight.grad is not None
    flow_map = build_model(text_cfg("model.flow_map=true", "objective.name=mean_flow").model)
    objective = MeanFlowLoss(jvp=jvp).distil_from(teacher_fn, 2.0, PAD_ID, 0.5)
    loss = objective(flow_map, batch)
    loss.mean().backward()
    assert torch.isfinite(loss).all() and flow_map.text.table.weight.grad is not None

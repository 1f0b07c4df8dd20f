"""Stages of a text model (model.conditioning=text): reflow pairs carry the captions their teacher was asked
for, a reflow stage trains on them, a pipeline keeps one conditioning and one tokenizer from stage to stage,
and its evaluation reads every stage's samples back on the shapes world (binding accuracy against NFE)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dtrain import runtime
from dtrain.checkpoint import read_meta, read_tokenizer, write_inference_files
from dtrain.config import ConfigError, PipelineConfig, PipelineEvalSpec, load_config
from dtrain.data.captions import caption_corpus, tokenizer_for
from dtrain.data.shapes import ShapesSpec, write_shapes
from dtrain.data.shards import CorruptShards, DataError, expand_urls, train_batches
from dtrain.diffusion.samplers import initial_noise
from dtrain.generation import conditions, solve
from dtrain.models import build_model
from dtrain.plots import COLORS
from dtrain.train.pairs import _slice, generate_pairs, shard_urls, write_pair_shard
from dtrain.train.pipeline import load_pipeline, stage_config
from dtrain.train.stages import build_stage

ROOT = Path(__file__).resolve().parent.parent
TINY = ["model.hidden_size=32", "model.depth=1", "model.num_heads=2", "model.patch_size=8", "model.text_depth=1",
        "model.max_tokens=12"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny shapes world of one or two objects: (train urls, val urls)."""
    out = tmp_path_factory.mktemp("world")
    write_shapes(out, ShapesSpec(image_size=32, train_shards=2, per_shard=64, val=64, heldout=64, max_objects=2),
                 use_ray=False)
    return f"{out}/train-{{000000..000001}}.tar", f"{out}/val-000000.tar"


def text_config(world, *extra: str):
    train, val = world
    return load_config(ROOT / "configs" / "shapes.yaml", [f"data.train_shards={train}", f"data.val_shards={val}",
                                                          *TINY, *extra])


def write_text_checkpoint(path, cfg, seed: int = 0, meta: dict | None = None, captions: str | None = None):
    """An untrained text model's inference checkpoint with a tokenizer of its training captions (or those of
    `captions`); every weight is perturbed so the zero-initialised output layer does not make the velocity
    0 everywhere."""
    torch.manual_seed(seed)
    net = build_model(cfg.model)
    for p in net.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    tokenizer = tokenizer_for(captions or cfg.data.train_shards, cfg.model.vocab_size).to_str()
    write_inference_files(path, net.state_dict(), cfg, meta or {"step": 3, "stage": "pretrain"}, tokenizer=tokenizer)
    return net.eval(), tokenizer


@pytest.fixture(scope="module")
def teacher(world, tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "ckpt"
    cfg = text_config(world)
    net, tokenizer = write_text_checkpoint(path, cfg)
    return path, net, cfg, tokenizer


def _samples(urls) -> dict[int, dict]:
    """seed -> raw sample of some pair shards."""
    import webdataset as wds

    return {int(s["seed"]): s for s in wds.DataPipeline(wds.SimpleShardList(expand_urls(urls)), wds.tarfile_to_samples())}


def in_process(monkeypatch):
    """dtrain.runtime.run_tasks in this process: the pairs job without Ray (the same bytes, tests/test_stages.py)."""
    monkeypatch.setattr(runtime, "run_tasks", lambda fn, args, desc, num_cpus=1.0: [fn(*a) for a in args])


def test_a_text_teachers_pair_shard_holds_its_captions_and_the_guided_ode_solution_for_them(teacher, tmp_path):
    path, net, cfg, tokenizer = teacher
    asked = ["a red circle", "two blue squares", "a green cross at the top", "a white diamond and a red square",
             "an orange circle on the left", "a cyan triangle"]
    shard = write_pair_shard(str(path), str(tmp_path), index=1, per_shard=6, steps=2, sampler="euler", guidance=2.0,
                             captions=asked)
    samples = _samples(shard)
    assert sorted(samples) == list(range(6, 12))  # shard 1 of 6: seeds 6..11, seed 6 + i asks for asked[i]
    assert {s: v["txt"].decode() for s, v in samples.items()} == {6 + i: c for i, c in enumerate(asked)}
    assert not any("cls" in v for v in samples.values())
    x, y, noise = next(train_batches(shard, 0, 1, seed=0, batch_size=6, shuffle_buffer=1, captions=True))
    order = [asked.index(c) for c in y]
    assert sorted(order) == list(range(6))
    seeds = [6 + i for i in order]
    assert torch.equal(noise, initial_noise((3, 32, 32), seeds))
    want = solve(net, cfg, conditions(cfg, tokenizer, [asked[i] for i in order]), seeds, 2, 2.0, "fp32", "euler")
    assert torch.allclose(x, want, atol=1e-5)
    with pytest.raises(DataError, match="needs its 6 captions"):
        write_pair_shard(str(path), str(tmp_path), 0, 6, 2, "euler", 1.0)


def test_text_pairs_ask_for_the_teachers_training_captions_and_pairs_json_says_so(teacher, tiny_checkpoint, tmp_path,
                                                                                   monkeypatch):
    path, _, cfg, _ = teacher
    in_process(monkeypatch)
    out = tmp_path / "pairs"
    shards = generate_pairs(str(path), out, count=8, per_shard=4, steps=1, sampler="euler")
    corpus = list(caption_corpus(cfg.data.train_shards, 8))
    got = {s: v["txt"].decode() for s, v in _samples(shard_urls(out, 8, 4)).items()}
    assert got == {s: corpus[s] for s in range(8)}
    info = json.loads((out / "pairs.json").read_text())
    assert info["captions"] == cfg.data.train_shards and info["teacher"] == str(path.resolve())
    kept = [Path(s).stat().st_mtime_ns for s in shards]
    generate_pairs(str(path), out, count=8, per_shard=4, steps=1, sampler="euler")  # finished: nothing is remade
    assert [Path(s).stat().st_mtime_ns for s in shards] == kept
    assert _slice(["a", "b", "c"], 4, 4) == ["b", "c", "a", "b"]  # seed s asks for corpus[s % len(corpus)]

    # a class teacher's pairs are as before: labels, and no captions in pairs.json
    generate_pairs(str(tiny_checkpoint), tmp_path / "cls", count=4, per_shard=4, steps=1, sampler="euler")
    assert "captions" not in json.loads((tmp_path / "cls" / "pairs.json").read_text())
    assert {v["cls"].decode() for v in _samples(shard_urls(tmp_path / "cls", 4, 4)).values()} == {"0", "1", "2", "3"}


def test_text_pairs_need_the_teachers_captions(world, tmp_path, monkeypatch):
    in_process(monkeypatch)
    write_text_checkpoint(tmp_path / "t", text_config(world, f"data.train_shards={tmp_path}/gone-000000.tar"),
                          captions=world[0])
    with pytest.raises(DataError, match="training shards .*gone"):
        generate_pairs(str(tmp_path / "t"), tmp_path / "p", count=4, per_shard=4, steps=1, sampler="euler")


def test_a_text_reflow_stage_trains_on_the_pairs_captions(teacher, tmp_path, monkeypatch):
    path, _, _, _ = teacher
    in_process(monkeypatch)
    out = tmp_path / "pairs"
    generate_pairs(str(path), out, count=8, per_shard=8, steps=1, sampler="euler")
    cfg = load_config(ROOT / "configs" / "shapes.yaml", [*TINY, "stage.name=reflow", f"stage.init_from={path}",
                                                         f"data.train_shards={shard_urls(out, 8, 8)}",
                                                         "data.batch_size=4", "data.shuffle_buffer=4"])
    stage = build_stage(cfg)
    assert stage.meta()["teacher"] == str(path.resolve()) and stage.meta()["reflow_k"] == 2
    batch = next(stage.batches(cfg, 0, 1, 0, CorruptShards()))
    captions = {v["txt"].decode() for v in _samples(shard_urls(out, 8, 8)).values()}
    assert isinstance(batch["cond"], list) and set(batch["cond"]) <= captions and len(batch["cond"]) == 4
    assert batch["noise"].shape == batch["x"].shape == (4, 3, 32, 32)


def test_a_pipeline_keeps_its_conditioning_and_tokenizer_from_stage_to_stage(tmp_path):
    p = load_pipeline(ROOT / "configs" / "pipeline-shapes.yaml")
    assert [(s.kind, s.name) for s in p.stages] == [("pretrain", "pretrain"), ("reflow", "reflow"),
                                                    ("consistency_distill", "distill")]
    cfgs = [stage_config(p, s, ["stage.teacher=x"] if i else []) for i, s in enumerate(p.stages)]
    assert {c.model.conditioning for c in cfgs} == {"text"} and cfgs[2].sample.sampler == "consistency"
    assert p.eval.audit is False

    (tmp_path / "exp.yaml").write_text((ROOT / "configs" / "shapes.yaml").read_text())
    for override, message in (("model.conditioning=class", "conditioned on text"),
                              ("model.tokenizer=/elsewhere/tokenizer.json", "parent's tokenizer")):
        bad = tmp_path / "bad.yaml"
        bad.write_text("config: exp.yaml\nstages:\n  - kind: pretrain\n  - kind: consistency_distill\n"
                       f"    overrides: [{override}]\n")
        with pytest.raises(ConfigError, match=message):
            load_pipeline(bad)


def test_pipeline_eval_of_text_stages_gives_binding_accuracy_against_nfe(world, tmp_path, shapes_recogniser,
                                                                         monkeypatch):
    from dtrain.eval.pipeline import evaluate_pipeline

    monkeypatch.setenv("DTRAIN_CACHE", str(shapes_recogniser.path.parent))  # the session's recogniser
    pre = tmp_path / "runs" / "t-pretrain" / "ckpt"
    write_text_checkpoint(pre, text_config(world))
    student = tmp_path / "runs" / "t-distill" / "ckpt"
    write_text_checkpoint(student, text_config(world, "sample.sampler=consistency", "sample.guidance=1.0"), seed=1,
                          meta={"step": 2, "stage": "consistency_distill", "parent": str(pre), "teacher": str(pre)})
    state = {"name": "t", "stages": {"pretrain": {"kind": "pretrain", "checkpoint": str(pre)},
                                     "distill": {"kind": "consistency_distill", "checkpoint": str(student)}}}
    p = PipelineConfig(name="t", eval=PipelineEvalSpec(steps=[1], samplers=["euler"], audit=False),
                       root=str(tmp_path / "runs"))
    p.eval.n_prompts = 8  # (eval.n_prompts: a few prompts keep this fast)
    lines: list[str] = []
    result = evaluate_pipeline(p, state, log=lines.append)

    assert [(r["stage"], r["sampler"], r["nfe"]) for r in result["rows"]] == [
        ("pretrain", "euler", 2),  # guidance 2: two network calls a step
        ("distill", "euler", 1), ("distill", "consistency", 1)]  # a stage's own sampler joins
    assert set(result["binding_vs_nfe"]) == {"pretrain", "distill euler", "distill consistency"}
    assert set(result["binding_vs_nfe"]["pretrain"]) == {"2"}
    cell = result["binding_vs_nfe"]["distill consistency"]["1"]
    assert set(cell) == {"steps", "sampler", "binding_acc", "heldout_binding_acc", "fd"} and 0 <= cell["binding_acc"] <= 1
    assert result["shapes"]["n_samples"] == 8 and result["shapes"]["n_heldout"] == 2
    assert result["stages"]["distill"]["teacher"] == str(pre) and result["stages"]["distill"]["conditioning"] == "text"
    assert any(line.startswith("binding accuracy against NFE") for line in lines)
    out = tmp_path / "runs" / "t-eval"
    assert json.loads((out / "eval.json").read_text())["binding_vs_nfe"] == result["binding_vs_nfe"]
    assert Image.open(out / "binding_vs_nfe.png").format == "PNG"
    assert not (out / "fd_vs_nfe.png").exists()  # the digits chart: not for the shapes world
    grid = Image.open(out / "distill-euler-1steps.png")  # prompts written beside their rows
    assert grid.width > grid.height and (out / "pretrain-euler-1steps.png").is_file()


def test_the_binding_chart_draws_each_series_in_one_colour_in_all_three_panels(tmp_path):
    from dtrain.eval.pipeline import binding_table, plot_binding_vs_nfe

    rows = [{"series": name, "sampler": "euler", "steps": n, "nfe": n, "binding_acc": acc * n / 4,
             "heldout": {"binding_acc": acc * n / 8}, "fd": 10 / n / acc}
            for name, acc in (("pretrain", 0.3), ("reflow", 0.6), ("distill", 0.9)) for n in (1, 2, 4)]
    result = {"rows": rows, "shapes": {"n_samples": 8, "n_heldout": 2, "recogniser": "r", "noise_floor_fd": 0.5,
                                       "real": {"binding_acc": 0.95}}}
    img = np.asarray(Image.open(plot_binding_vs_nfe(result, tmp_path / "b.png")).convert("RGB"))
    assert img.shape == (760, 640, 3)
    for color in COLORS[:3]:
        ys = np.nonzero((img == color).all(axis=-1).any(axis=1))[0]
        assert ys.min() < img.shape[0] / 3 and ys.max() > 2 * img.shape[0] / 3  # in the top and bottom panels
    assert not (img == COLORS[3]).all(axis=-1).any()  # three series, three colours
    table = binding_table(rows).splitlines()
    assert table[2].split() == ["pretrain", "0.075", "(0.037)", "0.150", "(0.075)", "0.300", "(0.150)"]


@pytest.mark.slow
def test_a_text_pipeline_follows_prompts_and_chains_stages_with_one_tokenizer(ray_cluster, tmp_path, shapes_recogniser,
                                                                             monkeypatch):
    """pretrain -> reflow (on captioned pairs) -> consistency distillation of a small text model on the real stack
    (Ray Train + DeepSpeed): the pretrained model's samples follow their prompts well above chance, every stage
    reads token ids with the first stage's tokenizer, and the evaluation gives binding accuracy against NFE."""
    from dtrain.data.shapes import COLOUR_NAMES
    from dtrain.eval.pipeline import evaluate_pipeline
    from dtrain.train.pipeline import run_pipeline

    write_shapes(tmp_path / "w", ShapesSpec(image_size=32, train_shards=2, per_shard=256, val=64, heldout=32,
                                            max_objects=1), use_ray=False)
    train, val = f"{tmp_path}/w/train-{{000000..000001}}.tar", f"{tmp_path}/w/val-000000.tar"
    overrides = [f"data.train_shards={train}", f"data.val_shards={val}", "model.hidden_size=64", "model.depth=2",
                 "model.num_heads=2", "model.patch_size=8", "model.text_depth=1", "model.max_tokens=8",
                 "data.batch_size=32", "data.shuffle_buffer=64", "train.steps=2", "train.warmup_steps=1",
                 "train.log_every=50", "train.ckpt_every=2", "train.val_every=0", f"train.storage_path={tmp_path}/runs",
                 "tracking.wandb=false", "sample.steps=2"]
    (tmp_path / "exp.yaml").write_text((ROOT / "configs" / "shapes.yaml").read_text())
    (tmp_path / "p.yaml").write_text(
        "name: tx\nconfig: exp.yaml\noverrides: " + json.dumps(overrides) + "\nstages:\n  - kind: pretrain\n"
        "    overrides: [train.steps=300, train.ckpt_every=300, train.warmup_steps=10, train.ema_decay=0.95]\n"
        "  - kind: reflow\n    pairs: {count: 32, per_shard: 16, steps: 1, sampler: euler, guidance: 2.0}\n"
        "    overrides: [sample.guidance=1.0, data.batch_size=8]\n"
        "  - kind: consistency_distill\n    name: distill\n    overrides: [sample.sampler=consistency, sample.guidance=1.0,"
        " stage.teacher_solver=euler, stage.target_decay=0.0, 'stage.intervals=[2,4]']\n"
        "eval: {steps: [8], audit: false, n_prompts: 100}\n")
    p = load_pipeline(tmp_path / "p.yaml")
    state = run_pipeline(p)
    pre, ref, dis = (state["stages"][k]["checkpoint"] for k in ("pretrain", "reflow", "distill"))
    rmeta, dmeta = read_meta(ref), read_meta(dis)
    assert rmeta["parent"] == rmeta["teacher"] == pre and rmeta["reflow_k"] == 2
    assert dmeta["parent"] == dmeta["teacher"] == ref and dmeta["stage"] == "consistency_distill"
    tokenizer = read_tokenizer(pre)  # trained on the captions by the first stage, then inherited by each stage
    assert tokenizer and read_tokenizer(ref) == tokenizer and read_tokenizer(dis) == tokenizer
    pairs = state["stages"]["reflow"]["pairs"]
    assert json.loads(Path(pairs, "pairs.json").read_text())["captions"] == train  # the teacher's training shards
    corpus = set(caption_corpus(train))
    assert {v["txt"].decode() for v in _samples(f"{pairs}/pairs-{{000000..000001}}.tar").values()} <= corpus

    monkeypatch.setenv("DTRAIN_CACHE", str(shapes_recogniser.path.parent))  # the session's recogniser
    result = evaluate_pipeline(p, state, log=lambda s: None)
    assert set(result["binding_vs_nfe"]) == {"pretrain", "reflow", "distill euler", "distill consistency"}
    shapes = result["shapes"]
    assert shapes["conditioning"] == "text" and (shapes["n_samples"], shapes["n_heldout"]) == (100, 25)
    assert shapes["real"]["binding_acc"] >= 0.99  # the recogniser reads the world's own renders
    (row,) = [r for r in result["rows"] if r["stage"] == "pretrain"]
    assert row["steps"] == 8 and set(row["by_objects"]) == {"1"}
    assert row["colour_acc"] > 1.6 / len(COLOUR_NAMES), row  # the colour asked for, above chance (1/8)
    assert row["fd"] > row["noise_floor_fd"] > 0 and row["fd_ci"][0] <= row["fd"] <= row["fd_ci"][1]
    assert (tmp_path / "runs" / "tx-eval" / "binding_vs_nfe.png").is_file()

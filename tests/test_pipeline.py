"""`dtrain pipeline` on the real stack: pretrain -> pairs -> reflow -> distill as Ray Train runs on the session's
cluster, lineage in every checkpoint, a rerun that resumes at the first unfinished stage, evaluation
of every stage."""
import json

import pytest

from dtrain.checkpoint import read_meta
from dtrain.eval.pipeline import evaluate_pipeline
from dtrain.train.pipeline import load_pipeline, run_pipeline
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow

# long enough to learn the classes (class accuracy 1.0 at 400 steps, 0.5 at 200, where chance is 0.1)
PRETRAIN = ("  - kind: pretrain\n    overrides: [train.steps=300, train.ckpt_every=300, data.batch_size=64, train.lr=3.0e-3,"
            " train.warmup_steps=20]\n")
REFLOW = ("  - kind: reflow\n    pairs: {count: 32, per_shard: 16, steps: 2, sampler: euler}\n"
          "    overrides: [train.steps=2, sample.guidance=1.0]\n")
# consistency distillation of the reflow stage under ZeRO-3 with activation checkpointing: the teacher and the
# EMA target are partitioned engines beside the student (DeepSpeed 0.19 once failed on frozen parameters there)
DISTILL = ("  - kind: consistency_distill\n    name: distill\n    overrides: [train.steps=2, train.zero_stage=3,"
           " train.activation_checkpointing=true, stage.target_decay=0.9, 'stage.intervals=[2,4]', sample.sampler=consistency]\n")
# a one-step flow map distilled from the pretrained stage (not the stage before it), as configs/pipeline-large.yaml does;
# its kind by the name pipeline files used before the split (distill + objective mean_flow = flow_map_distill)
FLOW_MAP = ("  - kind: distill\n    name: flowmap\n    parent: pretrain\n    overrides: [train.steps=2, model.flow_map=true,"
            " objective.name=mean_flow, sample.sampler=flow_map, sample.steps=1]\n")


@pytest.fixture
def pipeline_file(tmp_path, digits_dir):
    def write(distill: bool):  # pretrain -> reflow (-> distill)
        overrides = tiny_overrides(digits_dir, tmp_path) + ["train.steps=4", "train.ckpt_every=4", "model.hidden_size=64",
                                                            "model.depth=2", "model.patch_size=4"]
        path = tmp_path / f"p{int(distill)}.yaml"
        path.write_text("name: tiny\nconfig: exp.yaml\noverrides: " + json.dumps(overrides) + "\nstages:\n"
                        + PRETRAIN + REFLOW + (DISTILL + FLOW_MAP if distill else "")
                        + "eval: {steps: [4], samples_per_class: 5}\n")
        return path

    (tmp_path / "exp.yaml").write_text(open("configs/quickstart.yaml").read())
    return write


def test_pipeline_chains_stages_with_lineage_resumes_and_evaluates_every_stage(ray_cluster, pipeline_file, tmp_path,
                                                                               capsys):
    state = run_pipeline(load_pipeline(pipeline_file(False)))
    pre, ref = state["stages"]["pretrain"], state["stages"]["reflow"]
    assert read_meta(pre["checkpoint"])["stage"] == "pretrain" and read_meta(pre["checkpoint"])["parent"] is None
    meta = read_meta(ref["checkpoint"])
    assert meta["stage"] == "reflow" and meta["parent"] == pre["checkpoint"] and meta["teacher"] == pre["checkpoint"]
    assert meta["reflow_k"] == 2 and meta["step"] == 2 and read_meta(pre["checkpoint"])["step"] == 300
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny-reflow-pairs").glob("*.tar")) == \
        ["pairs-000000.tar", "pairs-000001.tar"]

    # the same pipeline with one more stage: the finished stages are skipped, training resumes at the first
    # unfinished one, the consistency distillation of the reflow model; then a flow map of the pretrained model
    capsys.readouterr()
    p = load_pipeline(pipeline_file(True))
    again = run_pipeline(p)
    out = capsys.readouterr().out
    assert "stage pretrain done" in out and "stage reflow done" in out and "stage 3/4 distill" in out
    assert again["stages"]["reflow"] == ref
    dmeta = read_meta(again["stages"]["distill"]["checkpoint"])
    assert dmeta["stage"] == "consistency_distill" and dmeta["teacher"] == ref["checkpoint"] and dmeta["zero_stage"] == 3
    assert dmeta["parent"] == ref["checkpoint"] and dmeta["target_decay"] == 0.9 and dmeta["step"] == 2
    fmeta = read_meta(again["stages"]["flowmap"]["checkpoint"])
    assert fmeta["parent"] == fmeta["teacher"] == pre["checkpoint"] and fmeta["objective"] == "mean_flow"
    assert fmeta["stage"] == again["stages"]["flowmap"]["kind"] == "flow_map_distill"

    result = evaluate_pipeline(p, again, log=lambda s: None)
    assert [(r["stage"], r["sampler"]) for r in result["rows"]] == [
        ("pretrain", "euler"), ("reflow", "euler"), ("distill", "euler"), ("distill", "consistency"),
        ("flowmap", "euler"), ("flowmap", "flow_map")]
    out = tmp_path / "runs" / "tiny-eval"
    assert (out / "fd_vs_nfe.png").is_file() and json.loads((out / "eval.json").read_text())["stages"]["reflow"]["teacher"]
    assert (out / "reflow-euler-4steps.png").is_file()
    assert result["stages"]["reflow"]["audit"]["n"] == 1000  # the bias audit, per stage
    # training learns: the pretrained stage's samples are of the class asked for far above chance (0.1)
    assert result["rows"][0]["class_acc"] >= 0.5, result["rows"][0]

"""dtrain.plan: a dry run of every shipped config, the ZeRO formulas, the activation estimate against what
autograd keeps on CPU, the refusal, the CLI. Its model-state figures against `dtrain bench zero`: tests/test_bench.py."""
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from dtrain.cli import main
from dtrain.config import load_config
from dtrain.models import build_model
from dtrain.plan import activation_bytes, is_pipeline_file, model_facts, model_state_bytes, plan

CONFIGS = sorted(Path(__file__).parent.parent.glob("configs/*.yaml"))
XL = Path(__file__).parent.parent / "configs/dit-xl2-latent.yaml"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_plan_works_for_every_config(path):
    report = plan(path)
    stages = report.get("stages", [report])
    assert ("stages" in report) == is_pipeline_file(path)
    for i, st in enumerate(stages):
        assert st["model"]["params"] > 0 and st["memory_bytes"]["total"] > st["memory_bytes"]["workspace"]
        b = st["batch"]
        assert b["global"] == b["micro_batch_per_rank"] * b["grad_accum_steps"] * b["workers"]
        assert st["deepspeed_config"]["train_batch_size"] == b["global"]
        if "stages" in report:  # each stage's parent is an earlier stage (the one before, unless it names another)
            assert (st["parent"] is None) == (i == 0)
            assert i == 0 or st["parent"] in [s["name"] for s in stages[:i]]


def test_both_kinds_of_file_are_told_apart():
    assert is_pipeline_file("configs/pipeline.yaml") and not is_pipeline_file("configs/quickstart.yaml")
    assert not is_pipeline_file("configs/no-such-file.yaml")  # load_config then names the missing file


@pytest.mark.parametrize("workers", [8, 64])
def test_dit_xl2_latent_at_8_and_64_workers(workers):
    r = plan(XL, workers=workers, device=80.0)
    m, mem = r["model"], r["memory_bytes"]
    assert m["params"] == pytest.approx(675e6, rel=0.01)  # DiT paper, Table 4: 675M
    assert r["flops"]["forward_per_image"] / 2 == pytest.approx(118.6e9, rel=0.01)  # 118.6 "Gflops" (MACs)
    assert m["tokens_per_image"] == 256 and r["batch"]["global"] == 32 * workers
    n = m["params"]
    assert mem["model_states"] == int(2 * n + 18 * n / workers)  # DeepSpeed's ZeRO-2 estimator, bf16
    assert mem["model_states_zero_paper"] == pytest.approx(n * (2 + 14 / workers), rel=1e-6)
    assert r["deepspeed_config"]["bf16"]["enabled"] and r["deepspeed_config"]["zero_optimization"]["stage"] == 2
    assert r["fit"]["fits"]


def test_model_states_fall_with_the_zero_stage_and_the_workers_as_the_formulas_say():
    n, largest = 10**9, 10**7
    paper = {(s, w): model_state_bytes(n, largest, s, w, "bf16")["paper"] for s in range(4) for w in (2, 8, 64)}
    for w in (2, 8, 64):  # the ZeRO paper: 2 + 2 + 12 bytes, partitioned stage by stage
        assert [paper[s, w] / n for s in range(4)] == pytest.approx([16, 4 + 12 / w, 2 + 14 / w, 16 / w])
        assert paper[0, w] > paper[1, w] > paper[2, w] > paper[3, w]
    for s in (1, 2, 3):
        assert paper[s, 2] > paper[s, 8] > paper[s, 64]
    assert paper[0, 2] == paper[0, 64]  # ZeRO-0 replicates everything
    ds2, ds3 = (model_state_bytes(n, largest, s, 8, "bf16")["deepspeed"] for s in (2, 3))
    assert ds2 == 2 * n + 18 * n // 8 and ds3 == 4 * largest + 18 * n // 8  # DeepSpeed's own arithmetic
    assert model_state_bytes(n, largest, 1, 8, "bf16")["bytes"] == paper[1, 8]  # no estimator for ZeRO-1
    fp32 = model_state_bytes(n, largest, 2, 8, "fp32")
    assert fp32["deepspeed"] is None and fp32["paper"] == 4 * n + 12 * n // 8  # DeepSpeed's assume 16-bit
    off = model_state_bytes(n, largest, 2, 8, "bf16", offload_optimizer=True)
    assert off["paper"] == 2 * n + 2 * n // 8 and off["deepspeed"] == 2 * n  # optimizer state on the host


def _saved_bytes(overrides, batch, checkpointing=False):
    """What autograd keeps for backward in one bf16 forward on CPU: distinct storages, parameters excluded."""
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    net = build_model(cfg.model).to(torch.bfloat16).train()
    net.grad_checkpointing = checkpointing
    m = cfg.model
    x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, dtype=torch.bfloat16)
    t, y = torch.rand(batch, dtype=torch.bfloat16), torch.randint(0, m.num_classes, (batch,))
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen = {}

    def pack(tensor):
        s = tensor.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(x, t, y)
    return sum(v for k, v in seen.items() if k not in params), cfg


@pytest.mark.parametrize("overrides,rel", [
    (["model.size=S", "model.depth=4", "model.image_size=16"], 0.05),  # DiT-S/2's blocks, 64 tokens
    (["model.size=mini", "model.image_size=32", "model.patch_size=4"], 0.05),  # attention, 64 tokens
    (["model.arch=ssm", "model.size=S", "model.image_size=32", "model.depth=2", "model.attn_every=2"],
     0.10),  # an SSM block and an attention block, 256 tokens (4 scan chunks)
], ids=["dit-S", "dit-mini", "ssm-S"])
def test_activation_estimate_against_what_autograd_keeps_on_cpu(overrides, rel):
    batch = 2
    measured, cfg = _saved_bytes(overrides, batch)
    facts = model_facts(cfg.model)
    full, ckpt = activation_bytes(facts, batch, "bf16")
    assert full == pytest.approx(measured, rel=rel)
    if cfg.model.arch == "dit":  # checkpointed: the blocks' inputs are kept; one block is recomputed at a time
        stored, _ = _saved_bytes(overrides, batch, checkpointing=True)
        one_block = 40 * facts.tokens * facts.hidden * batch  # a DiT block in bf16: 40 sbh bytes
        assert ckpt - one_block == pytest.approx(stored, rel=0.1)


def _cli(*args):
    return CliRunner().invoke(main, ["plan", *map(str, args)])


def test_a_config_too_large_for_the_device_is_refused_saying_by_how_much():
    r = _cli(XL, "--device", "a100-40gb", "data.batch_size=256")
    assert r.exit_code == 2
    assert "GiB over the device's 40 GiB" in r.stderr and "train.activation_checkpointing=true" in r.stderr
    assert "DOES NOT FIT" in r.stdout  # the report still printed, for the rest of the picture
    over = float(r.stderr.split("GiB per rank, ")[1].split(" GiB over")[0])
    need = float(r.stderr.split("needs ")[1].split(" GiB")[0])
    assert over == pytest.approx(need - 40, abs=0.11)
    assert _cli(XL, "--device", "h100-80gb").exit_code == 0  # 32 a rank fits an H100
    assert _cli(XL, "--device", "tpu-v9").exit_code == 2 and "unknown device" in _cli(XL, "--device", "tpu-v9").stderr


def test_cli_prints_the_report_and_json():
    r = _cli(XL, "--workers", "64")
    assert r.exit_code == 0, r.output
    assert "674.8M parameters" in r.stdout and "= 2048 per step" in r.stdout and '"stage": 2' in r.stdout
    r = _cli("configs/pipeline.yaml", "--json", "train.steps=10")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert [s["name"] for s in report["stages"]] == ["pretrain", "reflow", "distill"]
    assert report["stages"][2]["memory_bytes"]["frozen_net_count"] == 1  # its teacher (target_decay 0: no target)

"""dtrain.bench.zero and dtrain.bench.train: the pure helpers fast, the real stack marked slow."""
import json

import pytest
import torch

from dtrain.bench.train import DEFAULTS, steady_samples_per_s, torch_samples_per_s
from dtrain.bench.zero import model_state_bytes, paper_bytes_per_param
from dtrain.config import load_config


def test_paper_ratios_match_the_zero_paper_at_two_ranks():
    ratios = [paper_bytes_per_param(s, 2) / paper_bytes_per_param(0, 2) for s in range(4)]
    assert ratios == pytest.approx([1, 0.625, 0.5625, 0.5])
    assert paper_bytes_per_param(0, 2) == 16 and paper_bytes_per_param(3, 64) == pytest.approx(0.25)
    assert paper_bytes_per_param(0, 2, "fp32") == 16 and paper_bytes_per_param(2, 2, "fp32") == 10


def test_byte_accounting_of_a_plain_adamw():
    net = torch.nn.Linear(10, 20)  # 220 fp32 parameters: 880 bytes
    opt = torch.optim.AdamW(net.parameters())
    net(torch.randn(3, 10)).sum().backward()
    opt.step()
    got = model_state_bytes(net, opt)
    # Adam: exp_avg + exp_avg_sq (880 each) and a 0-dim fp32 step counter per parameter tensor
    assert got == {"params": 880, "grads": 880, "optimizer": 2 * 880 + 2 * 4, "buffers": 0}


def test_byte_accounting_counts_a_shared_storage_once_and_sets_reduce_buckets_apart():
    flat = torch.zeros(100)
    net = torch.nn.Module()
    net.a, net.b = torch.nn.Parameter(flat[:60]), torch.nn.Parameter(flat[60:])  # views of one buffer
    state = {"averaged_gradients": [torch.zeros(50)], "ipg_buckets": {"bf16": [torch.zeros(10)]},
             "master": [torch.zeros(100), flat[:10]], "moments": {"m": torch.zeros(25, dtype=torch.float64)}}
    assert model_state_bytes(net, state) == {"params": 400, "grads": 200, "optimizer": 400 + 200, "buffers": 40}


def test_steady_throughput_skips_the_warmup_windows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    windows = [(10, 1.0), (20, 0.1), (30, 0.1), (35, 0.2)]  # (step, step_time_s); batch 8 x 2 workers
    path.write_text("".join(json.dumps({"step": s, "step_time_s": dt, "samples_per_s": 16 / dt}) + "\n"
                            for s, dt in windows))
    assert steady_samples_per_s(path, warmup=10) == pytest.approx(25 * 16 / (10 * 0.1 + 10 * 0.1 + 5 * 0.2))
    assert steady_samples_per_s(path, warmup=0) == pytest.approx(35 * 16 / (10 * 1.0 + 10 * 0.1 + 10 * 0.1 + 5 * 0.2))


@pytest.mark.slow
def test_torch_ddp_baseline_runs_on_digits_shards(digits_dir):
    cfg = load_config(None, DEFAULTS + [
        "model.size=tiny", "model.hidden_size=0", "model.depth=0", "model.image_size=8", "data.batch_size=8",
        f"data.train_shards={digits_dir}/train-{{000000..000003}}.tar", "train.steps=6", "train.log_every=2"])
    assert torch_samples_per_s(cfg, 2, warmup=2) > 0


@pytest.mark.slow
def test_zero3_holds_half_the_parameter_bytes_of_zero0_and_plan_predicts_each_stage(ray_cluster):
    """One run of `dtrain bench zero` (CPU, 2 ranks, bf16, mid-accumulation) checks the ZeRO partitioning
    and `dtrain plan`'s model-state figures. The ZeRO paper's figure is what the bench should find, within
    5% (a tiny model's flat buffers are padded to alignment). DeepSpeed's estimator, the figure plan checks
    a device with, must not be below it: it adds the fp32 gradient partition DeepSpeed fills at the step
    boundary (4/N bytes a parameter) and under ZeRO-3 the largest layer gathered (4 bytes a parameter of it)."""
    from dtrain.bench.zero import DEFAULTS, run
    from dtrain.config import load_config
    from dtrain.plan import model_facts, model_state_bytes

    tiny = ["model.size=tiny", "model.image_size=8", "data.batch_size=4"]
    rows, summary = run(stages=(0, 2, 3), num_workers=2, overrides=tiny)
    zero0, _, zero3 = rows
    assert (zero0["stage"], zero3["stage"]) == (0, 3)
    assert zero0["params_B"] == pytest.approx(2.0, rel=0.01)  # bf16 weights, all of them on every rank
    assert zero3["params_B"] / zero0["params_B"] == pytest.approx(0.5, rel=0.05)
    assert zero0["optimizer_B"] == pytest.approx(12.0, rel=0.01)  # fp32 master + two Adam moments
    assert zero3["optimizer_B"] == pytest.approx(6.0, rel=0.05)
    assert zero3["buffers_B"] > 0  # the reduce bucket, found and kept out of the model-state total
    assert summary["params"] > 0 and zero3["peak_rss_mb"] > 0
    for row in rows[1:]:
        cfg = load_config(None, [*DEFAULTS, "train.precision=bf16", *tiny, f"train.zero_stage={row['stage']}"])
        facts = model_facts(cfg.model)
        assert facts.params == summary["params"]
        states = model_state_bytes(facts.params, facts.largest_layer, row["stage"], 2, "bf16")
        assert states["paper"] / facts.params == pytest.approx(row["total_B"], rel=0.05)
        assert row["total_B"] <= states["deepspeed"] / facts.params <= row["total_B"] * 1.25


def test_serve_bench_summaries():
    from dtrain.bench.serve import Shot, summarize, time_to_max

    shots = [Shot(sent=0.1 * i, latency=0.1 + 0.01 * i, status=200, phase="a") for i in range(10)]
    shots += [Shot(sent=0.5, latency=0.01, status=503, phase="a"), Shot(sent=0.6, latency=5.0, status=0, phase="a")]
    s = summarize(shots)
    assert s["requests"] == 12 and s["codes"] == {"200": 10, "503": 1, "0": 1}
    assert s["p50_ms"] == pytest.approx(145, abs=1) and s["p99_ms"] <= 190  # 200s only
    assert s["images_per_s"] == pytest.approx(10 / 5.6)  # answered images over the span from first sent to last done
    watch = [(0.0, 1), (1.0, 1), (2.0, 2), (3.5, 4), (4.0, 4)]
    assert time_to_max(watch, spike_at=1.0, most=4) == pytest.approx(2.5)
    assert time_to_max(watch, spike_at=1.0, most=5) is None


def test_bench_objectives_times_each_objective_on_one_model():
    from dtrain.bench.objectives import run

    rows, summary = run(overrides=("model.size=tiny", "data.batch_size=4"), steps=1, warmup=0)
    assert [(r["objective"], r["how"]) for r in rows] == [
        ("flow matching", ""), ("mean flow", "forward"), ("mean flow", "double_backward"),
        ("mean flow", "finite_difference"), ("consistency distillation", "heun teacher")]
    assert all(r["ms_per_step"] > 0 for r in rows) and rows[0]["vs_flow_matching"] == 1.0
    assert summary["model"] == "dit/tiny"


@pytest.mark.slow
def test_the_serve_benchs_peer_answers_what_dtrain_answers(serve_url, tiny_checkpoint):
    """The peer of `dtrain bench serve` (a minimal Serve app) samples the same checkpoint the same way as
    dtrain with its optional features off: the same pixels for the same class, seed and steps, so the
    bench compares request paths, not work. Concurrent requests share its @serve.batch call."""
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    import numpy as np
    from PIL import Image
    from ray import serve

    from dtrain.bench.peer import peer_app
    from dtrain.serving.app import deploy
    from dtrain.serving.config import ServeArgs

    def pixels(r) -> list:
        assert r.status_code == 200, r.text
        return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b)))) for b in r.json()["images"]]

    body = {"class_label": 3, "seed": 5, "steps": 3, "num_images": 2}
    deploy(ServeArgs(checkpoint=str(tiny_checkpoint), num_replicas=1, replica_cpus=0.5, watermark=False,
                     provenance=False, precision="fp32"), "bench_dtrain")
    serve.run(peer_app(str(tiny_checkpoint), 0.5, 8), name="bench_peer", route_prefix="/bench_peer")
    try:
        ours = pixels(httpx.post(f"{serve_url}/bench_dtrain/v1/generate", json=body, timeout=60))
        with ThreadPoolExecutor(6) as pool:  # batched with others: each answer unchanged
            answers = list(pool.map(lambda s: httpx.post(f"{serve_url}/bench_peer/v1/generate", timeout=60,
                                                         json={**body, "seed": s}), [5, 6, 7, 8, 9, 10]))
        peer = pixels(answers[0])

        def same(a, b) -> bool:  # within one level: a batch's other rows may round a last bit otherwise
            return np.abs(a.astype(int) - b).max() <= 1

        assert len(peer) == 2 and all(same(a, b) for a, b in zip(ours, peer))
        assert not same(pixels(answers[1])[0], peer[0])  # another seed, another image
        assert same(pixels(answers[1])[0], peer[1])  # seed 6 is the second image of seed 5
    finally:
        serve.delete("bench_dtrain", _blocking=False)
        serve.delete("bench_peer", _blocking=False)

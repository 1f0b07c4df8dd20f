"""`dtrain bench gpu` on a CPU: tiny models, the report's shape, and what it says it skipped. The CUDA
paths (MFU, flash/efficient SDPA, FusedAdam, NCCL, a replica on a GPU) run only on a lent GPU machine."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from dtrain.bench.gpu import CHECKS, NO_CUDA, NoCudaError, peak_bf16, render, run
from dtrain.cli import main

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU report; a GPU runs the real thing")


@pytest.fixture(scope="module")
def report():
    return run(budget_s=60, tiny=True, checks=tuple(c for c in CHECKS if c != "compile"))


def _shape(r: dict) -> None:
    assert r["device"]["kind"] == "cpu" and r["device"]["name"]
    assert r["versions"]["torch"] == torch.__version__ and r["versions"]["deepspeed"]
    assert "cuda" in r["versions"]  # None on a CPU build, named all the same
    assert set(r["checks"]) == set(CHECKS)
    for name, c in r["checks"].items():
        assert c.get("skipped") or c.get("error") or "wall_s" in c, name


def test_cpu_report_measures_what_a_cpu_can_and_skips_the_cuda_parts(report):
    _shape(report)
    checks = report["checks"]
    assert not [n for n, c in checks.items() if "error" in c], {n: c["error"] for n, c in checks.items() if "error" in c}
    assert NO_CUDA in report["device"]["peak"]["skipped"]
    for arch in ("train_dit", "train_ssm"):
        c = checks[arch]
        assert c["step_ms"] > 0 and c["images_per_s"] > 0 and c["forward_gflops_per_image"] > 0, c
        assert NO_CUDA in c["mfu"]["skipped"]
    assert NO_CUDA in checks["sdpa"]["backends"]["skipped"]
    assert checks["sdpa"]["model_ran"] in ("flash (CPU kernel)", "math"), checks["sdpa"]  # what ran, honestly
    assert NO_CUDA in checks["optimizers"]["deepspeed_fused_adam"]["skipped"]
    assert checks["optimizers"]["torch_adamw"]["step_ms"] > 0
    assert checks["zero"]["zero2"]["step_ms"] > 0 and checks["zero"]["zero3"]["step_ms"] > 0
    assert checks["zero"]["backend"] == "gloo"
    assert checks["sampler"]["batch1"]["ms_per_nfe"] > 0 and checks["sampler"]["batch64"]["ms_per_nfe"] > 0
    assert NO_CUDA in checks["serve"]["skipped"] and "--with-serve" in checks["serve"]["skipped"]
    assert checks["compile"]["skipped"] == "not asked for"
    text = render(report)
    assert report["device"]["name"] in text and "SKIPPED" in text


def test_cli_json_skips_what_exceeds_the_budget():
    r = CliRunner().invoke(main, ["bench", "gpu", "--json", "--tiny", "--budget-s", "1"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    _shape(out)
    assert "over the time budget" in out["checks"]["zero"]["skipped"]
    assert "torch.compile on a CPU" in out["checks"]["compile"]["skipped"]


def test_require_gpu_on_a_cpu_fails_clearly():
    with pytest.raises(NoCudaError, match="no CUDA device"):
        run(require_gpu=True)
    r = CliRunner().invoke(main, ["bench", "gpu", "--require-gpu"])
    assert r.exit_code == 2 and "no CUDA device" in r.output and "Traceback" not in r.output


def test_peak_is_computed_from_the_device_figures():
    a100 = peak_bf16(108, 1410, (8, 0))
    assert a100["peak_tflops"] == pytest.approx(312, rel=0.01)
    h100 = peak_bf16(132, 1830, (9, 0))
    assert h100["peak_tflops"] == pytest.approx(989, rel=0.01) and h100["bf16_flops_per_sm_per_clock"] == 4096
    assert "no dense bf16 rate" in peak_bf16(80, 1530, (7, 0))["skipped"]
    assert "clock" in peak_bf16(132, None, (9, 0))["skipped"]


def test_the_zero_check_leaves_torch_as_it_found_it(report):
    """ZeRO-3 patches torch.nn.functional.linear process-wide; a bench run inside a test session (or any
    caller) must not leave it patched: forward-mode AD (MeanFlow's JVP) and bitwise comparisons depend on it."""
    import torch.nn.functional as F

    assert "zero" in report["checks"] and F.linear is torch._C._nn.linear

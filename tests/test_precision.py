import pytest
import torch

from dtrain import precision as P
from dtrain.precision import Choice, cpu_choice, probe_decision


def _never_probe():
    raise AssertionError("the flags decide; the probe must not run")


@pytest.mark.parametrize("flags, capability, want", [
    ({"avx2", "fma", "amx_bf16", "amx_tile", "avx512f"}, "AVX512", "bf16"),  # Sapphire Rapids
    ({"avx2", "avx512f", "avx512_bf16"}, "AVX512", "bf16"),  # Cooper Lake, Zen 4
    ({"avx2", "fma"}, "AVX2", "fp32"),  # the AMD EPYC of the issue: bf16 20x slower
    ({"avx2", "avx512f", "avx512bw"}, "AVX512", "fp32"),  # Skylake-X: AVX-512 without bf16 instructions
])
def test_cpu_flags_decide_without_a_probe(flags, capability, want):
    assert cpu_choice(flags, capability, _never_probe).precision == want


def test_unknown_cpu_falls_back_to_the_probe():
    sentinel = Choice("bf16", "probe")
    assert cpu_choice(None, "DEFAULT", lambda: sentinel) is sentinel  # no /proc/cpuinfo (macOS, ...)


@pytest.mark.parametrize("fp32_s, bf16_s, want", [
    (1.0, 0.55, "bf16"),  # AMX-like: bf16 1.8x faster
    (1.0, 20.0, "fp32"),  # AVX2-like: 20x slower
    (1.0, 0.95, "fp32"),  # a tie is not worth the rounding
])
def test_probe_decision_from_injected_timings(fp32_s, bf16_s, want):
    choice = probe_decision(fp32_s, bf16_s)
    assert choice.precision == want and "probe" in choice.reason


def test_explicit_bf16_on_a_cpu_without_it_runs_but_warns(monkeypatch):
    monkeypatch.setattr(P, "cpu_flags", lambda: {"avx2", "fma"})
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    c = P.choose("bf16", "cpu")
    assert c.precision == "bf16" and c.reason.startswith("WARNING") and "20x slower" in c.reason
    assert P.choose("auto", "cpu").precision == "fp32"
    assert P.choose("fp32", "cpu") == Choice("fp32", "set explicitly")


def test_explicit_bf16_on_a_native_cpu_has_no_warning(monkeypatch):
    monkeypatch.setattr(P, "cpu_flags", lambda: {"amx_bf16", "avx512f"})
    assert P.choose("bf16", "cpu") == Choice("bf16", "set explicitly")
    assert P.choose("auto", "cpu").precision == "bf16"


def test_bad_precision_is_named():
    with pytest.raises(ValueError, match="fp8"):
        P.choose("fp8")


def test_the_real_probe_and_machine_report_run_here():
    assert P.time_matmul(torch.float32, n=64, repeats=1) > 0
    m = P.machine()
    assert m["cpu"] and m["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert m["torch_threads"] >= 1 and isinstance(m["native_bf16_cpu"], bool)

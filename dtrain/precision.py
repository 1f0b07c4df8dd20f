"""Which precision is fast here: `auto` picks bf16 only where the hardware runs it natively.

bf16 matmuls are fast on CUDA devices that support them and on CPUs with AMX or AVX512-BF16; on an
AVX2-only CPU one-thread bf16 matmuls were measured 20x slower than fp32 (1.4 against 29 GFLOP/s).
The decision reads the CPU's feature flags; where they say nothing (no /proc/cpuinfo, a CPU family
we do not know) a tiny timed probe decides. Training, sampling and serving all ask here.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

PRECISIONS = ("auto", "bf16", "fp32", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # Linux /proc/cpuinfo names
PROBE_MIN_SPEEDUP = 1.2  # bf16 must beat fp32 by this much in the probe to be chosen


@dataclass(frozen=True)
class Choice:
    precision: str  # bf16 | fp32 | fp16
    reason: str  # one line a user can act on

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.precision]


def _cpuinfo(*keys: str) -> str | None:
    """The value of the first /proc/cpuinfo line starting with one of `keys`; None off Linux."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(keys)), None)


def cpu_flags() -> set[str] | None:
    """The CPU's feature flags, or None where the OS does not list them (not Linux)."""
    flags = _cpuinfo("flags", "Features")  # x86 | ARM
    return None if flags is None else set(flags.split())


def cpu_name() -> str:
    import platform

    return _cpuinfo("model name") or platform.processor() or platform.machine()


def time_matmul(dtype: torch.dtype, n: int = 256, repeats: int = 3) -> float:
    """Best-of-`repeats` seconds for one n x n matmul in `dtype` on the CPU (a few ms in fp32)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b  # warm up the kernel
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return best


def probe_decision(fp32_s: float, bf16_s: float) -> Choice:
    """The probe's verdict from its two timings (separate, so tests can inject timings)."""
    speedup = fp32_s / bf16_s
    if speedup >= PROBE_MIN_SPEEDUP:
        return Choice("bf16", f"a timed probe ran bf16 matmuls {speedup:.1f}x faster than fp32 on this CPU")
    return Choice("fp32", f"a timed probe ran bf16 matmuls at {speedup:.2f}x the speed of fp32 on this CPU")


def cpu_choice(flags: set[str] | None, capability: str, probe: Callable[[], Choice]) -> Choice:
    """bf16 where the flags show native bf16, fp32 where they show none (bf16 is then emulated, and on
    AVX2 far slower); the probe only where the OS lists no flags (macOS, Windows)."""
    if flags is None:
        return probe()
    native = sorted(f for f in NATIVE_BF16_FLAGS if f in flags)
    if native:
        return Choice("bf16", f"the CPU runs bf16 natively ({', '.join(native)})")
    return Choice("fp32", f"the CPU has no native bf16 (torch CPU capability {capability}, "
                          "no AMX or AVX512-BF16): bf16 would run far slower than fp32")


@functools.lru_cache(maxsize=None)
def _probe() -> Choice:
    return probe_decision(time_matmul(torch.float32), time_matmul(torch.bfloat16))


def _this_cpu() -> Choice:
    return cpu_choice(cpu_flags(), torch.backends.cpu.get_cpu_capability(), _probe)


def choose(requested: str = "auto", device: str = "cpu") -> Choice:
    """Resolve a configured precision for `device` ('cpu' or 'cuda'). An explicit choice is kept;
    bf16 on a CPU without native bf16 runs, but its reason says how much slower to expect."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision '{requested}' is not one of {PRECISIONS}")
    on_gpu = device.startswith("cuda")
    if requested == "auto":
        if on_gpu:
            if torch.cuda.is_bf16_supported():
                return Choice("bf16", f"{torch.cuda.get_device_name()} supports bf16")
            return Choice("fp16", f"{torch.cuda.get_device_name()} lacks bf16: fp16 with dynamic loss scaling")
        return _this_cpu()
    if requested == "bf16" and not on_gpu:
        native = _this_cpu()
        if native.precision != "bf16":
            return Choice("bf16", f"WARNING: bf16 was asked for, but {native.reason}; expect it to run up to "
                                  "20x slower than train.precision=fp32 (or auto)")
    return Choice(requested, "set explicitly")


def machine() -> dict:
    """What a benchmark figure depends on: the CPU, torch's CPU capability, threads, GPU."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16_cpu": choose("auto", "cpu").precision == "bf16", "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "gpu": gpu, "torch": torch.__version__}


def in_precision(net: Callable, dtype: torch.dtype) -> Callable:
    """net(x, t, cond[, s]) run on x cast to `dtype`, its output back in float32: what every objective, solver
    and detector sees, whatever the net's precision (t stays float32: the time embedding casts itself)."""
    def fn(x: torch.Tensor, t: torch.Tensor, cond, s: torch.Tensor | None = None) -> torch.Tensor:
        return (net(x.to(dtype), t, cond) if s is None else net(x.to(dtype), t, cond, s)).float()
    return fn

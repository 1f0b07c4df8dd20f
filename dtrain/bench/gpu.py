"""`dtrain bench gpu`: the GPU checks of one lent machine in one command (at most ~8 minutes on one GPU).

Checks, each timed on its own and each in its own try/except (an exception becomes {"error": ...} and the
others go on); one that would not fit the time left in the budget is skipped, saying so:

1. train_dit, train_ssm: plain-torch training steps (forward + backward + AdamW, no Ray, no DeepSpeed) of a
   DiT-XL/2 on 32x32x4 latents in bf16 autocast (configs/dit-xl2-latent.yaml) and of the SSM-hybrid of
   the same width; step time, images/s and MFU = 3 x forward FLOPs per image x images/s / the device's
   peak. The peak is computed from the device (SMs x max SM clock x dense bf16 FLOPs per SM per clock of
   its compute capability) and its inputs are reported beside it.
2. sdpa: which scaled_dot_product_attention kernels run for the model's head dim and dtype, and which
   one the model's own attention ran (the profiler's aten op names).
3. compile: step time under torch.compile (default mode) against eager, compile time apart.
4. optimizers: DeepSpeed's FusedAdam against torch AdamW (fused and the default) on the model's parameters.
5. zero: ZeRO-2 and ZeRO-3 step time of a real DeepSpeed engine at world size 1.
6. sampler: dtrain.generation.solve latency per network evaluation at batch 1 and 64 (Euler, 8 steps).
7. serve: a Ray Serve replica answering one POST /v1/generate over HTTP.

On a CPU every model is tiny, the CUDA-only parts say they were skipped because no CUDA device is
present, and what runs on a CPU is measured.
"""
from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from dtrain.config import Config, load_config
from dtrain.errors import DtrainError

NO_CUDA = "no CUDA device is present (torch.cuda.is_available() is False)"
FULL_CONFIG = "configs/dit-xl2-latent.yaml"
TINY_OVERRIDES = ["model.size=tiny", "model.image_size=8", "model.patch_size=2", "model.in_channels=4",
                  "model.num_classes=10"]
# Dense (no sparsity) bf16 tensor-core FLOPs per SM per clock, by compute capability: an FMA is 2 FLOPs.
# A100 (8.0): 108 SMs x 1.41 GHz x 2048 = 312 TFLOP/s; A10/A40 (8.6): 84 x 1.74 GHz x 1024 = 150 (GeForce
# parts of 8.6/8.9 run half that with fp32 accumulation); L40S (8.9): 142 x 2.52 GHz x 1024 = 366;
# H100/H200 SXM (9.0): 132 x 1.83 GHz x 4096 = 989 (x 1.98 GHz, the max SM clock, 1070);
# B200 (10.0): 148 x 1.86 GHz x 8192 = 2250.
BF16_FLOPS_PER_SM_CLOCK = {(8, 0): 2048, (8, 6): 1024, (8, 7): 1024, (8, 9): 1024, (9, 0): 4096, (10, 0): 8192}
# Seconds a check is expected to take (GPU full size, CPU tiny): a check is skipped when less is left.
ESTIMATE_S = {"gpu": {"train_dit": 45, "train_ssm": 60, "sdpa": 10, "compile": 150, "optimizers": 20,
                      "zero": 90, "sampler": 40, "serve": 90},
              "cpu": {"train_dit": 2, "train_ssm": 3, "sdpa": 2, "compile": 150, "optimizers": 2,
                      "zero": 8, "sampler": 3, "serve": 60}}


class NoCudaError(DtrainError):
    """A CUDA-only option was asked for on a machine without a CUDA device."""


# ---- the device ---------------------------------------------------------------------------------

def versions() -> dict:
    def dist_version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": dist_version("deepspeed"),
            "ray": dist_version("ray"), "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None}


def max_sm_clock_mhz(index: int = 0) -> tuple[float | None, str]:
    """The device's max SM clock in MHz and where it was read: nvidia-smi, NVML, then torch's properties."""
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-i", str(index), "--query-gpu=clocks.max.sm",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=20)
            return float(out.stdout.strip().splitlines()[0]), "nvidia-smi --query-gpu=clocks.max.sm"
        except (ValueError, IndexError, OSError, subprocess.SubprocessError):
            pass
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        return float(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)), "NVML max SM clock"
    except Exception:  # no pynvml, no NVML library, no permission
        pass
    khz = getattr(torch.cuda.get_device_properties(index), "clock_rate", None)
    return (khz / 1000, "torch.cuda.get_device_properties().clock_rate") if khz else (None, "unavailable")


def peak_bf16(sms: int, clock_mhz: float | None, capability: tuple[int, int]) -> dict:
    """The dense bf16 peak from its inputs, which are reported with it; {"skipped"} where one is unknown."""
    per_sm = BF16_FLOPS_PER_SM_CLOCK.get(tuple(capability))
    inputs = {"sms": sms, "max_sm_clock_mhz": clock_mhz, "capability": f"sm_{capability[0]}{capability[1]}",
              "bf16_flops_per_sm_per_clock": per_sm}
    if per_sm is None:
        return {**inputs, "skipped": f"no dense bf16 rate known for compute capability {capability[0]}.{capability[1]}"}
    if clock_mhz is None:
        return {**inputs, "skipped": "the device's SM clock could not be read (nvidia-smi, NVML, torch)"}
    return {**inputs, "peak_tflops": sms * clock_mhz * 1e6 * per_sm / 1e12}


def device_info() -> dict:
    from dtrain.precision import machine

    if not torch.cuda.is_available():
        m = machine()
        return {"kind": "cpu", "name": m["cpu"], "threads": m["torch_threads"], "cpus": m["cpus"],
                "torch_cpu_capability": m["torch_cpu_capability"], "native_bf16_cpu": m["native_bf16_cpu"],
                "peak": {"skipped": f"MFU needs a GPU's peak: {NO_CUDA}"}}
    p = torch.cuda.get_device_properties(0)
    clock, source = max_sm_clock_mhz(0)
    return {"kind": "cuda", "name": torch.cuda.get_device_name(0), "memory_gib": round(p.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "peak": {**peak_bf16(p.multi_processor_count, clock, (p.major, p.minor)), "clock_source": source}}


# ---- the models ---------------------------------------------------------------------------------

def model_config(arch: str, tiny: bool, batch: int) -> Config:
    over = [f"model.arch={arch}", f"data.batch_size={batch}", "tracking.wandb=false"]
    if tiny:
        return load_config(None, TINY_OVERRIDES + over + ["train.precision=auto"])
    path = Path(FULL_CONFIG)
    if not path.exists():  # run from elsewhere than the repository root
        path = Path(__file__).resolve().parents[2] / FULL_CONFIG
    return load_config(str(path), over)


def forward_flops(cfg: Config) -> int | None:
    """FLOPs of one forward pass of one image (2 x MACs on the meta device); None where it cannot be counted."""
    from dtrain.models.flops import forward_macs

    try:
        return 2 * forward_macs(cfg.model)
    except RuntimeError:
        return None


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _autocast(device: str, dtype: torch.dtype):
    return torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)


def _precision(device: str) -> tuple[str, torch.dtype]:
    from dtrain.precision import choose

    c = choose("bf16" if device == "cuda" else "auto", device)
    return c.precision, c.dtype


def _batch(cfg: Config, device: str, n: int | None = None):
    m, n = cfg.model, n or cfg.data.batch_size
    return {"x": torch.randn(n, m.in_channels, m.image_size, m.image_size, device=device),
            "cond": torch.randint(0, m.num_classes, (n,), device=device)}


def time_train_steps(net: torch.nn.Module, cfg: Config, device: str, dtype: torch.dtype, steps: int, warmup: int,
                     opt: torch.optim.Optimizer | None = None) -> dict:
    """Seconds per optimizer step (forward + backward + step) after `warmup` untimed ones; the first step's
    seconds apart (under torch.compile: the compile time)."""
    from dtrain.diffusion import build_objective
    from dtrain.precision import in_precision

    loss_fn = build_objective(cfg.objective)
    opt = opt or torch.optim.AdamW(net.parameters(), lr=1e-4, **({"fused": True} if device == "cuda" else {}))
    batch = _batch(cfg, device)
    fn = in_precision(net, torch.float32)  # fp32 weights and inputs, bf16 matmuls under autocast
    first = start = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        t0 = time.perf_counter()
        with _autocast(device, dtype):
            loss = loss_fn(fn, batch).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i == 0:
            _sync(device)
            first = time.perf_counter() - t0
    _sync(device)
    return {"step_s": (time.perf_counter() - start) / steps, "first_step_s": first}


def _fit_batch(make: Callable[[int], dict], batch: int, device: str) -> dict:
    """make(batch), halving the batch on a CUDA out-of-memory error down to 1."""
    while True:
        try:
            return {**make(batch), "batch": batch}
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
            batch //= 2
            torch.cuda.empty_cache()


def check_train(arch: str, tiny: bool, device: str, peak: dict, batch: int, steps: int) -> dict:
    from dtrain.models import build_model

    precision, dtype = _precision(device)

    def make(b: int) -> dict:
        cfg = model_config(arch, tiny, b)
        torch.manual_seed(0)
        net = build_model(cfg.model).to(device).train()
        return {**time_train_steps(net, cfg, device, dtype, steps, warmup=2), "cfg": cfg,
                "params": sum(p.numel() for p in net.parameters())}

    r = _fit_batch(make, batch, device)
    cfg, b = r.pop("cfg"), r["batch"]
    m = cfg.model
    flops = forward_flops(cfg)
    out = {"model": f"{m.arch}-{m.size}/{m.patch_size} {m.image_size}x{m.image_size}x{m.in_channels}",
           "params": r["params"], "precision": precision + (" autocast" if dtype != torch.float32 else ""),
           "batch": b, "timed_steps": steps, "step_ms": 1000 * r["step_s"], "first_step_ms": 1000 * r["first_step_s"],
           "images_per_s": b / r["step_s"], "forward_gflops_per_image": flops and flops / 1e9}
    if flops:
        out["achieved_tflops"] = 3 * flops * b / r["step_s"] / 1e12
    if "peak_tflops" in peak and flops:
        out["mfu"] = out["achieved_tflops"] / peak["peak_tflops"]
    else:
        out["mfu"] = {"skipped": peak.get("skipped", "the forward FLOPs could not be counted")}
    if device == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


# ---- attention ----------------------------------------------------------------------------------

SDPA_OPS = {"flash": "_scaled_dot_product_flash_attention", "efficient": "_scaled_dot_product_efficient_attention",
            "cudnn": "_scaled_dot_product_cudnn_attention", "math": "_scaled_dot_product_attention_math"}


def attention_ops(net: torch.nn.Module, cfg: Config, device: str, dtype: torch.dtype) -> list[str]:
    """The aten scaled-dot-product ops one forward pass of `net` ran, by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    batch = _batch(cfg, device, 2)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.no_grad(), _autocast(device, dtype), profile(activities=acts) as prof:
        net(batch["x"], torch.rand(2, device=device), batch["cond"])
        _sync(device)
    return sorted({e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "flash" in e.key.lower()
                   or "fmha" in e.key.lower() or "efficient_attention" in e.key})


def check_sdpa(tiny: bool, device: str) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F

    from dtrain.models import build_model

    _, dtype = _precision(device)
    cfg = model_config("dit", tiny, 2)
    net = build_model(cfg.model).to(device).eval()
    from dtrain.models.layers import Attention

    attn = next(mod for mod in net.modules() if isinstance(mod, Attention))
    heads, head_dim = attn.heads, attn.qkv.in_features // attn.heads
    tokens = (cfg.model.image_size // cfg.model.patch_size) ** 2
    q, k, v = (torch.randn(2, heads, tokens, head_dim, device=device, dtype=dtype) for _ in range(3))
    out: dict = {"head_dim": head_dim, "heads": heads, "tokens": tokens, "dtype": str(dtype).removeprefix("torch.")}
    if device == "cuda":
        works = {}
        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)):
            try:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
                works[name] = True
            except RuntimeError as e:
                works[name] = f"no: {str(e).splitlines()[0][:160]}"
        out["backends"] = works
    else:
        out["backends"] = {"skipped": f"flash and memory-efficient SDPA kernels are CUDA kernels: {NO_CUDA}"}
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(q, k, v)
            out["cpu_flash_kernel"] = True
        except RuntimeError as e:
            out["cpu_flash_kernel"] = f"no: {str(e).splitlines()[0][:160]}"
    ops = attention_ops(net, cfg, device, dtype)
    ran = [name for name, op in SDPA_OPS.items() if any(op in o for o in ops)]
    if any("flash_attention_for_cpu" in o for o in ops):
        ran = ["flash (CPU kernel)" if r == "flash" else r for r in ran]
    out.update(model_ops=ops, model_ran=", ".join(ran) or "none found")
    if device == "cuda" and ran and set(ran) <= {"math"}:
        out["failure"] = "only the math backend ran in the model's attention: no flash or memory-efficient kernel"
    return out


# ---- compile, optimizers, ZeRO -----------------------------------------------------------------------

def check_compile(tiny: bool, device: str, batch: int, steps: int) -> dict:
    from dtrain.models import build_model

    _, dtype = _precision(device)
    cfg = model_config("dit", tiny, batch)
    torch.manual_seed(0)
    net = build_model(cfg.model).to(device).train()
    eager = time_train_steps(net, cfg, device, dtype, steps, warmup=2)
    torch._dynamo.reset()
    compiled = torch.compile(net)
    t = time_train_steps(compiled, cfg, device, dtype, steps, warmup=2)
    return {"model": f"{cfg.model.arch}-{cfg.model.size}", "batch": batch, "mode": "default",
            "eager_step_ms": 1000 * eager["step_s"], "compiled_step_ms": 1000 * t["step_s"],
            "speedup": eager["step_s"] / t["step_s"], "compile_s": t["first_step_s"] - eager["step_s"]}


def check_optimizers(tiny: bool, device: str, steps: int) -> dict:
    from dtrain.models import build_model

    cfg = model_config("dit", tiny, 1)
    net = build_model(cfg.model).to(device)
    params = list(net.parameters())
    makers: dict[str, Callable] = {"torch_adamw": lambda: torch.optim.AdamW(params, lr=1e-4),
                                   "torch_adamw_fused": lambda: torch.optim.AdamW(params, lr=1e-4, fused=True)}
    out: dict = {"params": sum(p.numel() for p in params)}
    if device == "cuda":
        def fused():
            from deepspeed.ops.adam import FusedAdam

            return FusedAdam(params, lr=1e-4, adam_w_mode=True)
        makers["deepspeed_fused_adam"] = fused
    else:
        out["deepspeed_fused_adam"] = {"skipped": f"deepspeed.ops.adam.FusedAdam is CUDA-only: {NO_CUDA}"}
    for p in params:
        p.grad = torch.randn_like(p)
    for name, make in makers.items():
        try:
            opt = make()
            for i in range(2 + steps):
                if i == 2:
                    _sync(device)
                    start = time.perf_counter()
                opt.step()
            _sync(device)
            out[name] = {"step_ms": 1000 * (time.perf_counter() - start) / steps}
        except Exception as e:  # one optimizer that cannot run does not hide the others
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    return out


def _init_single_process_group(device: str) -> bool:
    """world size 1 on loopback for DeepSpeed; True when this call made the group."""
    import torch.distributed as dist

    from dtrain.runtime import free_port

    if dist.is_initialized():
        return False
    port = free_port()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=0, world_size=1)
    return True


def check_zero(tiny: bool, device: str, batch: int, steps: int) -> dict:
    import torch.distributed as dist

    from dtrain.diffusion import build_objective
    from dtrain.models import build_model
    from dtrain.precision import in_precision
    from dtrain.train.deepspeed_glue import wrap_deepspeed

    precision, dtype = _precision(device)
    made = _init_single_process_group(device)
    out: dict = {"backend": dist.get_backend(), "precision": precision, "batch": batch, "world_size": 1}
    # ZeRO-3 swaps torch.nn.functional.linear for its own autograd Function for the whole process ("this
    # will persist unless manually reset"): put it back, so the later checks and the caller run plain torch
    linear = torch.nn.functional.linear
    try:
        for stage in (2, 3):
            cfg = model_config("dit", tiny, batch)
            cfg = replace(cfg, train=replace(cfg.train, zero_stage=stage, precision=precision, grad_accum_steps=1))
            torch.manual_seed(0)
            engine = wrap_deepspeed(build_model(cfg.model), cfg, 1)
            loss_fn = build_objective(cfg.objective)
            data = _batch(cfg, device)
            fn = in_precision(engine, dtype)
            for i in range(2 + steps):
                if i == 2:
                    _sync(device)
                    start = time.perf_counter()
                loss = loss_fn(fn, data).mean()
                engine.backward(loss)
                engine.step()
            _sync(device)
            out[f"zero{stage}"] = {"step_ms": 1000 * (time.perf_counter() - start) / steps,
                                   "optimizer": type(engine.optimizer).__name__}
            engine.destroy()
            del engine
            if device == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.nn.functional.linear = linear
        if made:
            dist.destroy_process_group()
    return out


# ---- sampling and serving ---------------------------------------------------------------------------

def check_sampler(tiny: bool, device: str, steps: int = 8, batches: tuple[int, ...] = (1, 64)) -> dict:
    from dtrain.diffusion.samplers import nfe
    from dtrain.generation import solve
    from dtrain.models import build_model

    precision, _ = _precision(device)
    cfg = model_config("dit", tiny, 1)
    torch.manual_seed(0)
    net = build_model(cfg.model).to(device)
    net = net.to(torch.bfloat16) if precision == "bf16" else net  # cast once: solve() then runs it without a copy
    calls = nfe("euler", steps, 1.0)
    out: dict = {"sampler": "euler", "steps": steps, "guidance": 1.0, "nfe": calls, "precision": precision}
    for b in batches:
        labels = torch.arange(b) % cfg.model.num_classes
        solve(net, cfg, labels[:1], [0], 1, 1.0, precision, "euler")  # warm up
        _sync(device)
        start = time.perf_counter()
        solve(net, cfg, labels, list(range(b)), steps, 1.0, precision, "euler")
        _sync(device)
        s = time.perf_counter() - start
        out[f"batch{b}"] = {"ms_per_nfe": 1000 * s / calls, "images_per_s": b / s}
    return out


def check_serve(device: str) -> dict:
    """A tiny pixel DiT checkpoint served by one replica (on the GPU where there is one), one request."""
    import httpx
    import ray
    from ray import serve

    from dtrain.checkpoint import write_inference_files
    from dtrain.models import build_model
    from dtrain.runtime import ensure_ray, free_port
    from dtrain.serving.app import deploy
    from dtrain.serving.config import ServeArgs

    started_ray = not ray.is_initialized()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, ["model.size=tiny", "model.image_size=8", "model.patch_size=2", "sample.steps=4"])
        torch.manual_seed(0)
        weights = {k: v + 0.1 * torch.randn_like(v) for k, v in build_model(cfg.model).state_dict().items()}
        ckpt = Path(tmp) / "ckpt"
        write_inference_files(ckpt, weights, cfg, {"step": 0})
        start = time.perf_counter()
        ensure_ray(num_cpus=2, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        try:
            deploy(ServeArgs(checkpoint=str(ckpt), num_replicas=1, replica_cpus=1,
                             replica_gpus=1 if device == "cuda" else 0), "bench_gpu")
            deployed = time.perf_counter() - start
            with httpx.Client(base_url=f"http://127.0.0.1:{port}/bench_gpu", timeout=120) as client:
                t0 = time.perf_counter()
                r = client.post("/v1/generate", json={"class_label": 3, "steps": 4, "num_images": 1})
                latency = time.perf_counter() - t0
                health = client.get("/healthz").json()
            images = len(r.json().get("images", [])) if r.status_code == 200 else 0
            return {"status": r.status_code, "images": images, "deploy_s": deployed, "request_ms": 1000 * latency,
                    "replica_device": health.get("device"), "replica_precision": health.get("precision")}
        finally:
            serve.delete("bench_gpu")
            if started_ray:
                serve.shutdown()
                ray.shutdown()


# ---- the run ------------------------------------------------------------------------------------------

CHECKS = ("train_dit", "train_ssm", "sdpa", "compile", "optimizers", "zero", "sampler", "serve")


def run(budget_s: float = 480, tiny: bool = False, with_serve: bool = False, require_gpu: bool = False,
        checks: tuple[str, ...] = CHECKS, log: Callable[[str], None] | None = None) -> dict:
    """The report: device, versions, and one entry per check (figures, {"skipped"} or {"error"}), each with
    its wall time. On a CPU every model is tiny; `tiny` makes them tiny on a GPU too."""
    cuda = torch.cuda.is_available()
    if require_gpu and not cuda:
        raise NoCudaError(f"--require-gpu: {NO_CUDA}; this machine has {os.cpu_count()} CPUs and no GPU for "
                          "`dtrain bench gpu` to measure")
    device = "cuda" if cuda else "cpu"
    tiny = tiny or not cuda
    if not cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    est = ESTIMATE_S["cpu" if tiny else "gpu"]
    batch, steps = (8, 3) if tiny else (32, 10)
    began = time.perf_counter()
    info = device_info()
    report: dict = {"device": info, "versions": versions(), "budget_s": budget_s, "tiny": tiny,
                    "checks": {}}
    bodies: dict[str, Callable[[], dict]] = {
        "train_dit": lambda: check_train("dit", tiny, device, info["peak"], batch, steps),
        "train_ssm": lambda: check_train("ssm", tiny, device, info["peak"], batch, steps),
        "sdpa": lambda: check_sdpa(tiny, device),
        "compile": lambda: check_compile(tiny, device, batch, steps),
        "optimizers": lambda: check_optimizers(tiny, device, steps),
        "zero": lambda: check_zero(tiny, device, batch, steps),
        "sampler": lambda: check_sampler(tiny, device),
        "serve": lambda: check_serve(device),
    }
    for name in CHECKS:
        left = budget_s - (time.perf_counter() - began)
        if name not in checks:
            result = {"skipped": "not asked for"}
        elif name == "serve" and not cuda and not with_serve:
            result = {"skipped": f"a Serve replica on a CPU is slow: {NO_CUDA} (--with-serve runs it)"}
        elif name == "compile" and not cuda and left < est[name]:
            result = {"skipped": f"torch.compile on a CPU needs ~{est[name]} s, {left:.0f} s of the budget left"}
        elif left < est[name]:
            result = {"skipped": f"over the time budget: ~{est[name]} s needed, {left:.0f} s of {budget_s:.0f} s left"}
        else:
            if log:
                log(f"bench gpu: {name} ({left:.0f} s of the budget left)")
            t0 = time.perf_counter()
            try:
                result = bodies[name]()
            except Exception as e:  # one failing check does not stop the others
                result = {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"}
            finally:
                if cuda:
                    torch.cuda.empty_cache()
            result["wall_s"] = time.perf_counter() - t0
        report["checks"][name] = result
    report["wall_s"] = time.perf_counter() - began
    return report


# ---- the table ----------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_fmt(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(map(str, v))
    return "" if v is None else str(v)


def render(report: dict) -> str:
    d, v = report["device"], report["versions"]
    lines = [f"device: {d['name']} ({d['kind']})",
             "versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if x is not None),
             f"peak bf16: {_fmt(d['peak'])}",
             f"budget: {report['budget_s']:.0f} s, used {report['wall_s']:.1f} s, tiny models: {report['tiny']}", ""]
    width = max(len(n) for n in report["checks"])
    for name, r in report["checks"].items():
        if "skipped" in r or "error" in r:
            status = "SKIPPED" if "skipped" in r else "ERROR"
            lines.append(f"{name.ljust(width)}  {status}: {r.get('skipped') or r.get('error')}")
            continue
        lines.append(f"{name.ljust(width)}  ({r['wall_s']:.1f} s)")
        for k, x in r.items():
            if k != "wall_s":
                lines.append(f"{'':{width}}    {k}: {_fmt(x)}")
    return "\n".join(lines)

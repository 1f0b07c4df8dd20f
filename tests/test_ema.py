"""The EMA averages DeepSpeed's fp32 master weights (this rank's partition of them), not the module's
bf16 copy. Real bf16 DeepSpeed engines on a 2-rank gloo process group (spawned processes, no Ray)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.config import load_config
from dtrain.runtime import free_port
from dtrain.train.ema import EMA


class Tiny(torch.nn.Module):
    """Odd sizes: under 2 ranks the partition boundary cuts `a.weight`, and ZeRO-3 pads. One frozen
    parameter, which has no master copy."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(7, 13), torch.nn.Linear(13, 5)
        self.frozen = torch.nn.Parameter(torch.randn(5), requires_grad=False)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))) + self.frozen


def test_without_an_engine_the_ema_averages_the_module():
    net = Tiny()
    ema = EMA(net, 0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    before = {n: p.detach().clone() - 1.0 for n, p in net.named_parameters()}
    ema.update(10**6)  # decay 0.5 (past the warm-up)
    full = ema.full_state_dict()
    for n, p in net.named_parameters():
        torch.testing.assert_close(full[n], before[n] + 0.5, rtol=0, atol=1e-6)
    again = EMA(net, 0.5)
    again.load_full_state_dict(full)
    torch.testing.assert_close(again.full_state_dict(), full, rtol=0, atol=0)


def _masters(engine) -> dict[str, torch.Tensor]:
    """{name: full fp32 master weight} straight from DeepSpeed (a collective under ZeRO 1-3)."""
    from deepspeed.utils import safe_get_full_fp32_param

    stage0 = {}
    if hasattr(engine.optimizer, "fp32_groups"):  # ZeRO-0 bf16: FP16_UnfusedOptimizer's fp32 copies
        stage0 = {id(p): h for g, hg in zip(engine.optimizer.fp16_groups, engine.optimizer.fp32_groups)
                  for p, h in zip(g, hg)}
    out = {}
    for n, p in engine.module.named_parameters():
        m = safe_get_full_fp32_param(p) if (hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")) else stage0.get(id(p))
        out[n] = m.float().clone() if m is not None else None  # None: frozen, no master
    return out


def _steps(engine, gen, n):
    for _ in range(n):
        x = torch.randn(4, 7, generator=gen)
        loss = (engine(x.to(engine.module.a.weight.dtype)).float() - x[:, :5]).pow(2).mean()
        engine.backward(loss)
        engine.step()


def _check(engine, ema, module_ema):
    full, module = ema.full_state_dict(), module_ema.full_state_dict()
    if not engine.bfloat16_enabled():  # fp32 training: the module's weights are the masters
        torch.testing.assert_close(full, module, rtol=0, atol=0)
        for n, master in _masters(engine).items():
            torch.testing.assert_close(full[n], module[n] if master is None else master, rtol=0, atol=0, msg=n)
        return full
    masters = _masters(engine)
    assert full.keys() == masters.keys() == {"a.weight", "a.bias", "b.weight", "b.bias", "frozen"}
    differs = 0
    for n, master in masters.items():
        assert full[n].dtype == torch.float32
        if master is None:  # frozen: the module's own weights
            torch.testing.assert_close(full[n], module[n], rtol=0, atol=0)
            continue
        torch.testing.assert_close(full[n], master, rtol=0, atol=0, msg=n)
        # the module's copy is the master rounded to bf16: it lost the low bits the EMA keeps
        assert torch.equal(full[n].bfloat16().float(), module[n]), n
        differs += int(not torch.equal(full[n], module[n]))
    assert differs == 4
    if engine.zero_optimization_stage() >= 1:  # the EMA is sharded like the master weights
        assert sum(s.numel() for s in ema.shadow) < sum(p.numel() for p in masters.values() if p is not None)
    return full


def _stage(rank, world, stage, precision, ckpt):
    from dtrain.train.deepspeed_glue import wrap_deepspeed

    cfg = load_config(None, ["model.size=tiny", f"train.precision={precision}", f"train.zero_stage={stage}",
                             "data.batch_size=4", "train.warmup_steps=1", "train.lr=1e-3"])
    torch.manual_seed(0)
    engine = wrap_deepspeed(Tiny(), cfg, world)
    ema = EMA(engine.module, 0.0, engine=engine)  # decay 0: the EMA is the weights it follows
    module_ema = EMA(engine.module, 0.0)  # the module's bf16 copy (what the EMA followed before)
    gen = torch.Generator().manual_seed(rank)
    for step in range(3):
        _steps(engine, gen, 1)
        ema.update(step)
        module_ema.update(step)
    full = _check(engine, ema, module_ema)

    # round trip through the consolidated (on-disk) format
    again = EMA(engine.module, 0.0, engine=engine)
    again.load_full_state_dict(full)
    for s, t in zip(again.shadow, ema.shadow):
        assert torch.equal(s, t)
    torch.testing.assert_close(again.full_state_dict(), full, rtol=0, atol=0)

    # loading a checkpoint re-links DeepSpeed's fp32 partitions: the EMA must follow the new ones
    engine.save_checkpoint(ckpt, tag=f"zero{stage}")
    engine.load_checkpoint(ckpt, tag=f"zero{stage}")
    _steps(engine, gen, 1)
    ema.update(3)
    module_ema.update(3)
    _check(engine, ema, module_ema)
    engine.destroy()


def _worker(rank, world, port, ckpt):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    deepspeed.init_distributed("gloo")
    # one pair of processes for all cases: spawning is most of the cost
    for stage, precision in [(0, "bf16"), (1, "bf16"), (2, "bf16"), (3, "bf16"), (2, "fp32"), (3, "fp32")]:
        try:
            _stage(rank, world, stage, precision, f"{ckpt}/{precision}")
        except Exception as e:
            raise AssertionError(f"ZeRO-{stage} {precision}") from e
    dist.destroy_process_group()


@pytest.mark.slow
def test_ema_follows_the_fp32_master_weights_at_zero_0_to_3(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path / "ckpt")), nprocs=2)

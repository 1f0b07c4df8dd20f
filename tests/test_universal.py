"""Resuming at another worker count: ZeRO shards written by 2 ranks, converted to DeepSpeed's
universal checkpoint, loaded by 1 or 3 ranks. Real DeepSpeed engines on gloo process groups
(spawned processes, no Ray); the full fp32 weights and Adam moments must survive exactly."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dtrain.checkpoint import DEEPSPEED_DIR, DEEPSPEED_TAG, UNIVERSAL_DIR, write_inference_files
from dtrain.config import from_yaml, load_config, to_yaml
from dtrain.runtime import free_port
from dtrain.train.universal import convert, needs_universal

pytestmark = pytest.mark.slow
STATES = ("fp32", "exp_avg", "exp_avg_sq")


def _engine(rank: int, world: int, port: int, cfg_yaml: str, seed: int, load_universal: bool = False):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    import deepspeed

    from dtrain.models import build_model
    from dtrain.train.deepspeed_glue import wrap_deepspeed

    deepspeed.init_distributed("gloo")
    cfg = from_yaml(cfg_yaml)
    torch.manual_seed(seed)
    return wrap_deepspeed(build_model(cfg.model), cfg, world, load_universal=load_universal), cfg


def _full_state(engine) -> dict:
    """{param name: {fp32, exp_avg, exp_avg_sq}} gathered across ranks (a collective)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    return {n: {"fp32": safe_get_full_fp32_param(p).clone(),
                **{m: safe_get_full_optimizer_state(p, m).clone() for m in STATES[1:]}}
            for n, p in engine.module.named_parameters()}


def _train_and_save(rank, world, port, cfg_yaml, ckpt):
    engine, cfg = _engine(rank, world, port, cfg_yaml, seed=0)
    gen = torch.Generator().manual_seed(rank)
    # three optimizer steps on this rank's own random batches (adaLN-Zero: deeper layers get
    # gradients only from the second step on)
    for _ in range(3):
        x = torch.randn(4, 1, 8, 8, generator=gen)
        loss = (engine(x, torch.rand(4, generator=gen), torch.randint(0, 10, (4,), generator=gen)) - x).pow(2).mean()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(f"{ckpt}/{DEEPSPEED_DIR}", tag=DEEPSPEED_TAG, client_state={"step": 3})
    state = _full_state(engine)
    if rank == 0:
        write_inference_files(ckpt, {n: s["fp32"] for n, s in state.items()}, cfg,
                              {"step": 3, "world_size": world, "zero_stage": cfg.train.zero_stage})
        torch.save(state, f"{ckpt}/expected.pt")
    dist.destroy_process_group()


def _load(rank, world, port, cfg_yaml, ckpt):
    # another initialisation than the saved run's: loading must replace all of it
    engine, _ = _engine(rank, world, port, cfg_yaml, seed=1, load_universal=True)
    _, client = engine.load_checkpoint(f"{ckpt}/{UNIVERSAL_DIR}", tag=DEEPSPEED_TAG)
    state = _full_state(engine)
    adam_steps = {float(s["step"]) for s in engine.optimizer.optimizer.state.values()}  # drives bias correction
    if rank == 0:
        torch.save({"state": state, "step": client["step"], "lr_steps": engine.lr_scheduler.last_epoch,
                    "adam_steps": adam_steps},
                   f"{ckpt}/loaded_{world}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize("stage, new_world", [(2, 1), (3, 3)])
def test_zero_state_survives_a_change_of_worker_count(tmp_path, stage, new_world):
    cfg = load_config(None, ["model.size=tiny", "model.image_size=8", "train.precision=fp32",
                             f"train.zero_stage={stage}", "data.batch_size=4", "train.warmup_steps=1"])
    ckpt = tmp_path / "checkpoint_00000003"
    mp.spawn(_train_and_save, args=(2, free_port(), to_yaml(cfg), str(ckpt)), nprocs=2)
    assert needs_universal(ckpt, new_world) and not needs_universal(ckpt, 2)
    # a stray shard of a rank this save did not have (a retried save at a larger count) is ignored
    (ckpt / DEEPSPEED_DIR / DEEPSPEED_TAG / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_bytes(b"stale")

    convert(ckpt)
    assert (ckpt / UNIVERSAL_DIR / DEEPSPEED_TAG).is_dir() and not list(ckpt.glob(".*.tmp"))
    mp.spawn(_load, args=(new_world, free_port(), to_yaml(cfg), str(ckpt)), nprocs=new_world)

    expected, loaded = torch.load(ckpt / "expected.pt"), torch.load(ckpt / f"loaded_{new_world}.pt")
    assert loaded["step"] == 3 and loaded["lr_steps"] == 3 and loaded["adam_steps"] == {3.0}
    assert expected.keys() == loaded["state"].keys()
    assert sum(bool(s["exp_avg_sq"].any()) for s in expected.values()) > len(expected) // 2  # Adam really stepped
    for name, states in expected.items():
        for s in STATES:
            torch.testing.assert_close(loaded["state"][name][s], states[s], rtol=0, atol=0, msg=f"{name} {s}")

"""MeanFlow on the real stack: Ray Train + DeepSpeed ZeRO-2 and ZeRO-3 train a flow map (the JVP through
the engine), its checkpoint samples in one network evaluation, and a flow map starts from a velocity parent."""
from __future__ import annotations

import pytest
import torch

from dtrain.checkpoint import load_model, read_meta
from dtrain.config import load_config
from dtrain.diffusion.samplers import nfe
from dtrain.generation import render
from dtrain.train.driver import fit
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.slow
FLOW_MAP = ["model.flow_map=true", "objective.name=mean_flow", "sample.sampler=flow_map", "sample.steps=1",
            "sample.guidance=1.0", "train.steps=4", "train.ckpt_every=4", "model.hidden_size=0", "model.depth=0"]


@pytest.mark.parametrize("zero_stage,jvp", [(2, "auto"), (3, "auto")])  # forward mode at ZeRO-2, differences at 3
def test_a_flow_map_trains_under_zero_and_samples_in_one_step(ray_cluster, digits_dir, tmp_path, tiny_checkpoint,
                                                              zero_stage, jvp):
    # ZeRO-3 runs start from a velocity parent: the flow map's span embedding is all it lacks
    parent = [f"stage.init_from={tiny_checkpoint}"] if zero_stage == 3 else []
    cfg = load_config("configs/quickstart.yaml", tiny_overrides(digits_dir, tmp_path) + FLOW_MAP + parent + [
        f"train.zero_stage={zero_stage}", f"objective.jvp={jvp}", f"train.run_name=mf{zero_stage}{jvp[0]}",
        "train.precision=fp32"])
    ckpt = fit(cfg)
    meta = read_meta(ckpt)
    assert meta["step"] == 4 and meta["objective"] == "mean_flow" and meta["zero_stage"] == zero_stage
    assert meta["jvp"] == ("finite_difference" if zero_stage == 3 else "forward")
    assert meta["parent"] == (str(tiny_checkpoint.resolve()) if parent else None)
    net, loaded = load_model(ckpt)
    assert loaded.model.flow_map and any(k.startswith("span_embed.") for k in net.state_dict())
    x = render(net, loaded, meta, torch.arange(4), [0, 1, 2, 3], steps=1, guidance=1.0, sampler="flow_map")
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert nfe("flow_map", 1, 1.0) == 1

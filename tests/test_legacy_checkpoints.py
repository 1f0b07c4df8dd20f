"""Checkpoints written before the stage kinds were split (stage `distill`, d622e37) still load, sample the
same images and describe themselves with today's kinds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dtrain.checkpoint import load_model, read_config, read_meta
from dtrain.generation import render

LEGACY = Path(__file__).parent / "data" / "legacy-checkpoints"


@pytest.mark.parametrize("name", ["distill-consistency", "distill-flow-map"])
def test_a_checkpoint_written_before_samples_the_same_images(name):
    d = LEGACY / name
    net, cfg = load_model(d)
    x = render(net, cfg, read_meta(d), torch.arange(4), [0, 1, 2, 3], cfg.sample.steps, 2.0, "fp32", cfg.sample.sampler)
    assert torch.equal(x, torch.load(d / "expected-images.pt"))


@pytest.mark.parametrize("name, kind", [("distill-consistency", "consistency_distill"),
                                        ("distill-flow-map", "flow_map_distill")])
def test_the_old_kind_distill_reads_as_the_kind_it_was(name, kind):
    from dtrain.train.stages import STAGES

    cfg = read_config(LEGACY / name)
    assert cfg.stage.name == kind and kind in STAGES
    STAGES[kind].check(cfg)  # its config passes today's rules of that kind

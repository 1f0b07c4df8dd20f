"""Request planning (dtrain.serving.planning) without a cluster or an app: which model and version serve a
request (named, default, canary share, spike fallback), the checkpoint's defaults filled in, and every
misfit refused with the field it names, in the order the ingress always checked them."""
from __future__ import annotations

import subprocess
import sys

import pytest

from dtrain.serving.config import ModelSpec
from dtrain.serving.planning import Job, Plan, PlanError, known_version, model_name, plan, route
from dtrain.serving.schemas import GenerateRequest


def info(version: str, num_classes: int = 10, flow_map: bool = False, sampler: str = "euler", steps: int = 4,
         guidance: float = 2.0) -> dict:
    """A catalog entry as dtrain.serving.app.version_info makes it (the fields planning reads)."""
    return {"model": "m", "version": version, "stage": "pretrain", "num_classes": num_classes, "flow_map": flow_map,
            "defaults": {"sampler": sampler, "steps": steps, "guidance": guidance}}


SPECS = {"m": ModelSpec(versions={"v1": "/c/v1", "v2": "/c/v2", "fm": "/c/fm"}, default="v1",
                        canary={"version": "v2", "weight": 0.25},
                        fallback={"version": "fm", "steps": 2, "when_in_flight_over": 8}),
         "other": ModelSpec(versions={"a": "/c/a"})}
CATALOG = {"m": {"v1": info("v1"), "v2": info("v2", steps=8, guidance=1.0, sampler="heun"),
                 "fm": info("fm", flow_map=True, sampler="flow_map", steps=1)},
           "other": {"a": info("a", num_classes=3)}}


def never() -> float:
    raise AssertionError("the canary's coin was drawn")


def planned(draw=lambda: 0.99, in_flight: int = 1, max_steps: int = 100, max_images: int = 16, **body) -> Plan:
    return plan(GenerateRequest(**body), SPECS, CATALOG, max_steps=max_steps, max_images=max_images,
                in_flight=in_flight, draw=draw)


def refused(**kwargs) -> tuple[str, str]:
    with pytest.raises(PlanError) as e:
        planned(**kwargs)
    return e.value.field, e.value.msg


def test_a_bare_request_gets_the_first_model_its_default_version_and_the_checkpoint_defaults():
    p = planned(class_label=3)
    assert (p.name, p.version, p.fallback, p.model_id, p.info) == ("m", "v1", False, "m/v1", CATALOG["m"]["v1"])
    assert p.job == Job(class_label=3, seeds=(0,), sampler="euler", steps=4, guidance=2.0)
    assert p.job.key == ("euler", 4, 2.0) and p.job.job_id is None


def test_what_the_request_gives_wins_over_the_defaults():
    p = planned(class_label=1, seed=7, num_images=3, sampler="heun", steps=9, guidance=1.0, model="m", version="v2")
    assert (p.name, p.version) == ("m", "v2")
    assert p.job == Job(1, (7, 8, 9), "heun", 9, 1.0)
    # guidance 0 is a value, not a missing one
    assert planned(class_label=1, guidance=0.0).job.guidance == 0.0
    # another model: its own default version and defaults
    assert (planned(class_label=2, model="other").model_id, planned(class_label=2, model="other").job.steps) == ("other/a", 4)


def test_the_canary_takes_its_share_of_unversioned_requests_only():
    assert planned(class_label=0, draw=lambda: 0.1).version == "v2"  # below the weight (0.25)
    assert planned(class_label=0, draw=lambda: 0.25).version == "v1"  # at or above it: the default
    v2 = planned(class_label=0, draw=lambda: 0.0)
    assert (v2.job.sampler, v2.job.steps, v2.job.guidance) == ("heun", 8, 1.0)  # the canary's own defaults
    assert planned(class_label=0, version="v1", draw=never).version == "v1"  # a named version: no coin
    assert planned(class_label=0, model="other", draw=never).version == "a"  # no canary: no coin


def test_the_spike_fallback_serves_requests_that_allow_it_above_its_threshold():
    p = planned(class_label=0, allow_fallback=True, in_flight=9, steps=50, draw=never)
    assert (p.version, p.fallback, p.job.steps, p.job.sampler) == ("fm", True, 2, "flow_map")  # its steps, not the request's
    assert not planned(class_label=0, allow_fallback=True, in_flight=8).fallback  # at the threshold: not yet
    assert not planned(class_label=0, allow_fallback=False, in_flight=100).fallback
    assert planned(class_label=0, allow_fallback=True, in_flight=9, version="v1").version == "v1"  # a named version wins
    assert (route(GenerateRequest(class_label=0, allow_fallback=True), SPECS, 9, never)) == ("m", "fm", True)


def test_unknown_models_and_versions_are_refused_naming_what_is_registered():
    assert refused(class_label=0, model="nope") == ("model", "unknown model; registered: ['m', 'other']")
    assert refused(class_label=0, version="v9") == ("version", "unknown version of m; registered: ['fm', 'v1', 'v2']")
    assert refused(class_label=0, model="other", version="v1") == ("version", "unknown version of other; registered: ['a']")
    assert model_name(SPECS, None) == "m" and known_version(SPECS, "other", "a") == "a"


def test_misfits_are_refused_by_field_first_come_first_named():
    assert refused(class_label=10) == ("class_label", "must be < 10")
    assert refused(class_label=3, model="other") == ("class_label", "must be < 3")
    assert refused(class_label=0, sampler="flow_map") == ("sampler", "flow_map needs a flow-map model; m/v1 predicts a velocity")
    assert planned(class_label=0, sampler="flow_map", version="fm").job.sampler == "flow_map"  # a flow-map model runs it
    assert refused(class_label=0, steps=101) == ("steps", "must be <= 100")
    assert refused(class_label=0, num_images=5, max_images=4) == ("num_images", "must be <= 4")
    # the fallback's steps are bounded too
    assert refused(class_label=0, allow_fallback=True, in_flight=9, max_steps=1) == ("steps", "must be <= 1")
    # several misfits: the first in the order class_label, sampler, steps, num_images
    assert refused(class_label=10, sampler="flow_map", steps=101, num_images=5, max_images=4)[0] == "class_label"
    assert refused(class_label=0, sampler="flow_map", steps=101, num_images=5, max_images=4)[0] == "sampler"
    assert refused(class_label=0, steps=101, num_images=5, max_images=4)[0] == "steps"
    e = PlanError("steps", "must be <= 1")
    assert isinstance(e, ValueError) and str(e) == "steps: must be <= 1"


def test_planning_needs_neither_ray_nor_fastapi():
    code = "import sys, dtrain.serving.planning; print(sorted({'ray', 'fastapi', 'starlette'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]", out

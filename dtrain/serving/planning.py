"""Request planning: which model and version serve a request (as named, the default, a canary share or
the spike fallback), with which sampler, steps and guidance (the request's, else the version's
checkpoint defaults), checked against that version and the deployment's bounds.

Pure: no Ray, no FastAPI, no clock; the canary's coin is drawn by the caller's `draw`. A request that
does not fit raises PlanError naming the body field, which the ingress answers with 422.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Callable, Mapping, Optional

from dtrain.diffusion.samplers import misfit
from dtrain.diffusion.samplers import nfe as plain_nfe
from dtrain.regions import METHODS, RegionError, RegionSpec, check_model, region_nfe

if TYPE_CHECKING:
    from dtrain.serving.config import ModelSpec
    from dtrain.serving.schemas import GenerateRequest


@dataclass(frozen=True)
class Job:
    """One request as the sampler sees it: a class model's class_label, or a text model's prompt (and
    negative prompt, None: the empty one), or regions (dtrain.regions: each a class label or a prompt in
    a box, composed by region_method; a text model's negative prompt beside them). Every field is part
    of the response cache's key."""
    class_label: Optional[int]
    seeds: tuple[int, ...]
    sampler: str
    steps: int
    guidance: float
    prompt: Optional[str] = None
    negative_prompt: Optional[str] = None
    job_id: Optional[str] = None  # an asynchronous job (dtrain.serving.jobs): cancellable between steps
    regions: Optional[RegionSpec] = None
    region_method: Optional[str] = None  # with regions: one of dtrain.regions.METHODS

    @property
    def key(self) -> tuple[str, int, float]:
        return self.sampler, self.steps, self.guidance

    @property
    def nfe(self) -> int:
        """Network evaluations per image: the sampler's, or region_nfe (multidiffusion runs the net once
        per distinct region on the conditional side)."""
        if self.regions is None:
            return plain_nfe(self.sampler, self.steps, self.guidance)
        return region_nfe(self.regions, self.sampler, self.steps, self.guidance, self.region_method)

    @property
    def cost(self) -> int:
        """What the job counts as against a tenant's image quota and the ingress's admission gate: its
        images, each weighed by its NFE against a plain image's at the same settings (rounded up), so a
        request costs what it runs: 3 regions, 16 Euler steps at guidance 2 cost 2 images per image."""
        return -(-len(self.seeds) * self.nfe // plain_nfe(self.sampler, self.steps, self.guidance))


@dataclass(frozen=True)
class Plan:
    """A request routed and checked: the version that serves it and the sampler's job."""
    name: str
    version: str
    fallback: bool
    info: dict
    job: Job

    @property
    def model_id(self) -> str:
        return f"{self.name}/{self.version}"


class PlanError(ValueError):
    """A request that does not fit the registry, the version or the deployment: 422 naming `field`."""

    def __init__(self, field: str, msg: str):
        super().__init__(f"{field}: {msg}")
        self.field, self.msg = field, msg


def model_name(specs: Mapping[str, ModelSpec], model: Optional[str]) -> str:
    """The model a request names (default: the first registered)."""
    name = model or next(iter(specs))
    if name not in specs:
        raise PlanError("model", f"unknown model; registered: {sorted(specs)}")
    return name


def known_version(specs: Mapping[str, ModelSpec], name: str, version: str) -> str:
    if version not in specs[name].versions:
        raise PlanError("version", f"unknown version of {name}; registered: {sorted(specs[name].versions)}")
    return version


def route(req: GenerateRequest, specs: Mapping[str, ModelSpec], in_flight: int,
          draw: Callable[[], float]) -> tuple[str, str, bool]:
    """(model, version, fallback used) for a request: as named, else the default or a canary share (when
    `draw()` < its weight); the spike fallback when the request allows it and the ingress holds more than
    its threshold (`in_flight`, this request included)."""
    name = model_name(specs, req.model)
    spec = specs[name]
    if req.version is not None:
        return name, known_version(specs, name, req.version), False
    fb = spec.fallback
    if req.allow_fallback and fb and in_flight > fb.when_in_flight_over:
        return name, fb.version, True
    if spec.canary and draw() < spec.canary.weight:
        return name, spec.canary.version, False
    return name, spec.default, False


def plan(req: GenerateRequest, specs: Mapping[str, ModelSpec], catalog: Mapping[str, Mapping[str, dict]], *,
         max_steps: int, max_images: int, in_flight: int, draw: Callable[[], float]) -> Plan:
    """Route a request, fill in the version's defaults (`catalog[name][version]`, from its checkpoint) and
    check it against that version and the deployment's bounds; the first misfit raises PlanError."""
    name, version, fallback = route(req, specs, in_flight, draw)
    info = catalog[name][version]
    d = info["defaults"]
    sampler = req.sampler or d["sampler"]
    steps = specs[name].fallback.steps if fallback else (req.steps or d["steps"])
    guidance = d["guidance"] if req.guidance is None else req.guidance
    condition_misfit(req, info, f"{name}/{version}")
    for ok, field, msg in ((misfit(sampler, info["flow_map"]) is None, "sampler",
                            f"{sampler} needs a flow-map model; {name}/{version} predicts a velocity"),
                           (steps <= max_steps, "steps", f"must be <= {max_steps}"),
                           (req.num_images <= max_images, "num_images", f"must be <= {max_images}")):
        if not ok:
            raise PlanError(field, msg)
    seeds = tuple(range(req.seed, req.seed + req.num_images))
    method = None if req.regions is None else (req.region_method or METHODS[0])
    return Plan(name, version, fallback, info, Job(req.class_label, seeds, sampler, steps, guidance, req.prompt,
                                                   req.negative_prompt, regions=req.regions, region_method=method))


def condition_misfit(req: GenerateRequest, info: Mapping, model_id: str) -> None:
    """A class model takes a class_label (below its class count) and no prompt; a text model a prompt
    and no class_label; either may take regions instead (region_misfit). PlanError naming the field
    otherwise."""
    if req.regions is not None:
        return region_misfit(req, info, model_id)
    if req.region_method is not None:
        raise PlanError("region_method", "given without regions: it says how regions are composed")
    if info.get("conditioning", "class") == "text":
        if req.class_label is not None:
            raise PlanError("class_label", f"{model_id} is text-conditioned: give prompt, not class_label")
        if req.prompt is None:
            raise PlanError("prompt", f"required: {model_id} is text-conditioned")
        return
    for field in ("prompt", "negative_prompt"):
        if getattr(req, field) is not None:
            raise PlanError(field, f"{model_id} is class-conditional: give class_label, not {field}")
    if req.class_label is None:
        raise PlanError("class_label", f"required: {model_id} is class-conditional (0..{info['num_classes'] - 1})")
    if req.class_label >= info["num_classes"]:
        raise PlanError("class_label", f"must be < {info['num_classes']}")


def region_misfit(req: GenerateRequest, info: Mapping, model_id: str) -> None:
    """Regions instead of prompt and class_label (a text model's negative_prompt may stay), checked against
    the version by dtrain.regions.check_model: prompts for a text model, class labels below its class count
    for a class model, an image model, regional attention on text models only. PlanError naming the field."""
    text = info.get("conditioning", "class") == "text"
    for field in ("prompt", "class_label"):
        if getattr(req, field) is not None:
            raise PlanError(field, f"give regions or {field}, not both (each region has its own "
                                   f"{'prompt' if text else 'class_label'})")
    if not text and req.negative_prompt is not None:
        raise PlanError("negative_prompt", f"{model_id} is class-conditional: give class_label, not negative_prompt")
    model = SimpleNamespace(arch=info["arch"], conditioning=info.get("conditioning", "class"),
                            num_classes=info.get("num_classes"))
    try:
        check_model(req.regions, SimpleNamespace(model=model), req.region_method or METHODS[0])
    except RegionError as e:
        # check_model names a regions field first ("regions.objects[1].class_label: ..."), but for the method
        field, _, msg = str(e).partition(": ")
        if not field.startswith("regions"):
            field, msg = "region_method", str(e)
        raise PlanError(field, f"{msg} ({model_id})") from None

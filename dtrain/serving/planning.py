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
from dtrain.editing import FIXED_POINT_REFINE, REPLACE_FRACTION
from dtrain.regions import METHODS, RegionError, RegionSpec, check_model, region_nfe

if TYPE_CHECKING:
    from dtrain.serving.config import ModelSpec
    from dtrain.serving.schemas import EditRequest, GenerateRequest


@dataclass(frozen=True)
class EditSpec:
    """What an edit job (`Job.edit`) runs besides its target condition: the source image's pixels (uint8
    [C, H, W] as bytes, decoded and checked by the ingress), how far back it is inverted, by which scheme,
    under which source condition (a text model's prompt, "" the empty one; a class model's class, None the
    null class), an optional mask (uint8 [H, W] as bytes: 255 may change, 0 kept), prompt-to-prompt, and
    whether the deployment's watermark is shaded into it (dtrain.editing.edit's `watermark`)."""
    image: bytes
    shape: tuple[int, int, int]
    strength: float
    scheme: str = "fixed_point"
    source_prompt: Optional[str] = None
    source_class: Optional[int] = None
    mask: Optional[bytes] = None
    attention_replace: bool = False
    watermark: bool = False


def edit_nfe(strength: float, steps: int, guidance: float, scheme: str = "fixed_point",
             attention_replace: bool = False, watermark: bool = False) -> int:
    """Network evaluations of dtrain.editing.edit per image, as it counts them: n = round(strength steps)
    (at least 1) steps inverted (1 + FIXED_POINT_REFINE calls each by fixed_point, 1 by euler) and
    regenerated (1 each), a source-branch call on each of the first round(REPLACE_FRACTION n) steps with
    attention replacement, one call for the watermark's noise estimate; doubled with guidance. Strength 0
    returns the input: none."""
    if strength == 0:
        return 0
    n = max(1, round(strength * steps))
    calls = n * (1 + (FIXED_POINT_REFINE if scheme == "fixed_point" else 0)) + n
    calls += round(REPLACE_FRACTION * n) if attention_replace else 0
    calls += 1 if watermark else 0
    return calls * (1 if guidance == 1.0 else 2)


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
    edit: Optional[EditSpec] = None  # an edit (POST /v1/edit): one image, no seeds; sampler "ddim"

    @property
    def key(self) -> tuple[str, int, float]:
        return self.sampler, self.steps, self.guidance

    @property
    def images(self) -> int:
        """Images the job makes: one per seed, or an edit's one."""
        return 1 if self.edit is not None else len(self.seeds)

    @property
    def nfe(self) -> int:
        """Network evaluations per image: the sampler's, or region_nfe (multidiffusion runs the net once
        per distinct region on the conditional side), or an edit's (edit_nfe)."""
        if self.edit is not None:
            e = self.edit
            return edit_nfe(e.strength, self.steps, self.guidance, e.scheme, e.attention_replace, e.watermark)
        if self.regions is None:
            return plain_nfe(self.sampler, self.steps, self.guidance)
        return region_nfe(self.regions, self.sampler, self.steps, self.guidance, self.region_method)

    @property
    def cost(self) -> int:
        """What the job counts as against a tenant's image quota and the ingress's admission gate: its
        images, each weighed by its NFE against a plain image's at the same settings (rounded up), so a
        request costs what it runs: 3 regions, 16 Euler steps at guidance 2 cost 2 images per image; an
        edit at strength 0.8 with fixed-point inversion 5. At least 1: even an edit at strength 0 is served."""
        return max(1, -(-self.images * self.nfe // plain_nfe(self.sampler, self.steps, self.guidance)))


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


def route(req: GenerateRequest | EditRequest, specs: Mapping[str, ModelSpec], in_flight: int,
          draw: Callable[[], float]) -> tuple[str, str, bool]:
    """(model, version, fallback used) for a request: as named, else the default or a canary share (when
    `draw()` < its weight); the spike fallback when the request allows it (an edit never does) and the
    ingress holds more than its threshold (`in_flight`, this request included)."""
    name = model_name(specs, req.model)
    spec = specs[name]
    if req.version is not None:
        return name, known_version(specs, name, req.version), False
    fb = spec.fallback
    if getattr(req, "allow_fallback", False) and fb and in_flight > fb.when_in_flight_over:
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


class Unsupported(Exception):
    """A version that cannot do what is asked (an edit of a latent, vector or x0-predicting model): 400."""


def plan_edit(req: EditRequest, specs: Mapping[str, ModelSpec], catalog: Mapping[str, Mapping[str, dict]],
              image: bytes, mask: Optional[bytes], *, max_steps: int, watermark: bool,
              draw: Callable[[], float]) -> Plan:
    """An edit routed (as named, else the default or a canary share; never the spike fallback: a few-step
    student would invert another ODE) and checked against that version: its conditioning (edit_misfit), the
    deployment's steps. `image` and `mask` are the decoded pixels (uint8 [C, H, W] and [H, W] as bytes, of
    the version's shape: dtrain.serving.uploads). Unsupported for a version that cannot edit."""
    name, version, _ = route(req, specs, 0, draw)
    info = catalog[name][version]
    model_id = f"{name}/{version}"
    support = info.get("edit") or {}
    if "unsupported" in support:
        raise Unsupported(f"{model_id} cannot edit images: {support['unsupported']}")
    d = info["defaults"]
    steps = req.steps or d["steps"]
    guidance = d["guidance"] if req.guidance is None else req.guidance
    edit_misfit(req, info, model_id)
    if steps > max_steps:
        raise PlanError("steps", f"must be <= {max_steps}")
    text = info.get("conditioning", "class") == "text"
    spec = EditSpec(image, (info["channels"], info["image_size"], info["image_size"]), req.strength, req.scheme,
                    source_prompt=(req.source_prompt or "") if text else None, source_class=req.source_class,
                    mask=mask, attention_replace=req.attention_replace, watermark=watermark and req.strength > 0)
    return Plan(name, version, False, info, Job(req.class_label, (), "ddim", steps, guidance, req.prompt, edit=spec))


def edit_misfit(req: EditRequest, info: Mapping, model_id: str) -> None:
    """A text model takes prompt (the target; required) and source_prompt; a class model class_label (the
    target; required) and source_class, both below its class count; attention replacement needs a text
    model. PlanError naming the field otherwise."""
    if info.get("conditioning", "class") == "text":
        for field in ("class_label", "source_class"):
            if getattr(req, field) is not None:
                raise PlanError(field, f"{model_id} is text-conditioned: give prompt and source_prompt, not {field}")
        if req.prompt is None:
            raise PlanError("prompt", f"required: {model_id} is text-conditioned (the prompt the image is edited to)")
        return
    for field in ("prompt", "source_prompt"):
        if getattr(req, field) is not None:
            raise PlanError(field, f"{model_id} is class-conditional: give class_label and source_class, not {field}")
    if req.class_label is None:
        raise PlanError("class_label", f"required: {model_id} is class-conditional (the class the image is edited "
                                       f"to, 0..{info['num_classes'] - 1})")
    for field in ("class_label", "source_class"):
        value = getattr(req, field)
        if value is not None and value >= info["num_classes"]:
            raise PlanError(field, f"must be < {info['num_classes']}")
    if req.attention_replace:
        raise PlanError("attention_replace", f"replaces cross-attention maps: it needs a text model; {model_id} is "
                                             "class-conditional")

"""HTTP request and response bodies. Every field is bounded here; bounds that depend on the loaded
model or the deployment (class count, conditioning, step and image limits) are checked by the
ingress. Both give 422 naming the field."""
from __future__ import annotations

import re
import unicodedata
from typing import Annotated, Any, Literal, Optional

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, PlainSerializer, PlainValidator, ValidationError,
                      WithJsonSchema)
from pydantic_core import InitErrorDetails, PydanticCustomError

from dtrain.diffusion.samplers import SAMPLERS
from dtrain.editing import SCHEMES
from dtrain.regions import MAX_OBJECTS, METHODS, RegionError, RegionSpec, validate_regions

Sampler = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]
RegionMethod = Literal[METHODS]  # type: ignore[valid-type]
MAX_PROMPT_CHARS = 300  # several captions' worth (a text model reads model.max_tokens tokens); keeps bodies small
MAX_CLASS_LABEL = 100_000


def printable(text: str) -> str:
    """Text of letters, marks, numbers, punctuation, symbols and spaces only. Control, format
    (zero-width, bidi overrides), surrogate, private-use and unassigned characters and line breaks are
    refused: they hide words from the input policy and mean nothing to a tokenizer. The message names
    the position and code point, never the text (it may not even be encodable)."""
    for i, ch in enumerate(text):
        kind = unicodedata.category(ch)
        if kind[0] == "C" or kind in ("Zl", "Zp"):
            raise ValueError(f"character {i} (U+{ord(ch):04X}) is not printable text")
    return text


Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS), AfterValidator(printable)]


def field_loc(path: str) -> tuple[str | int, ...]:
    """A field's path as a body location: "regions.objects[2].box" -> ("regions", "objects", 2, "box")."""
    return tuple(int(index) if index else name for name, index in _PATH.findall(path))


_PATH = re.compile(r"([A-Za-z_]\w*)|\[(\d+)\]")
# The field a RegionError names (its message starts with it): each part of the region syntax only where
# the name ends after it, so an unknown key ("objectsX", "boxes") is not read as a known one
_REGION_FIELD = re.compile(r"regions(?:\.background(?=[.:])|\.objects(?:\[\d+\])?(?=[.:]))?"
                           r"(?:\.(?:prompt|class_label|box)(?=:))?")
_UNKNOWN = ": unknown field (expected"


def region_error_loc(message: str) -> tuple[str | int, ...]:
    """The body location of the field a dtrain.regions RegionError names at the start of its message: the
    known part of the path, then an unknown key as given (as pydantic names a key it forbids)."""
    path = _REGION_FIELD.match(message)
    if path is None:
        return ("regions",)
    rest = message[path.end():]
    unknown = (rest[1:rest.rindex(_UNKNOWN)][:100],) if rest.startswith(".") and _UNKNOWN in rest else ()
    return field_loc(path.group()) + unknown


def _regions(data: Any) -> RegionSpec:
    """A request's `regions`: dtrain.regions.validate_regions (at most MAX_OBJECTS objects, boxes inside
    the image with positive area, one of prompt and class_label, no unknown key), then each prompt held
    to the bounds of `prompt` and each class label to those of `class_label`. An error names its field
    in its location and at the start of its message: regions.objects[2].box."""
    if isinstance(data, RegionSpec):
        spec = data
    else:
        try:
            spec = validate_regions(data)
        except RegionError as e:
            raise _located(region_error_loc(str(e)), str(e), data) from None
    for name, region in zip(region_names(spec), spec.regions):
        field = f"regions.{name}"
        if region.prompt is not None:
            problem = (f"at most {MAX_PROMPT_CHARS} characters" if len(region.prompt) > MAX_PROMPT_CHARS
                       else _unprintable(region.prompt))
            if problem:
                raise _located(field_loc(f"{field}.prompt"), f"{field}.prompt: {problem}", data)
        if region.class_label is not None and region.class_label > MAX_CLASS_LABEL:
            raise _located(field_loc(f"{field}.class_label"), f"{field}.class_label: at most {MAX_CLASS_LABEL}", data)
    return spec


def region_names(spec: RegionSpec) -> list[str]:
    """The regions' names in a field path, background first: background, objects[0], ..."""
    return ["background", *(f"objects[{i}]" for i in range(len(spec.objects)))]


def _unprintable(text: str) -> Optional[str]:
    try:
        printable(text)
    except ValueError as e:
        return str(e)
    return None


def _located(loc: tuple, msg: str, data: Any) -> ValidationError:
    """A validation error at `loc` (the field's own name first, which pydantic adds itself) with `msg`, cut
    short where it quotes a long input back (a box of a thousand numbers)."""
    msg = msg if len(msg) <= 400 else msg[:400] + "..."
    return ValidationError.from_exception_data("regions", [InitErrorDetails(
        type=PydanticCustomError("value_error", "{msg}", {"msg": msg}), loc=loc[1:], input=data)])


def region_data(spec: RegionSpec) -> dict:
    """A RegionSpec as the plain data a request gives, which the response and the C2PA record carry."""
    def one(r, boxed: bool) -> dict:
        cond = {"prompt": r.prompt} if r.prompt is not None else {"class_label": r.class_label}
        return {**cond, "box": list(r.box)} if boxed else cond
    return {"background": one(spec.background, False), "objects": [one(o, True) for o in spec.objects]}


_CONDITION = {"prompt": {"type": "string", "maxLength": MAX_PROMPT_CHARS},
              "class_label": {"type": "integer", "minimum": 0, "maximum": MAX_CLASS_LABEL}}
_REGIONS_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["background"],
    "description": f"Region control: a background condition for the whole image and up to {MAX_OBJECTS} objects, "
                   "each a condition in a box [x0, y0, x1, y1] of image fractions (x to the right, y down; "
                   "every coordinate in [0, 1], x0 < x1 and y0 < y1). A condition is a prompt (a text model; "
                   "the bounds of `prompt`) or a class_label (a class model), one of the two. Instead of "
                   "`prompt` and `class_label`.",
    "properties": {
        "background": {"type": "object", "additionalProperties": False, "properties": _CONDITION},
        "objects": {"type": "array", "maxItems": MAX_OBJECTS, "items": {
            "type": "object", "additionalProperties": False, "required": ["box"],
            "properties": {**_CONDITION, "box": {"type": "array", "minItems": 4, "maxItems": 4,
                                                 "items": {"type": "number", "minimum": 0, "maximum": 1}}}}}},
    "example": {"background": {"prompt": "a blue circle"},
                "objects": [{"prompt": "a red square", "box": [0.0, 0.0, 0.5, 0.5]},
                            {"prompt": "a green triangle", "box": [0.5, 0.5, 1.0, 1.0]}]}}
Regions = Annotated[RegionSpec, PlainValidator(_regions), PlainSerializer(region_data),
                    WithJsonSchema(_REGIONS_SCHEMA)]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, max_length=128, description="Registered model; default: the first")
    version: Optional[str] = Field(None, max_length=128,
                                   description="Version of that model; default: its default (or a canary share)")
    allow_fallback: bool = Field(False, description="Under load, accept the model's registered few-step fallback")
    class_label: Optional[int] = Field(None, ge=0, le=MAX_CLASS_LABEL,
                                       description="A class model's class to generate, 0..num_classes-1")
    prompt: Optional[Prompt] = Field(None, description=f"A text model's prompt: printable text, at most "
                                     f"{MAX_PROMPT_CHARS} characters; tokens past the model's max_tokens are "
                                     "not read; \"\": unconditional")
    negative_prompt: Optional[Prompt] = Field(None, description="A text model's negative prompt: what guidance "
                                              "steers away from (default: the empty prompt)")
    regions: Optional[Regions] = Field(None, description=f"Region control, instead of prompt or class_label: a "
                                       f"background and up to {MAX_OBJECTS} objects in boxes (GET /v1/models: "
                                       "which methods a version takes)")
    region_method: Optional[RegionMethod] = Field(None, description="How regions are composed: multidiffusion "
                                                  "(default; the net once per region, predictions blended with "
                                                  "feathered box masks) or attention (text models; one call, each "
                                                  "object's prompt seen only inside its box)")
    seed: int = Field(0, ge=0, lt=2**62, description="Image i uses seed + i: same seed, same image")
    num_images: int = Field(1, ge=1, le=1024, description="Images to generate (the deployment's max_images bounds it)")
    sampler: Optional[Sampler] = Field(None, description="ODE or consistency sampler; default: the checkpoint's")
    steps: Optional[int] = Field(None, ge=1, le=10_000, description="Sampler steps; default: the checkpoint's")
    guidance: Optional[float] = Field(None, ge=0.0, le=20.0, allow_inf_nan=False,
                                      description="Classifier-free guidance scale, 1 = off; default: the checkpoint's")


class GenerateResponse(BaseModel):
    model: str = Field(description="Registered model the images came from")
    version: str = Field(description="Version of that model that served the request")
    stage: str = Field(description="Training stage of the checkpoint: pretrain, reflow, distill")
    fallback: bool = Field(description="Whether the spike fallback served this request")
    class_label: Optional[int] = Field(None, description="A class model's class")
    prompt: Optional[str] = Field(None, description="A text model's prompt")
    negative_prompt: Optional[str] = Field(None, description="A text model's negative prompt, if given")
    regions: Optional[dict] = Field(None, description="The regions, if given (background, objects with boxes)")
    region_method: Optional[str] = Field(None, description="How the regions were composed, if given")
    sampler: str
    steps: int
    guidance: float
    nfe: int = Field(description="Network evaluations spent per image")
    seeds: list[int]
    watermark_key_id: Optional[str] = Field(description="Id of the key the images are watermarked with (None: off)")
    images: list[str] = Field(description="Base64-encoded PNG images")


MAX_IMAGE_CHARS = 8 << 20  # the schema's bound on an uploaded image's base64; the deployment's is ServeArgs.max_image_chars
Scheme = Literal[SCHEMES]  # type: ignore[valid-type]


class EditRequest(BaseModel):
    """POST /v1/edit: an image inverted along the model's ODE to t0 = 1 - strength, regenerated under the
    target (dtrain.editing.edit). Each bound is checked before any compute, 422 naming the field."""
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, max_length=128, description="Registered model; default: the first")
    version: Optional[str] = Field(None, max_length=128,
                                   description="Version of that model; default: its default (or a canary share)")
    image: str = Field(max_length=MAX_IMAGE_CHARS, description="The image to edit: a base64 PNG or JPEG of exactly "
                       "the model's size and channels (8-bit greyscale or RGB, no alpha; GET /v1/models: image_size, "
                       "channels), at most the deployment's max_image_chars characters")
    prompt: Optional[Prompt] = Field(None, description="A text model's target prompt: what the image should become")
    source_prompt: Optional[Prompt] = Field(None, description="A text model's prompt for what the image shows, "
                                            "under which it is inverted (default: the empty prompt)")
    class_label: Optional[int] = Field(None, ge=0, le=MAX_CLASS_LABEL, description="A class model's target class")
    source_class: Optional[int] = Field(None, ge=0, le=MAX_CLASS_LABEL,
                                        description="A class model's class of the image (default: the null class)")
    strength: float = Field(ge=0.0, le=1.0, allow_inf_nan=False, description="How far back the image is inverted: "
                            "0 returns it, 1 regenerates it from its inverted noise")
    steps: Optional[int] = Field(None, ge=1, le=10_000, description="DDIM steps for strength 1 (an edit runs "
                                 "round(strength steps) of them, at least 1); default: the checkpoint's")
    guidance: Optional[float] = Field(None, ge=0.0, le=20.0, allow_inf_nan=False,
                                      description="Classifier-free guidance of inversion and regeneration; default: "
                                                  "the checkpoint's")
    scheme: Scheme = Field("fixed_point", description="Inversion: fixed_point (each step refined until it inverts "
                           "the sampler's step: exact to about 0.01) or euler (plain reversal, 4x fewer calls)")
    mask: Optional[str] = Field(None, max_length=MAX_IMAGE_CHARS, description="A base64 greyscale PNG or JPEG of "
                                "the image's size: white may change, black is kept exactly, grey in between")
    attention_replace: bool = Field(False, description="Text models: the source prompt's cross-attention maps "
                                    "keep the layout while the target prompt changes the content (prompt-to-prompt)")


class EditResponse(BaseModel):
    model: str = Field(description="Registered model that edited the image")
    version: str = Field(description="Version of that model")
    stage: str = Field(description="Training stage of the checkpoint")
    prompt: Optional[str] = Field(None, description="A text model's target prompt")
    source_prompt: Optional[str] = Field(None, description="A text model's source prompt (\"\": the empty prompt)")
    class_label: Optional[int] = Field(None, description="A class model's target class")
    source_class: Optional[int] = Field(None, description="A class model's source class (None: the null class)")
    strength: float
    steps: int = Field(description="Steps for strength 1; the edit ran round(strength steps) of them (none at 0)")
    guidance: float
    scheme: str
    mask: bool = Field(description="Whether a mask kept part of the image")
    attention_replace: bool
    nfe: int = Field(description="Network evaluations spent, the inversion included")
    watermark_key_id: Optional[str] = Field(description="Id of the key the edit is watermarked with (None: off, or "
                                                        "strength 0, which returns the input's pixels)")
    image: str = Field(description="The edited image: a base64 PNG with a C2PA manifest that records the edit and "
                                   "names the image sent as its parent ingredient")


class JobCancel(BaseModel):
    seen_at_step: int = Field(description="Step at which the replica learnt of the cancellation")
    last_step: int = Field(description="Last step that still computed the job (seen_at_step + 1 at most)")


class JobState(BaseModel):
    job_id: str
    state: Literal["queued", "running", "done", "cancelled", "failed"]
    step: int = Field(description="Sampler steps done")
    steps: int
    created_at: float = Field(description="Unix time")
    finished_at: Optional[float] = None
    version: int = Field(description="Increases with every change: the id of its server-sent event")
    error: Optional[str] = None
    cancel: Optional[JobCancel] = None
    result: Optional[GenerateResponse] = Field(None, description="The images, once done (until the result expires)")


class DetectRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(max_length=4_000_000, description="Base64-encoded image file (PNG, JPEG, ...) of the model's size")
    model: Optional[str] = Field(None, max_length=128, description="Model whose ODE is inverted; default: the first")
    version: Optional[str] = Field(None, max_length=128, description="Version of that model; default: its default")
    steps: Optional[int] = Field(None, ge=1, le=10_000, description="Inversion steps; default: the version's sampler steps")


class DetectResponse(BaseModel):
    model: str
    version: str
    watermarked: bool = Field(description="p_value below 0.01")
    key_id: str = Field(description="The deployment's watermark key id")
    score: float = Field(description="Share of the noise's signs that match the key (0.5: chance)")
    p_value: float = Field(description="Chance of a score this high without the watermark (Bonferroni over classes)")
    matching_signs: int
    signs: int


class Health(BaseModel):
    status: str
    model: str
    device: str
    precision: str
    probe_ms: float = Field(description="Time of the one-step sample this health check ran")

"""HTTP request and response bodies. Every field is bounded here; bounds that depend on the loaded
model or the deployment (class count, conditioning, step and image limits) are checked by the
ingress. Both give 422 naming the field."""
from __future__ import annotations

import unicodedata
from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from dtrain.diffusion.samplers import SAMPLERS

Sampler = Literal[tuple(SAMPLERS)]  # type: ignore[valid-type]
MAX_PROMPT_CHARS = 300  # several captions' worth (a text model reads model.max_tokens tokens); keeps bodies small


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


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: Optional[str] = Field(None, max_length=128, description="Registered model; default: the first")
    version: Optional[str] = Field(None, max_length=128,
                                   description="Version of that model; default: its default (or a canary share)")
    allow_fallback: bool = Field(False, description="Under load, accept the model's registered few-step fallback")
    class_label: Optional[int] = Field(None, ge=0, le=100_000,
                                       description="A class model's class to generate, 0..num_classes-1")
    prompt: Optional[Prompt] = Field(None, description=f"A text model's prompt: printable text, at most "
                                     f"{MAX_PROMPT_CHARS} characters; tokens past the model's max_tokens are "
                                     "not read; \"\": unconditional")
    negative_prompt: Optional[Prompt] = Field(None, description="A text model's negative prompt: what guidance "
                                              "steers away from (default: the empty prompt)")
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
    sampler: str
    steps: int
    guidance: float
    nfe: int = Field(description="Network evaluations spent per image")
    seeds: list[int]
    watermark_key_id: Optional[str] = Field(description="Id of the key the images are watermarked with (None: off)")
    images: list[str] = Field(description="Base64-encoded PNG images")


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

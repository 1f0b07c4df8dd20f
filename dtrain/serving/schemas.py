"""HTTP request and response bodies. Static bounds live here; bounds that depend on the loaded
model (class count, step limit) are checked by the ingress, and both give 422 with a message."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    class_label: int = Field(ge=0, description="Class to generate, 0..num_classes-1")
    seed: int = Field(0, ge=0, lt=2**63, description="Image i uses seed + i: same seed, same image")
    steps: int = Field(16, ge=1, description="Euler steps (network evaluations, x2 with guidance)")
    num_images: int = Field(1, ge=1)
    guidance: float = Field(2.0, ge=0.0, le=20.0, description="Classifier-free guidance scale; 1 = off")


class GenerateResponse(BaseModel):
    model: str = Field(description="Checkpoint the images came from")
    class_label: int
    steps: int
    seeds: list[int]
    images: list[str] = Field(description="Base64-encoded PNG images")


class Health(BaseModel):
    status: str
    model: str

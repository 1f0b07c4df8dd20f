"""The one serving config: the typed arguments of the app builder, given by `args:` in serve/*.yaml
or by `dtrain serve` flags. Nothing here is read from the training config; what belongs to a model
(its classes, default sampler, steps and guidance) comes from its checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


class Autoscaling(_Strict):
    """Sampler replicas follow queue depth (requests queued or running per replica). Serve's defaults
    wait 30 s before scaling up; these react within seconds of a spike."""
    min_replicas: int = Field(1, ge=0, description="0 scales to zero when idle (the first request waits for a replica)")
    max_replicas: int = Field(4, ge=1)
    initial_replicas: Optional[int] = Field(None, ge=0, description="replicas at deploy: a warm pool above min")
    target_ongoing_requests: float = Field(8.0, gt=0, description="requests per replica the autoscaler aims at")
    upscale_delay_s: float = Field(0.5, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    metrics_interval_s: float = Field(0.5, gt=0)
    look_back_period_s: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self

    def serve_config(self) -> dict:
        return self.model_dump(exclude_none=True)


class ServeArgs(_Strict):
    """Arguments of `dtrain.serving.app:build_app`."""
    checkpoint: str = Field(description="checkpoint directory, run directory (its newest checkpoint) or exported file")
    num_replicas: Optional[int] = Field(None, ge=1, description="a fixed replica count instead of autoscaling")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved per sampler replica (its torch threads)")
    replica_gpus: Optional[float] = Field(None, ge=0, description="GPUs per replica; default 1 where the cluster has GPUs")
    max_batch_images: int = Field(16, ge=1, description="dynamic batching: images per model call")
    batch_wait_timeout_s: float = Field(0.01, ge=0, description="how long a batch waits to fill")
    max_queued_requests: int = Field(64, ge=1, description="requests waiting for a sampler beyond which 503 is answered")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of an overload answer")
    request_timeout_s: float = Field(60.0, gt=0, description="a request still unanswered after this gets 503")
    max_steps: int = Field(100, ge=1, description="largest steps a request may ask for")
    max_images: int = Field(16, ge=1, description="largest num_images a request may ask for")
    auth_tokens_file: Optional[str] = Field(None, description="file of bearer tokens, one per line; auth off if no tokens")
    auth_tokens_env: str = Field("DTRAIN_SERVE_TOKENS", description="environment variable of comma-separated tokens")

    @model_validator(mode="after")
    def _fits(self) -> "ServeArgs":
        if self.max_images > self.max_batch_images:
            raise ValueError(f"max_images {self.max_images} > max_batch_images {self.max_batch_images}: "
                             "a request must fit in one batch")
        return self

    def resolved(self) -> "ServeArgs":
        """Paths made absolute where the builder runs (`serve run` from the repository), so replicas,
        whose working directory is Ray's, read the same files."""
        ckpt = Path(self.checkpoint).expanduser()
        if not ckpt.exists():
            raise FileNotFoundError(f"checkpoint {self.checkpoint} not found (relative to {Path.cwd()}): give a path "
                                    "that exists where the app is built, an absolute one for `serve deploy`")
        tokens = self.auth_tokens_file and str(Path(self.auth_tokens_file).expanduser().resolve())
        return self.model_copy(update={"checkpoint": str(ckpt.resolve()), "auth_tokens_file": tokens})

"""The one serving config: the typed arguments of the app builder, given by `args:` in serve/*.yaml
or by `dtrain serve` flags. Nothing here is read from the training config; what belongs to a model
(its classes, default sampler, steps and guidance) comes from its checkpoint."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dtrain import storage
from dtrain.checkpoint import checkpoint_uri, resolve
from dtrain.serving.autoscaling import serve_policy
from dtrain.serving.policy import compile_rules
from dtrain.serving.schemas import MAX_IMAGE_CHARS
from dtrain.serving.store import StoreSpec, check_url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


class Autoscaling(_Strict):
    """Sampler replicas follow dtrain's own signal by default: the images queued and in flight per replica
    (dtrain.serving.autoscaling, Serve's custom policy API), or Serve's default policy on requests
    (`policy: requests`). Serve's defaults wait 30 s before scaling up; these react within seconds of a
    spike."""
    min_replicas: int = Field(1, ge=0, description="0 scales to zero when idle (the first request waits for a replica)")
    max_replicas: int = Field(4, ge=1)
    initial_replicas: Optional[int] = Field(None, ge=0, description="replicas at deploy: a warm pool above min")
    policy: Literal["images", "requests"] = Field(
        "images", description="images: images queued and in flight per replica (target_images_per_replica); "
                              "requests: Serve's default, ongoing requests per replica (target_ongoing_requests)")
    target_images_per_replica: Optional[float] = Field(
        None, gt=0, description="policy images: images per replica the autoscaler aims at; default max_batch_images "
                                "(one batch computing, the next filling)")
    target_ongoing_requests: float = Field(8.0, gt=0, description="policy requests: requests per replica the "
                                                                  "autoscaler aims at")
    upscale_delay_s: float = Field(0.25, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    downscale_to_zero_delay_s: Optional[float] = Field(None, ge=0, description="from 1 replica to 0 (with "
                                                                               "min_replicas 0); default downscale_delay_s")
    metrics_interval_s: float = Field(0.25, gt=0)
    look_back_period_s: float = Field(1.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "Autoscaling":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas {self.initial_replicas} is not within min_replicas "
                             f"{self.min_replicas} and max_replicas {self.max_replicas}")
        return self

    def serve_config(self, max_batch_images: int = 16) -> dict:
        """Serve's AutoscalingConfig, as a dict: with policy images, dtrain's ImagesPolicy at
        target_images_per_replica (default `max_batch_images`)."""
        config = self.model_dump(exclude_none=True, exclude={"policy", "target_images_per_replica"})
        if self.policy == "images":
            config["policy"] = serve_policy(self.target_images_per_replica or float(max_batch_images))
        return config


class Canary(_Strict):
    """A share of the requests that name no version goes to this one."""
    version: str
    weight: float = Field(gt=0, lt=1)


class Fallback(_Strict):
    """Under load, requests that allow it (`allow_fallback`) are answered by this version, usually a
    distilled student, at `steps` steps: when the ingress holds more than `when_in_flight_over`
    requests, the new one included (0: always)."""
    version: str
    steps: int = Field(ge=1)
    when_in_flight_over: int = Field(ge=0)


class TenantPolicy(_Strict):
    """What one tenant (named by its bearer token) may use."""
    tier: Literal["high", "standard", "low"] = Field("standard", description="waiting requests are admitted "
                                                                            "to the samplers high tier first")
    images_per_minute: Optional[int] = Field(None, ge=1, description="quota over a moving minute; beyond it 429 "
                                                                     "with Retry-After (None: no quota)")


class ModelSpec(_Strict):
    """One model of the registry: its versions (version -> checkpoint), the default, and optionally a
    canary split and a fallback for spikes."""
    versions: dict[str, str] = Field(min_length=1)
    default: Optional[str] = Field(None, description="version for requests that name none; default: the last listed")
    canary: Optional[Canary] = None
    fallback: Optional[Fallback] = None

    @model_validator(mode="after")
    def _known_versions(self) -> "ModelSpec":
        if self.default is None:
            self.default = list(self.versions)[-1]
        for role, v in (("default", self.default), ("canary", self.canary and self.canary.version),
                        ("fallback", self.fallback and self.fallback.version)):
            if v is not None and v not in self.versions:
                raise ValueError(f"{role} version {v!r} is not one of the versions {sorted(self.versions)}")
        return self


class ServeArgs(_Strict):
    """Arguments of `dtrain.serving.app:build_app`: one `checkpoint`, or a registry of `models`."""
    checkpoint: Optional[str] = Field(None, description="checkpoint directory, run directory (its newest "
                                                        "checkpoint) or exported file: served as one model")
    models: Optional[dict[str, ModelSpec]] = Field(None, description="model name -> versions, default, canary")
    num_replicas: Optional[int] = Field(None, ge=1, description="a fixed replica count instead of autoscaling")
    ingress_replicas: int = Field(1, ge=1, description="replicas of the HTTP ingress; they share the jobs, quotas "
                                                      "and response cache through state_store")
    autoscaling: Autoscaling = Field(default_factory=Autoscaling)
    replica_cpus: float = Field(1.0, gt=0, description="CPUs reserved per sampler replica (its torch threads)")
    replica_gpus: Optional[float] = Field(None, ge=0, description="GPUs per replica; default 1 where the cluster has GPUs")
    max_batch_images: int = Field(16, ge=1, description="dynamic batching: images per model call")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="how long a batch waits to fill (added at low load)")
    max_queued_requests: int = Field(64, ge=1, description="requests waiting for a sampler beyond which 503 is answered")
    retry_after_s: int = Field(1, ge=0, description="Retry-After of an overload answer")
    request_timeout_s: float = Field(60.0, gt=0, description="a request still unanswered after this gets 503")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="replicas' precision; auto: the fastest this device runs (bf16 with AMX or on GPU)")
    max_steps: int = Field(100, ge=1, description="largest steps a request may ask for")
    max_images: int = Field(16, ge=1, description="largest num_images a request may ask for")
    watermark: bool = Field(True, description="embed the deployment's invisible watermark in every served image "
                                              "(Gaussian Shading in the initial noise; POST /v1/detect finds it)")
    watermark_key_file: Optional[str] = Field(None, description="the watermark key, 64 hex digits; default "
                                                                "~/.config/dtrain/watermark.key, created on first use")
    watermark_edits: bool = Field(True, description="with watermark on: shade the key into an edit's inverted noise "
                                                    "before it is regenerated (POST /v1/edit). Marks the edit (found by "
                                                    "/v1/detect at high strengths) but keeps less of the image: "
                                                    "docs/serving.md, Editing")
    max_image_chars: int = Field(1 << 20, ge=1, le=MAX_IMAGE_CHARS,
                                 description="largest image (and mask) POST /v1/edit takes, in characters of base64 "
                                             "(1 MiB: a file of 768 KiB); a longer one is a 422 naming the field")
    provenance: bool = Field(True, description="sign every served PNG with a C2PA manifest (model, version, stage, "
                                               "lineage, sampler, steps, seed, class or prompt and negative "
                                               "prompt or regions, watermark key id)")
    provenance_cert_chain: Optional[str] = Field(None, description="PEM certificate chain, signer first; default: "
                                                                   "test credentials made in ~/.config/dtrain/c2pa-test")
    provenance_key: Optional[str] = Field(None, description="the signer's unencrypted PEM private key")
    deny_classes: dict[str, list[int]] = Field(
        default_factory=dict, description="input policy: model name ('*': every model) -> class labels refused "
                                          "with 400 before any compute")
    deny_words: list[str] = Field(default_factory=list, description="input policy: words (or phrases) refused in "
                                                                    "a text model's prompt, negative_prompt or a "
                                                                    "region's prompt, whole words, any case, "
                                                                    "with 400")
    deny_patterns: list[str] = Field(default_factory=list, description="input policy: Python regular expressions "
                                                                       "refused where they match a prompt (searched, "
                                                                       "case-insensitive), with 400")
    cache_entries: int = Field(0, ge=0, description="response cache entries, in state_store and shared by every "
                                                    "ingress replica (0: off): the same request to the same version "
                                                    "returns the same bytes without compute")
    cache_ttl_s: float = Field(600.0, gt=0, description="how long a cached response is served")
    tenants: dict[str, TenantPolicy] = Field(default_factory=dict, description="tenant (`TOKEN TENANT` in the "
                                                                              "tokens file) -> tier and quota")
    default_tenant: TenantPolicy = Field(default_factory=TenantPolicy, description="the policy of every other "
                                                                                   "caller (all of them without auth)")
    admit_images: Optional[int] = Field(None, ge=1, description="images an ingress sends to the samplers at once; "
                                                                "the rest wait by tier. Default: what the samplers "
                                                                "hold at max replicas")
    job_ttl_s: float = Field(600.0, gt=0, description="how long a finished job's state and images stay retrievable")
    max_jobs: int = Field(1000, ge=1, description="jobs kept (running and finished) beyond which a new one gets 503")
    job_timeout_s: float = Field(600.0, gt=0, description="a job still running after this fails")
    job_heartbeat_timeout_s: float = Field(10.0, gt=0, description="a queued or running job not heard of for this long "
                                                                  "(its ingress beats 4 times per timeout, its sampler "
                                                                  "every 50 ms) is failed, naming the lost heartbeat, "
                                                                  "by the next reader or cleanup")
    state_store: str = Field("sqlite://", description="where jobs, quotas and the response cache live (dtrain.serving."
                                                      "store). sqlite:// (default): an SQLite file in the Ray session "
                                                      "directory, named for the app: survives any replica's death, not "
                                                      "a new cluster; sqlite:///ABSOLUTE/PATH: survives a cluster "
                                                      "restart too. SQLite is one machine's: a multi-node cluster "
                                                      "needs redis://HOST:PORT/DB, shared by every node")
    auth_tokens_file: Optional[str] = Field(None, description="file of bearer tokens, one per line; auth off if no tokens")
    auth_tokens_env: str = Field("DTRAIN_SERVE_TOKENS", description="environment variable of comma-separated tokens")

    @field_validator("state_store")
    @classmethod
    def _store_url(cls, url: str) -> str:
        return check_url(url)

    @model_validator(mode="after")
    def _fits(self) -> "ServeArgs":
        if (self.checkpoint is None) == (self.models is None):
            raise ValueError("give either checkpoint (one model) or models (a registry), not both or neither")
        if (self.provenance_cert_chain is None) != (self.provenance_key is None):
            raise ValueError("give both provenance_cert_chain and provenance_key, or neither (test credentials)")
        compile_rules(self.deny_words, self.deny_patterns)  # a bad rule fails at deploy, naming it
        if self.max_images > self.max_batch_images:
            raise ValueError(f"max_images {self.max_images} > max_batch_images {self.max_batch_images}: "
                             "a request must fit in one batch")
        return self

    def store_spec(self) -> StoreSpec:
        return StoreSpec(self.state_store, self.job_ttl_s, self.job_heartbeat_timeout_s)

    def images_held(self) -> int:
        """Images the samplers hold at max replicas: on each, one batch running and the next filling."""
        return (self.num_replicas or self.autoscaling.max_replicas) * 2 * self.max_batch_images

    def resolved(self) -> "ServeArgs":
        """Paths made absolute where the builder runs (`serve run` from the repository), so replicas,
        whose working directory is Ray's, read the same files; a single checkpoint becomes a registry
        of one model (its run's name) with one version (the checkpoint's name)."""
        models = self.models or {}
        if self.checkpoint is not None:
            ckpt = _pinned(self.checkpoint)
            run, version = ckpt.rstrip("/").rsplit("/", 2)[-2:]
            name = run if not version.endswith(".safetensors") else version.removesuffix(".safetensors")
            models = {name: ModelSpec(versions={version: ckpt})}
        models = {name: spec.model_copy(update={"versions": {v: _pinned(p) for v, p in spec.versions.items()}})
                  for name, spec in models.items()}
        absolute = lambda f: f and str(Path(f).expanduser().resolve())  # noqa: E731
        return self.model_copy(update={"checkpoint": None, "models": models,
                                       "auth_tokens_file": absolute(self.auth_tokens_file),
                                       "watermark_key_file": absolute(self.watermark_key_file),
                                       "provenance_cert_chain": absolute(self.provenance_cert_chain),
                                       "provenance_key": absolute(self.provenance_key)})


def _pinned(path: str) -> str:
    """A version's checkpoint as the replicas will load it: an absolute local path of the newest complete
    checkpoint, or the URI of the newest registered one (each replica fetches it)."""
    return checkpoint_uri(path) if storage.is_uri(path) else str(resolve(_existing(path)))


def _existing(path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"checkpoint {path} not found (relative to {Path.cwd()}): give a path that "
                                "exists where the app is built, an absolute one for `serve deploy`")
    return p.resolve()

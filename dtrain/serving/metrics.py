"""Prometheus metrics of the serving app, through Ray Serve's metrics API: they are exported beside Serve's
own (ray_serve_*) on every node's metrics port, names prefixed `ray_dtrain_serve_`. Recorded in a replica,
each carries Serve's `application`, `deployment` and `replica` labels besides its own (`model`, ...), so one
app's or one replica's figures can be told apart; made outside one (a test's stand-in), it has only its own."""
from __future__ import annotations

from ray.serve.metrics import Counter, Gauge, Histogram

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60]
_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class SamplerMetrics:
    """Per sampler replica: work done and how it was batched. Each model call (one network run over a
    batch's rows, dtrain.serving.sampler.call_groups) is observed once in `batch_images` (its images) and
    in `batch_requests` (the requests that shared it): `_count` of either is the number of model calls, and
    a `batch_requests` observation above 1 is requests answered by one call."""
    def __init__(self, model: str):
        tags = ("model",)
        self.images = Counter("dtrain_serve_images", "Images generated", tag_keys=tags)
        self.nfe = Counter("dtrain_serve_nfe", "Network evaluations spent (per image, summed)", tag_keys=tags)
        self.batch_images = Histogram("dtrain_serve_batch_images", "Images per model call",
                                      boundaries=_SIZES, tag_keys=tags)
        self.batch_requests = Histogram("dtrain_serve_batch_requests", "Requests sharing a model call",
                                        boundaries=_SIZES, tag_keys=tags)
        self.queue_depth = Gauge("dtrain_serve_queue_depth", "Requests in this replica waiting for a batch",
                                 tag_keys=tags)
        self.stage_seconds = Histogram("dtrain_serve_stage_seconds", "Seconds per stage of a request",
                                       boundaries=_LATENCY_S, tag_keys=("model", "stage"))
        for m in (self.images, self.nfe, self.batch_images, self.batch_requests, self.queue_depth,
                  self.stage_seconds):
            m.set_default_tags({"model": model})


class IngressMetrics:
    """Per ingress replica: answers refused and end-to-end latency."""
    def __init__(self, model: str):
        self.refusals = Counter("dtrain_serve_refusals", "Requests refused, by reason",
                                tag_keys=("model", "reason"))
        self.stage_seconds = Histogram("dtrain_serve_stage_seconds", "Seconds per stage of a request",
                                       boundaries=_LATENCY_S, tag_keys=("model", "stage"))
        self.cache = Counter("dtrain_serve_cache", "Response cache lookups, by result (hit, miss)",
                             tag_keys=("model", "result"))
        for m in (self.refusals, self.stage_seconds, self.cache):
            m.set_default_tags({"model": model})

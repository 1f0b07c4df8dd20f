"""The peer `dtrain bench serve` measures dtrain's request path against: the smallest Ray Serve app that
serves the same checkpoint the same way, and nothing else. A FastAPI ingress deployment takes the body of
`/v1/generate` (class_label, steps, num_images, seed), a sampler deployment batches single requests with
`@serve.batch` into one `render` call and answers base64 PNGs. No versions, auth, quotas, policy, tiers,
jobs, state store, watermark, signing, cache or metrics: what a user would write in an afternoon.
"""
# No `from __future__ import annotations`: FastAPI must see the real request type.

import base64
import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray import serve

from dtrain.images import png_bytes, to_uint8

api = FastAPI(title="peer")


class PeerRequest(BaseModel):
    class_label: int = Field(0, ge=0)
    steps: int = Field(4, ge=1, le=1000)
    num_images: int = Field(1, ge=1, le=64)
    seed: int = Field(0, ge=0)


class PeerSamplerReplica:
    """Single requests batched by `@serve.batch` (up to `max_batch_images`, 5 ms to fill): one `render`
    call per steps value in the batch, its rows scattered back in order."""

    def __init__(self, checkpoint: str, max_batch_images: int = 16):
        from dtrain.checkpoint import load_model, read_meta
        from dtrain.runtime import pin_threads

        pin_threads()  # the replica's num_cpus, as dtrain's sampler does: the same threads for the same work
        self.net, self.cfg = load_model(checkpoint)
        self.meta = read_meta(checkpoint)
        self.batch.set_max_batch_size(max_batch_images)

    async def __call__(self, job: tuple[int, int, int, int]) -> list[bytes]:
        return await self.batch(job)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def batch(self, jobs: list[tuple[int, int, int, int]]) -> list[list[bytes]]:
        from dtrain.generation import render

        out: list[list[bytes]] = [[] for _ in jobs]
        s = self.cfg.sample
        for steps in sorted({j[1] for j in jobs}):
            rows = [i for i, j in enumerate(jobs) if j[1] == steps]
            labels = torch.tensor([jobs[i][0] for i in rows for _ in range(jobs[i][2])])
            seeds = [jobs[i][3] + k for i in rows for k in range(jobs[i][2])]
            pixels = to_uint8(render(self.net, self.cfg, self.meta, labels, seeds, steps, s.guidance, "fp32", s.sampler))
            at = 0
            for i in rows:
                out[i] = [png_bytes(p) for p in pixels[at:at + jobs[i][2]]]
                at += jobs[i][2]
        return out


PeerSampler = serve.deployment(PeerSamplerReplica, name="PeerSampler", max_ongoing_requests=32)


@serve.deployment(max_ongoing_requests=256)
@serve.ingress(api)
class PeerIngress:
    def __init__(self, sampler):
        self.sampler = sampler

    @api.post("/v1/generate")
    async def generate(self, req: PeerRequest) -> dict:
        pngs = await self.sampler.remote((req.class_label, req.steps, req.num_images, req.seed))
        return {"images": [base64.b64encode(p).decode() for p in pngs]}


def peer_app(checkpoint: str, replica_cpus: float = 1.0, max_batch_images: int = 16):
    """The peer bound to `checkpoint`: one sampler replica with `replica_cpus`, batches of up to
    `max_batch_images` requests (as dtrain's fixed replica)."""
    sampler = PeerSampler.options(num_replicas=1, ray_actor_options={"num_cpus": replica_cpus})
    return PeerIngress.bind(sampler.bind(checkpoint, max_batch_images))

"""The baseline a user would write instead of fluxray: one Serve deployment around diffusers' FluxPipeline.

It follows the pattern of Ray Serve's Stable Diffusion example: the whole pipeline in one replica,
requests batched with `@serve.batch(max_batch_size=8)` (Serve's default wait), the pipeline called
directly in the batch handler, behind a FastAPI route that takes the JSON of fluxray's
`POST /v1/images/generations` (prompt, size, seed, num_inference_steps, n=1) and answers b64 PNGs.
The pipeline is built over the tiny model's own modules (`Pipeline.load(...).to_diffusers()`), so it
makes the same images as fluxray from the same seeds. benchmarks/serve_load.py deploys it with

    import_path: benchmarks.naive_app:build_app     (args: {model, threads})
"""

import base64
import io
import time

import torch
from fastapi import FastAPI
from pydantic import BaseModel, Field
from ray import serve

from fluxray.params import parse_size
from fluxray.pipeline import Pipeline

api = FastAPI()


class ImageRequest(BaseModel):
    prompt: str
    size: str = "256x256"
    seed: int = 0
    num_inference_steps: int = 28
    guidance_scale: float = 3.5
    n: int = Field(default=1, ge=1, le=1)


def generate(pipe, requests: list[ImageRequest], max_sequence_length: int) -> list[bytes]:
    """One PNG per request; one pipeline call per group of requests that share size, steps and guidance.
    max_sequence_length is the model's T5 length (its spec's; diffusers' default 512 fits FLUX.1-dev only)."""
    groups: dict[tuple[str, int, float], list[int]] = {}
    for i, r in enumerate(requests):
        groups.setdefault((r.size, r.num_inference_steps, r.guidance_scale), []).append(i)
    out: list[bytes] = [b""] * len(requests)
    for (size, steps, guidance), rows in groups.items():
        width, height = parse_size(size)
        images = pipe(
            prompt=[requests[i].prompt for i in rows],
            width=width,
            height=height,
            num_inference_steps=steps,
            guidance_scale=guidance,
            max_sequence_length=max_sequence_length,
            generator=[torch.Generator("cpu").manual_seed(requests[i].seed) for i in rows],
        ).images
        for i, image in zip(rows, images, strict=True):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out[i] = buffer.getvalue()
    return out


@serve.deployment(name="NaiveFlux", max_ongoing_requests=32)
@serve.ingress(api)
class NaiveFlux:
    def __init__(self, model: str = "tiny", threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        pipeline = Pipeline.load(model, device="cpu")
        self.pipe, self.max_sequence_length = pipeline.to_diffusers(), pipeline.source.spec.max_sequence_length

    @serve.batch(max_batch_size=8)
    async def generate_batch(self, requests: list[ImageRequest]) -> list[bytes]:
        return generate(self.pipe, requests, self.max_sequence_length)

    @api.post("/v1/images/generations")
    async def generations(self, body: ImageRequest) -> dict:
        png = await self.generate_batch(body)
        return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(png).decode(), "seed": body.seed}]}

    @api.get("/healthz")
    def healthz(self) -> dict:
        return {"status": "ok", "torch_threads": torch.get_num_threads()}


def build_app(args: dict):
    return NaiveFlux.bind(args.get("model", "tiny"), args.get("threads"))

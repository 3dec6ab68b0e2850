"""Each stage replica runs its model once, at the size it will serve first, before it reports ready.

A replica's first call pays for what no later call does: PyTorch's first pass over each op (kernel
selection, the CPU allocator growing, oneDNN's primitive cache, CUDA's context and cuBLAS handles, a
torch.compile'd graph), and the VAE's and Denoiser's first allocations at that size. Paid in `__init__`,
Serve counts it as start-up: the replica turns ready (and the app healthy) only once it is warm, and the
first user request runs as fast as the next one. Nothing here passes through the replica's caches,
scheduler or metrics, so none of them count a warm-up.

The ingress then makes the graph's first call itself (deployments.http.ingress), warming what is not a model:
its handles to the stages, Serve's routers, the batching queues.
"""

from __future__ import annotations

import asyncio
import logging
import time

import torch

from fluxray.editing import EditParams, EncodedEdit, edit_task
from fluxray.embeds import PromptEmbeds
from fluxray.models.specs import ModelSpec
from fluxray.params import GenerationParams, parse_size
from fluxray.sampling import denoise_step, denoise_task, image_ids, initial_noise, text_ids

logger = logging.getLogger("ray.serve")
PROMPT = "warm-up"


def timed(stage: str, warm) -> float:
    """Runs a stage's warm-up (the engine calls it makes run in inference mode themselves); its seconds,
    logged."""
    started = time.monotonic()
    warm()
    seconds = time.monotonic() - started
    logger.info("%s warmed up in %.2f s", stage, seconds)
    return seconds


def zero_embeds(transformer, spec: ModelSpec) -> PromptEmbeds:
    """Prompt embeddings of the shape the TextEncoder sends (one row), zeros."""
    config = transformer.config
    return PromptEmbeds(
        torch.zeros(1, config.pooled_projection_dim),
        torch.zeros(1, spec.max_sequence_length, config.joint_attention_dim),
    )


def warm_denoiser(transformer, spec: ModelSpec, height: int, width: int, device, dtype) -> None:
    """One transformer step at (height, width), as the model serves it: a generation for a base model,
    a Fill edit (masked input beside the noise) or a Kontext edit (reference tokens after the image's,
    the reference at the image's size) for the edit models."""
    embeds = zero_embeds(transformer, spec)
    h, w = height // spec.vae_scale_factor, width // spec.vae_scale_factor
    fields = {"prompt": PROMPT, "height": height, "width": width, "num_inference_steps": 1, "seed": 0}
    if spec.edit in ("fill", "kontext"):
        params = EditParams(**fields, strength=None if spec.edit == "kontext" else 1.0).resolve(spec)
        moments = torch.zeros(1, 32, h, w)
        mask = torch.ones(1, 1, height, width) if spec.edit == "fill" else None
        masked = moments if spec.edit == "fill" else None
        task = edit_task(params, embeds, None, EncodedEdit(spec.edit, moments, mask, masked), spec, device, dtype)
    else:
        params = GenerationParams(**fields).resolve(spec)
        task = denoise_task(params, embeds, None, spec, device, dtype)
    img = image_ids(height, width, device, dtype)
    denoise_step(transformer, [task], img, text_ids(spec.max_sequence_length, device, dtype))


def warm_text_encoder(encoder) -> None:
    encoder.encode([PROMPT], [None])


def warm_vae_decoder(decoder, spec: ModelSpec, height: int, width: int) -> None:
    decoder.decode(initial_noise(0, height, width, torch.float32, spec.vae_scale_factor), height, width)


def warm_vae_encoder(encoder, height: int, width: int) -> None:
    encoder.moments(torch.zeros(1, 3, height, width))


async def warm_graph(runner, graph, specs: dict[str, ModelSpec], default_size: str, timeout_s: float) -> float:
    """The graph's first call, from the ingress before it reports ready: one image of the default size,
    one step, through every stage of each served model (a generation for a base model, and an img2img
    edit on the default one, so the VAEEncoder's handle is warm too; an edit for Fill and Kontext).
    Through the runner and the graph the routes use (GraphRunner, deployments.http.graph), not its metrics.
    A warm-up that fails or runs past timeout_s is logged, and the replica starts anyway: the first
    request then pays what is left, and a stage that is broken answers it with its own error."""
    from PIL import Image

    from fluxray.editing import edit_method, prepare_edit

    width, height = parse_size(default_size)
    fields = {"prompt": PROMPT, "width": width, "height": height, "num_inference_steps": 1, "seed": 0}
    calls = []
    for index, (model, spec) in enumerate(specs.items()):
        if spec.edit not in ("fill", "kontext"):
            calls.append((model, GenerationParams(**fields).resolve(spec), None))
        if (spec.edit in ("fill", "kontext") or index == 0) and graph.vae_encoder is not None:
            mask = Image.new("L", (width, height), 255) if spec.edit == "fill" else None
            method = edit_method(spec, mask is not None, None)
            inputs = prepare_edit(spec, method, Image.new("RGB", (width, height), "white"), mask, width, height)
            calls.append((model, EditParams(**fields).resolve(spec), inputs))
    started = time.monotonic()
    try:
        for model, params, inputs in calls:
            await asyncio.wait_for(runner.run(graph.launch(params, model, inputs)), timeout_s)
    except Exception as error:  # noqa: BLE001 - a warm-up never keeps the replica from starting
        logger.warning("the graph's warm-up call failed (%s: %s); starting cold", type(error).__name__, error)
    seconds = time.monotonic() - started
    logger.info("graph warmed up in %.2f s (%d calls)", seconds, len(calls))
    return seconds

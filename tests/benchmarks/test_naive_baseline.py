"""benchmarks/naive_app.py, the baseline serve_load.py compares fluxray with, does the same work as fluxray:
from the same seed and prompt it makes the same image (diffusers' FluxPipeline over the same modules),
batched or alone, so the benchmark's ratios compare serving, not different images."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from benchmarks.naive_app import ImageRequest, generate
from fluxray.params import GenerationParams


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_the_naive_baseline_makes_fluxrays_images_batched_or_alone(tiny_pipeline):
    pipe, length = tiny_pipeline.to_diffusers(), tiny_pipeline.source.spec.max_sequence_length
    requests = [
        ImageRequest(prompt="a lighthouse at dusk", seed=11, num_inference_steps=4),
        ImageRequest(prompt="an owl in the rain", seed=12, num_inference_steps=4, size="128x128"),
        ImageRequest(prompt="a bowl of fruit", seed=13, num_inference_steps=4),
    ]
    batched = generate(pipe, requests, length)
    assert [pixels(p).shape for p in batched] == [(256, 256, 3), (128, 128, 3), (256, 256, 3)]
    alone = generate(pipe, requests[2:], length)[0]
    assert np.abs(pixels(batched[2]) - pixels(alone)).max() <= 1
    ours = tiny_pipeline.generate(
        GenerationParams(prompt="a bowl of fruit", seed=13, num_inference_steps=4, width=256, height=256)
    )[0]
    assert np.abs(pixels(batched[2]) - np.asarray(ours.pixels).astype(int)).max() <= 2

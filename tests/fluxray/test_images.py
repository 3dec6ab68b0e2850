"""Image files: PNG metadata, determinism, JPEG and WebP."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from fluxray.images import encode_image, read_metadata
from fluxray.params import GenerationParams

PARAMS = dict(prompt="a lighthouse at dusk", width=96, height=64, num_inference_steps=3, seed=77)


def test_png_carries_every_parameter(tiny_pipeline):
    image = tiny_pipeline.generate(GenerationParams(**PARAMS, negative_prompt="fog", true_cfg_scale=2.0))[0]
    data = image.encode()
    assert data.startswith(b"\x89PNG")
    meta = read_metadata(data)
    assert meta["prompt"] == "a lighthouse at dusk" and meta["negative_prompt"] == "fog"
    assert (meta["seed"], meta["width"], meta["height"], meta["num_inference_steps"]) == (77, 96, 64, 3)
    assert (meta["guidance_scale"], meta["true_cfg_scale"], meta["model"]) == (3.5, 2.0, "tiny")
    png = Image.open(io.BytesIO(data))
    assert png.text["seed"] == "77" and png.text["prompt"] == "a lighthouse at dusk"
    assert np.array_equal(np.asarray(png.convert("RGB")), image.pixels)


def test_same_seed_gives_identical_png_bytes(tiny_pipeline):
    first = tiny_pipeline.generate(GenerationParams(**PARAMS))[0].encode()
    second = tiny_pipeline.generate(GenerationParams(**PARAMS))[0].encode()
    other = tiny_pipeline.generate(GenerationParams(**{**PARAMS, "seed": 78}))[0].encode()
    assert first == second
    assert first != other


@pytest.mark.parametrize("fmt,magic", [("jpeg", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_jpeg_and_webp(tiny_pipeline, fmt, magic):
    image = tiny_pipeline.generate(GenerationParams(**PARAMS, output_format=fmt))[0]
    data = image.encode()
    assert data.startswith(magic)
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
    assert decoded.shape == (64, 96, 3)
    assert np.abs(decoded - image.pixels.astype(int)).mean() < 12  # lossy, but the same picture
    if fmt == "jpeg":
        assert read_metadata(data)["seed"] == 77


def test_unknown_format_is_an_error():
    with pytest.raises(ValueError, match="output_format"):
        encode_image(np.zeros((16, 16, 3), np.uint8), "gif")

"""Comparisons of images shared by the tests: pixel distance and diffusers' own image."""

from __future__ import annotations

import numpy as np
import torch

from fluxray.models.specs import get_spec


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def diffusers_image(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    """diffusers' image for the tiny model (its T5 length, not FluxPipeline's default 512)."""
    kwargs.setdefault("max_sequence_length", get_spec("tiny").max_sequence_length)
    generator = torch.Generator("cpu").manual_seed(seed)
    return np.asarray(pipe(prompt, generator=generator, **kwargs).images[0])

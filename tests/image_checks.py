"""Comparisons of images shared by the tests: pixel distance and diffusers' own image."""

from __future__ import annotations

import numpy as np
import torch


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def diffusers_image(pipe, prompt: str, seed: int, **kwargs) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    return np.asarray(pipe(prompt, generator=generator, **kwargs).images[0])

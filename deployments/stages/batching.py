"""What the VAE stages share: a batch of one size run through the model in parts bounded in pixels."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def in_parts(
    rows: torch.Tensor,
    height: int,
    width: int,
    max_pixels: int,
    call: Callable[[torch.Tensor], T],
    observe: Callable[[int], None] | None = None,
) -> list[T]:
    """call(part) on consecutive parts of `rows` (images of height x width), each at most `max_pixels`
    in images x pixels (one image at least); observe(images) before each call; the results in order."""
    per_call = max(1, max_pixels // (height * width))
    results = []
    for start in range(0, rows.shape[0], per_call):
        part = rows[start : start + per_call]
        if observe is not None:
            observe(part.shape[0])
        results.append(call(part))
    return results

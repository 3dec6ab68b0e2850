"""The denoiser's model: FLUX's transformer, loaded, then with the speed switches applied."""

from __future__ import annotations

import torch

from fluxray.acceleration import SpeedOptions, accelerate_transformer, resolve
from fluxray.sources import ModelSource, load_transformer_module


def load_transformer(
    source: ModelSource,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    speed: SpeedOptions | None = None,
):
    """The FluxTransformer2DModel with the speed switches applied (fluxray.acceleration).

    A switch that cannot work on this device fails (SpeedOptionError) before any weight loads.
    """
    device = torch.device(device)
    resolved = resolve(speed, device, "transformer")
    model = load_transformer_module(source, device, dtype)
    return accelerate_transformer(model, resolved, source.spec.max_sequence_length)

"""The denoiser's model: FLUX's transformer, loaded, then with the speed switches applied."""

from __future__ import annotations

import torch

from fluxray.lora import LoraSlots
from fluxray.models.sources import ModelSource, load_transformer_module
from fluxray.speed import ResolvedSpeed, SpeedOptions, accelerate_transformer, resolve


def load_transformer(
    source: ModelSource,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    speed: SpeedOptions | None = None,
    loras: LoraSlots | None = None,
):
    """The FluxTransformer2DModel with the speed switches applied (fluxray.speed), and with `loras`
    a LoRA bank attached (fluxray.lora; under torch.compile before compiling, so adapters never recompile).

    A switch that cannot work on this device fails (SpeedOptionError) before any weight loads.
    """
    device = torch.device(device)
    resolved = resolve(speed, device, "transformer")
    model = load_transformer_module(source, staging_device(source, resolved, device), dtype)
    return accelerate_transformer(model, resolved, source.spec.max_sequence_length, device, loras)


def staging_device(source: ModelSource, speed: ResolvedSpeed, device: torch.device) -> torch.device:
    """Where the weights land before the switches apply: the CPU when they are quantized for a GPU,
    so the GPU never holds the whole model in full precision (bf16 FLUX.1-dev is 24 GB: NF4 and
    int8 are for cards that cannot hold that), else the device itself. Random weights are built
    on the device in any case: they are for speed benchmarks, and building 12B of them on the CPU
    would take longer than the benchmark."""
    if speed.quantize != "none" and device.type != "cpu" and source.kind != "random":
        return torch.device("cpu")
    return device

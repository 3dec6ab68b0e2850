"""Where a stage runs and in what precision: the device, the dtype and the torch thread count of a
process that holds model stages (the CLI's, a Serve replica, a Ray Data actor)."""

from __future__ import annotations

import torch

from fluxray.sources import ModelSource, resolve_model


def pick_device(device: str | None = None) -> torch.device:
    """`auto`/None means CUDA when there is a GPU, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on GPUs (what FLUX.1 was released in), float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def stage_runtime(
    model: str | None, device: str | None = None, dtype: str | None = None, threads: int | None = None
) -> tuple[ModelSource, torch.device, torch.dtype]:
    """(source, device, dtype) for a process that runs model stages (a Serve replica, a Ray Data
    actor): its torch thread count applied first, `auto`/None device and dtype resolved."""
    if threads:
        torch.set_num_threads(threads)
    dev = pick_device(device)
    torch_dtype = default_dtype(dev) if dtype in (None, "auto") else getattr(torch, dtype)
    return resolve_model(model), dev, torch_dtype

"""Where a stage runs and in what precision: the device, the dtype and the torch thread count of a
process that holds model stages (the CLI's, a Serve replica, a Ray Data actor), and RuntimeOptions, the
settings of such a process that the online app's config and the offline job's config both carry."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from fluxray.models.sources import ModelSource, resolve_model
from fluxray.speed import SpeedOptions


class RuntimeOptions(BaseModel):
    """What a process holding model stages runs: the model, where and in what precision, its LoRA registry
    and the engine's speed switches. deployments.config.AppConfig (a serve config's `args`) and
    jobs.config.JobConfig (the offline job's options) are both these, plus their own settings."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default="tiny", description="Model source: tiny, flux-dev, a path, a repo id, random:<spec>.")
    device: str = Field(default="auto", description="auto (CUDA where the process has a GPU), cpu, cuda.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: bfloat16 on GPUs, float32 on CPUs. Embeddings and latents travel in it."
    )
    torch_threads: int | None = Field(
        default=None, ge=1, description="torch CPU threads per process that runs a stage (a replica, an actor)."
    )
    lora_root: str | None = Field(
        default=None,
        description="Directory (on every node) or s3:// prefix of LoRA files (*.safetensors, each named by its "
        "stem) that requests or rows may name; they never give paths or URLs. Files on S3 are fetched when first "
        "used. `tiny`: the embedded tiny model's adapters (style, subject).",
    )
    max_lora_rank: int = Field(
        default=64, ge=1, le=1024, description="Largest LoRA rank; every row is padded to it (no recompiles)."
    )
    max_resident_loras: int = Field(
        default=8, ge=1, le=256, description="Adapters each Denoiser replica or denoise actor keeps loaded (LRU)."
    )
    speed: SpeedOptions = Field(
        default_factory=SpeedOptions,
        description="Engine speed switches (compile, attention kernel, fused QKV, fp8/int8/nf4, VAE tiling, "
        "T5 placement); each process applies those of its stage. See fluxray.speed.",
    )

    @property
    def runtime(self) -> tuple[str, str, str, int | None]:
        """stage_runtime's arguments: model, device, dtype, torch threads."""
        return self.model, self.device, self.dtype, self.torch_threads


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

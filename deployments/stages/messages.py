"""What crosses between the stages (through Ray's object store, or a handle's options): the types each
deployment hands the next, and how a request is routed to a Denoiser. Stages import these from here,
never from each other, and so does the ingress.

    TextEncoder --EncodedPrompt--> Denoiser --DenoisedLatents--> VAEDecoder --DecodedImages--> ingress
                                      ^ routed(handle, params)          ^ DecodeRequest (size, format, metadata)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fluxray.embeds import PromptEmbeds
from fluxray.params import GenerationParams


@dataclass
class EncodedPrompt:
    """What the denoiser needs of a request's text: its embeddings and, for true CFG, the negative's."""

    embeds: PromptEmbeds  # one row, on the CPU
    negative: PromptEmbeds | None = None
    encode_s: float = 0.0  # seconds this request spent in the encoder (batch wait included)


@dataclass
class DenoisedLatents:
    """What the Denoiser hands the VAE: the request's packed latents (CPU) and its timings so far."""

    latents: torch.Tensor
    timings: dict[str, float] = field(default_factory=dict)  # seconds: encode, queue, denoise


@dataclass
class DecodeRequest:
    """How the VAEDecoder writes a request's images: their size, file format and each one's metadata."""

    height: int
    width: int
    output_format: str
    metadata: list[dict[str, Any]]  # one per image, embedded in its file


@dataclass
class DecodedImages:
    """The graph's result: one encoded file per image, and the request's seconds in each stage."""

    files: list[bytes]
    timings: dict[str, float]


def adapter_set_key(params: GenerationParams) -> str:
    """The request's adapter set as one id, whatever the order and scales: 'loras:cat+ink'."""
    return "loras:" + "+".join(sorted(lora.name for lora in params.loras))


def routed(handle, params: GenerationParams):
    """The Denoiser handle for a request: one with adapters is tagged with its adapter set (Serve's
    multiplexed model id), so Serve's router prefers a replica that already holds those adapters and falls
    back to the least loaded when that replica is busy."""
    if not params.loras:
        return handle
    return handle.options(multiplexed_model_id=adapter_set_key(params))

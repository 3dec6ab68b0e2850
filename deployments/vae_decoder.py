"""VAEDecoder deployment: latents to encoded image files, batched across requests of one size."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from ray import serve

from deployments.config import AppConfig
from deployments.metrics import StageMetrics
from fluxray.images import encode_image
from fluxray.runtime import stage_runtime
from fluxray.sampling import group_by_size
from fluxray.vae import VAEDecoder


@dataclass
class DecodeRequest:
    height: int
    width: int
    output_format: str
    metadata: list[dict[str, Any]]  # one per image, embedded in its file


@serve.deployment(name="VAEDecoder")
class VAEDecoderDeployment:
    def __init__(self, config: dict):
        self.config = AppConfig.model_validate(config)
        source, device, dtype = stage_runtime(*self.config.runtime)
        self.decoder = VAEDecoder.load(source, device, dtype, self.config.speed)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.decode_batch.set_max_batch_size(self.config.vae_max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(self.config.vae_batch_wait_s)
        self.largest_batch = 0
        self.metrics = StageMetrics("decode")

    def _decode(self, items: list[tuple[torch.Tensor, DecodeRequest]]) -> list[list[bytes]]:
        results: dict[int, list[bytes]] = {}
        for (height, width), group in group_by_size(
            range(len(items)), lambda i: (items[i][1].height, items[i][1].width)
        ):
            self.largest_batch = max(self.largest_batch, len(group))
            self.metrics.batch.observe(sum(items[i][0].shape[0] for i in group))
            pixels = self.decoder.decode(torch.cat([items[i][0] for i in group]), height, width).numpy()
            row = 0
            for i in group:
                latents, request = items[i]
                results[i] = [
                    encode_image(pixels[row + k], request.output_format, request.metadata[k])
                    for k in range(latents.shape[0])
                ]
                row += latents.shape[0]
        return [results[i] for i in range(len(items))]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def decode_batch(self, items: list[tuple[torch.Tensor, DecodeRequest]]) -> list[list[bytes]]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._decode, items)

    async def decode(self, latents: torch.Tensor, request: DecodeRequest) -> list[bytes]:
        """The request's images as files (PNG with metadata, JPEG or WebP), one per latent row."""
        with self.metrics.timed():
            return await self.decode_batch((latents, request))

    def stats(self) -> dict:
        return {"largest_batch": self.largest_batch}

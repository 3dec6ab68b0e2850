"""VAEDecoder deployment: latents to encoded image files, batched across requests of one size, each VAE
call bounded in images x pixels (`vae_max_batch_pixels`)."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from ray import serve

from deployments.config import AppConfig
from deployments.metrics import StageMetrics
from deployments.stages.batching import in_parts
from deployments.stages.messages import DecodedImages, DecodeRequest, DenoisedLatents
from deployments.warmup import timed, warm_vae_decoder
from fluxray.images import encode_image
from fluxray.params import parse_size
from fluxray.preview import fit_projection
from fluxray.runtime import stage_runtime
from fluxray.sampling import group_by_size
from fluxray.vae import VAEDecoder


@serve.deployment(name="VAEDecoder")
class VAEDecoderDeployment:
    def __init__(self, config: dict):
        self.config = AppConfig.model_validate(config)
        source, device, dtype = stage_runtime(*self.config.runtime)
        self.decoder = VAEDecoder.load(source, device, dtype, self.config.speed)
        width, height = parse_size(self.config.default_size)
        if self.config.warm_up:
            timed("VAEDecoder", lambda: warm_vae_decoder(self.decoder, source.spec, height, width))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decode")
        self.decode_batch.set_max_batch_size(self.config.vae_max_batch_size)
        self.decode_batch.set_batch_wait_timeout_s(self.config.vae_batch_wait_s)
        self.largest_batch = 0  # requests in one batch
        self.largest_call = 0  # images in one VAE call
        self.metrics = StageMetrics("decode")
        self.projection: torch.Tensor | None = None

    def _observe_call(self, images: int) -> None:
        self.largest_call = max(self.largest_call, images)
        self.metrics.batch.observe(images)

    def _decode_rows(self, latents: torch.Tensor, height: int, width: int):
        """Pixels of the rows, decoded in parts of at most vae_max_batch_pixels (one image at least)."""

        def decode(rows: torch.Tensor):
            return self.decoder.decode(rows, height, width).numpy()

        parts = in_parts(latents, height, width, self.config.vae_max_batch_pixels, decode, self._observe_call)
        return [image for part in parts for image in part]

    def _decode(self, items: list[tuple[torch.Tensor, DecodeRequest]]) -> list[list[bytes]]:
        results: dict[int, list[bytes]] = {}
        for (height, width), group in group_by_size(
            range(len(items)), lambda i: (items[i][1].height, items[i][1].width)
        ):
            self.largest_batch = max(self.largest_batch, len(group))
            pixels = self._decode_rows(torch.cat([items[i][0] for i in group]), height, width)
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

    async def decode(self, denoised: DenoisedLatents, request: DecodeRequest) -> DecodedImages:
        """The request's images as files (PNG with metadata, JPEG or WebP), one per latent row,
        with the request's stage timings (the denoiser's plus this stage's)."""
        started = time.monotonic()
        with self.metrics.timed():
            files = await self.decode_batch((denoised.latents, request))
        return DecodedImages(files, {**denoised.timings, "decode": time.monotonic() - started})

    async def preview_projection(self) -> torch.Tensor:
        """The latent -> RGB map of this VAE for async jobs' previews (fluxray.preview), fitted with its
        encoder on the first call, then kept."""
        if self.projection is None:
            loop = asyncio.get_running_loop()
            self.projection = await loop.run_in_executor(self.executor, fit_projection, self.decoder.vae)
        return self.projection

    def stats(self) -> dict:
        return {"largest_batch": self.largest_batch, "largest_call": self.largest_call}

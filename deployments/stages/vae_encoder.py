"""VAEEncoder deployment: an edit's input pixels to latent distributions (fluxray.editing), batched across
requests whose inputs share a size. Only edits (/v1/images/edits) call it."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import torch
from ray import serve

from deployments.config import AppConfig
from deployments.metrics import StageMetrics
from deployments.stages.batching import in_parts
from deployments.warmup import timed, warm_vae_encoder
from fluxray.editing import EditInputs, EncodedEdit
from fluxray.params import parse_size
from fluxray.runtime import stage_runtime
from fluxray.sampling import group_by_size
from fluxray.vae import VAEEncoder


@serve.deployment(name="VAEEncoder")
class VAEEncoderDeployment:
    def __init__(self, config: dict):
        self.config = AppConfig.model_validate(config)
        source, device, dtype = stage_runtime(*self.config.runtime)
        self.encoder = VAEEncoder.load(source, device, dtype, self.config.speed)
        width, height = parse_size(self.config.default_size)
        if self.config.warm_up:
            timed("VAEEncoder", lambda: warm_vae_encoder(self.encoder, height, width))
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode-image")
        self.encode_batch.set_max_batch_size(self.config.vae_max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(self.config.vae_batch_wait_s)
        self.largest_call = 0  # images in one VAE encoder call
        self.metrics = StageMetrics("encode_image")

    def _observe_call(self, images: int) -> None:
        self.largest_call = max(self.largest_call, images)
        self.metrics.batch.observe(images)

    def _encode(self, items: list[EditInputs]) -> list[EncodedEdit]:
        """Every input (and Fill's masked input) of one size in one encoder call, at most
        vae_max_batch_pixels at a time."""
        results: dict[int, EncodedEdit] = {}
        for (height, width), group in group_by_size(range(len(items)), lambda i: tuple(items[i].image.shape[-2:])):
            pixels = torch.cat([p for i in group for p in (items[i].image, items[i].masked_image) if p is not None])
            budget = self.config.vae_max_batch_pixels
            moments = torch.cat(in_parts(pixels, height, width, budget, self.encoder.moments, self._observe_call))
            row = 0
            for i in group:
                item = items[i]
                masked = None
                if item.masked_image is not None:
                    masked = moments[row + 1 : row + 2]
                results[i] = EncodedEdit(item.method, moments[row : row + 1], item.mask, masked)
                row += 1 if masked is None else 2
        return [results[i] for i in range(len(items))]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def encode_batch(self, items: list[EditInputs]) -> list[EncodedEdit]:
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._encode, items)

    async def encode(self, inputs: EditInputs) -> EncodedEdit:
        """The edit's latent distributions (on the CPU), for the Denoiser's edit task."""
        started = time.monotonic()
        with self.metrics.timed():
            encoded = await self.encode_batch(inputs)
        encoded.encode_s = time.monotonic() - started
        return encoded

    def stats(self) -> dict:
        return {"largest_call": self.largest_call}

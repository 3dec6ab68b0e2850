"""In-process generation: text encoding -> noise -> denoising -> VAE decode, for the CLI,
the tests, the benchmarks and the offline job. Serve deployments run the same stages apart."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from fluxray.editing import EditError, EditParams, edit_method, edit_task, prepare_edit
from fluxray.images import encode_image, image_metadata, image_sha256
from fluxray.lora import LoraSlots
from fluxray.models.sources import ModelSource, resolve_model
from fluxray.params import GenerationParams
from fluxray.runtime import default_dtype, pick_device
from fluxray.sampling import denoise, denoise_task, group_by_size
from fluxray.speed import SpeedOptions, resolve
from fluxray.text_encoding import TextEncoder
from fluxray.transformer import load_transformer
from fluxray.vae import VAEDecoder, VAEEncoder


@dataclass
class GeneratedImage:
    """One image: its pixels, the seed that made it and the resolved request."""

    pixels: np.ndarray  # (H, W, 3) uint8
    seed: int
    index: int  # position within its request (seed = request seed + index)
    params: GenerationParams
    model: str
    extra: dict[str, Any] = field(default_factory=dict)  # edits: the method and the inputs' sha256

    def metadata(self) -> dict[str, Any]:
        return {**image_metadata(self.params, self.seed, self.model), **self.extra}

    def encode(self, fmt: str | None = None) -> bytes:
        return encode_image(self.pixels, fmt or self.params.output_format, self.metadata())


class Pipeline:
    """All three stages in one process."""

    def __init__(self, source: ModelSource, text_encoder: TextEncoder, transformer, decoder: VAEDecoder):
        self.source = source
        self.text_encoder = text_encoder
        self.transformer = transformer
        self.decoder = decoder

    @classmethod
    def load(
        cls,
        model: str | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        speed: SpeedOptions | None = None,
        loras: LoraSlots | None = None,
    ):
        """All three stages on one device, with the speed switches applied (fluxray.speed) and, with
        `loras`, the transformer's LoRA bank attached (fluxray.lora: load adapters with its `add`)."""
        source = resolve_model(model)
        dev = pick_device(device)
        dtype = dtype or default_dtype(dev)
        resolve(speed, dev)  # a switch that cannot work here fails before any weight loads
        return cls(
            source,
            TextEncoder.load(source, dev, dtype, speed),
            load_transformer(source, dev, dtype, speed, loras),
            VAEDecoder.load(source, dev, dtype, speed),
        )

    @property
    def device(self) -> torch.device:
        return self.transformer.device

    def to_diffusers(self):
        """A diffusers FluxPipeline over these very modules (same weights, no copy), e.g. as a peer."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        enc = self.text_encoder
        pipe = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**self.source.spec.scheduler),
            vae=self.decoder.vae,
            text_encoder=enc.clip,
            tokenizer=enc.clip_tokenizer,
            text_encoder_2=enc.t5,
            tokenizer_2=enc.t5_tokenizer,
            transformer=self.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.dtype

    @property
    def encoder(self) -> VAEEncoder:
        """The VAE's encoder half, over the decoder's module (no second copy of the weights)."""
        return VAEEncoder(self.decoder.vae)

    def edit(
        self,
        params: EditParams,
        image: Image.Image,
        mask: Image.Image | None = None,
        on_step: Callable[[], None] | None = None,
    ) -> list[GeneratedImage]:
        """Edit `image` (RGB) as the model does (fluxray.editing): img2img, or inpainting where `mask` is
        white, for base models; FLUX.1 Fill's fill; FLUX.1 Kontext's instruction edit."""
        spec = self.source.spec
        method = edit_method(spec, mask is not None, params.strength)
        r = params.resolve(spec)
        embeds = self.text_encoder.encode([r.prompt], [r.prompt_2]).to(self.device, self.dtype)
        negative = self.text_encoder.encode([r.negative_prompt]).to(self.device, self.dtype) if r.do_true_cfg else None
        encoded = self.encoder.encode(prepare_edit(spec, method, image, mask, r.width, r.height))
        task = edit_task(r, embeds, negative, encoded, spec, self.device, self.dtype)
        denoise(self.transformer, [task], r.height, r.width, on_step)
        pixels = self.decoder.decode(task.latents, r.height, r.width).numpy()
        extra = {"edit": method, "strength": r.strength, "image_sha256": image_sha256(image)}
        if mask is not None:
            extra["mask_sha256"] = image_sha256(mask)
        seeds = r.image_seeds()
        return [GeneratedImage(pixels[k], seed, k, r, self.source.name, extra) for k, seed in enumerate(seeds)]

    def generate(
        self,
        requests: GenerationParams | Sequence[GenerationParams],
        on_step: Callable[[], None] | None = None,
    ) -> list[GeneratedImage]:
        """Generate every image of every request; requests of one size share each transformer call.

        Returns the images request by request, in order. on_step is called after each batched step.
        """
        if self.source.spec.edit == "fill":
            raise EditError("model", f"{self.source.name} (FLUX.1 Fill) only fills a masked image: use edit()")
        if isinstance(requests, GenerationParams):
            requests = [requests]
        resolved = [r.resolve(self.source.spec) for r in requests]
        results: dict[int, list[GeneratedImage]] = {}
        for _size, indices in group_by_size(range(len(resolved)), lambda i: (resolved[i].height, resolved[i].width)):
            for i, images in zip(indices, self._generate_same_size([resolved[i] for i in indices], on_step)):
                results[i] = images
        return [image for i in range(len(resolved)) for image in results[i]]

    def _generate_same_size(self, requests: list[GenerationParams], on_step) -> list[list[GeneratedImage]]:
        height, width = requests[0].height, requests[0].width
        prompts = [r.prompt for r in requests]
        embeds = self.text_encoder.encode(prompts, [r.prompt_2 for r in requests]).to(self.device, self.dtype)
        cfg = [i for i, r in enumerate(requests) if r.do_true_cfg]
        negatives = None
        if cfg:
            negatives = self.text_encoder.encode([requests[i].negative_prompt for i in cfg]).to(self.device, self.dtype)
        tasks = []
        for i, r in enumerate(requests):
            negative = negatives.select([cfg.index(i)]) if i in cfg else None
            tasks.append(denoise_task(r, embeds.select([i]), negative, self.source.spec, self.device, self.dtype))
        denoise(self.transformer, tasks, height, width, on_step)
        pixels = self.decoder.decode(torch.cat([t.latents for t in tasks]), height, width).numpy()
        out, row = [], 0
        for r in requests:
            images = []
            for k, seed in enumerate(r.image_seeds()):
                images.append(GeneratedImage(pixels[row], seed, k, r, self.source.name))
                row += 1
            out.append(images)
        return out

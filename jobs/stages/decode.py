"""The decode stage: latents through the VAE's decoder to encoded image files with their metadata."""

from __future__ import annotations

import hashlib

import torch
from safetensors.torch import load as load_tensors

from fluxray.images import encode_image, image_metadata
from fluxray.runtime import stage_runtime
from fluxray.speed import SpeedOptions
from fluxray.vae import VAEDecoder
from jobs.prompts import params_of
from jobs.stages.base import Stage, by_size
from jobs.stages.schema import DECODED_SCHEMA, EDIT_RECORD


class DecodeStage(Stage):
    """Latents to image files (with their parameters embedded), rows of one size in one VAE call."""

    name, schema = "decode", DECODED_SCHEMA

    def __init__(
        self,
        model: str,
        device: str,
        dtype: str | None,
        threads: int | None,
        output_format: str,
        speed: SpeedOptions | None = None,
    ):
        self.source, self.device, self.dtype = stage_runtime(model, device, dtype, threads)
        self.decoder = VAEDecoder.load(self.source, self.device, self.dtype, speed)
        self.output_format = output_format

    def work(self, rows: list[dict]) -> None:
        for (height, width), group in by_size(rows):
            latents = torch.cat([load_tensors(row["latents"])["latents"] for row in group])
            pixels = self.decoder.decode(latents.to(self.device, self.dtype), height, width)
            for row, image in zip(group, pixels):
                params = params_of(row, self.output_format)
                meta = image_metadata(params, params.seed, self.source.name)
                if row["input_image"] is not None:
                    meta |= {k: row[k] for k in EDIT_RECORD}
                data = encode_image(image.numpy(), self.output_format, meta)
                row["image_bytes"], row["sha256"] = data, hashlib.sha256(data).hexdigest()

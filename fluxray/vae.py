"""The VAE: decoding packed latents to 8-bit RGB pixels, as FluxPipeline's postprocess makes them, and
encoding an edit's input image to latent distributions."""

from __future__ import annotations

import torch

from fluxray.editing import EditInputs, EncodedEdit
from fluxray.models.sources import ModelSource, load_vae
from fluxray.sampling import unpack_latents
from fluxray.speed import SpeedOptions, accelerate_vae, resolve, tile_threshold


def load_accelerated_vae(source: ModelSource, device, dtype: torch.dtype, speed: SpeedOptions | None):
    """The model's VAE on `device` in `dtype` with the VAE's speed switches applied, and those switches
    resolved (what both halves load)."""
    resolved = resolve(speed, device, "vae")
    return accelerate_vae(load_vae(source, device, dtype), resolved), resolved


class VAEDecoder:
    """The FLUX autoencoder's decoder half, turning packed latents into uint8 images.

    Images with a side above tile_above pixels are decoded in overlapping tiles (diffusers'
    tiled_decode), which bounds the decoder's memory; None never tiles.
    """

    def __init__(self, vae, tile_above: int | None = None):
        self.vae = vae
        self.scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.tile_above = tile_above

    @classmethod
    def load(
        cls,
        source: ModelSource,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        speed: SpeedOptions | None = None,
    ) -> VAEDecoder:
        """The VAE with the speed switches applied (fluxray.speed)."""
        vae, resolved = load_accelerated_vae(source, device, dtype, speed)
        return cls(vae, tile_threshold(vae, resolved))

    @torch.inference_mode()
    def decode(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(B, seq, 64) packed latents -> (B, height, width, 3) uint8 on the CPU."""
        config = self.vae.config
        latents = unpack_latents(latents, height, width, self.scale_factor)
        latents = latents / config.scaling_factor + config.shift_factor
        latents = latents.to(self.vae.device, self.vae.dtype)
        if self.tile_above is not None and max(height, width) > self.tile_above:
            image = self.vae.tiled_decode(latents, return_dict=False)[0]
        else:
            image = self.vae.decode(latents, return_dict=False)[0]
        image = (image * 0.5 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float()
        return (image * 255).round().to(torch.uint8)


class VAEEncoder:
    """The FLUX autoencoder's encoder half: an edit's input pixels to latent distributions (fluxray.editing)."""

    def __init__(self, vae):
        self.vae = vae

    @classmethod
    def load(
        cls,
        source: ModelSource,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        speed: SpeedOptions | None = None,
    ) -> VAEEncoder:
        """The VAE with the speed switches applied (fluxray.speed)."""
        return cls(load_accelerated_vae(source, device, dtype, speed)[0])

    @torch.inference_mode()
    def moments(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 32, H/8, W/8): each latent's mean and log-variance, on the CPU."""
        pixels = pixels.to(self.vae.device, self.vae.dtype)
        return self.vae.encode(pixels, return_dict=False)[0].parameters.cpu()

    def encode(self, inputs: EditInputs) -> EncodedEdit:
        """The edit's input (and, for FLUX.1 Fill, its masked input) through the encoder."""
        pixels = inputs.image if inputs.masked_image is None else torch.cat([inputs.image, inputs.masked_image])
        moments = self.moments(pixels)
        masked = moments[1:] if inputs.masked_image is not None else None
        mask = None if inputs.mask is None else inputs.mask.cpu()
        return EncodedEdit(inputs.method, moments[:1], mask, masked)

"""Cheap previews of an image while it is denoised: a fixed linear map from latent channels to RGB,
no VAE decode.

The map is fitted once per VAE (`fit_projection`): the VAE's own encoder encodes a fixed set of flat
colours and colour ramps, and least squares finds the affine map from each latent pixel (in the
denoiser's normalised space: (z - shift) x scale) to the mean RGB of the 8x8 pixels it covers. Any VAE
with the FLUX latent layout works, FLUX.1's 16 channels as the tiny model's, with nothing to ship per
model. `preview_latents` takes a request's packed latents at a step down to a small (C, h, w) tensor (one
latent pixel per 8x8 image pixels, pooled to at most `max_side`: 64x64 for a 1024x1024 image), which
`preview_image` maps to RGB and encodes.
"""

from __future__ import annotations

import io
import itertools

import torch
import torch.nn.functional as F
from PIL import Image

from fluxray.sampling import unpack_latents

FIT_SIDE = 64  # pixels of each fitting image
PREVIEW_FORMATS = {"jpeg": "JPEG", "webp": "WEBP"}


def _fitting_images() -> torch.Tensor:
    """(N, 3, 64, 64) in [-1, 1]: 27 flat colours (each channel 0, 0.5 or 1) and 6 ramps."""
    flats = [torch.tensor(c, dtype=torch.float32) for c in itertools.product((0.0, 0.5, 1.0), repeat=3)]
    images = [c[:, None, None].expand(3, FIT_SIDE, FIT_SIDE) for c in flats]
    ramp = torch.linspace(0, 1, FIT_SIDE)
    for channel in range(3):
        for horizontal in (True, False):
            image = torch.full((3, FIT_SIDE, FIT_SIDE), 0.5)
            image[channel] = ramp[None, :] if horizontal else ramp[:, None]
            images.append(image)
    return torch.stack(images) * 2 - 1


@torch.inference_mode()
def fit_projection(vae) -> torch.Tensor:
    """(channels + 1, 3) float32 on the CPU: latent pixel (with a 1 appended) -> RGB in [-1, 1]."""
    images = _fitting_images().to(vae.device, vae.dtype)
    latents = vae.encode(images).latent_dist.mean.float()
    latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    scale = FIT_SIDE // latents.shape[-1]
    targets = F.avg_pool2d(images.float(), scale)  # (N, 3, h, w): the pixels each latent pixel covers
    x = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1]).cpu()
    x = torch.cat([x, torch.ones(x.shape[0], 1)], dim=1)
    y = targets.permute(0, 2, 3, 1).reshape(-1, 3).cpu()
    return torch.linalg.lstsq(x, y).solution


def preview_latents(
    latents: torch.Tensor, height: int, width: int, vae_scale_factor: int = 8, max_side: int = 64
) -> torch.Tensor:
    """The first image of (n, seq, 64) packed latents, unpacked and average-pooled to at most max_side
    latent pixels a side: (C, h, w) float16 on the CPU, what a preview is made from (a few KB to
    send instead of the latents of every image)."""
    unpacked = unpack_latents(latents[:1].float().cpu(), height, width, vae_scale_factor)[0]
    side = max(unpacked.shape[-2:])
    if side > max_side:
        unpacked = F.avg_pool2d(unpacked[None], -(-side // max_side), ceil_mode=True)[0]
    return unpacked.to(torch.float16)


def preview_image(
    latents: torch.Tensor, projection: torch.Tensor, output_format: str = "jpeg", quality: int = 70
) -> bytes:
    """(C, h, w) latents (preview_latents) through the projection: an h x w JPEG or WebP file."""
    channels, h, w = latents.shape
    x = torch.cat([latents.float().reshape(channels, -1).T, torch.ones(h * w, 1)], dim=1)
    rgb = (x @ projection).clamp(-1, 1).reshape(h, w, 3)
    pixels = ((rgb + 1) * 127.5).round().to(torch.uint8).numpy()
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, PREVIEW_FORMATS[output_format], quality=quality)
    return out.getvalue()

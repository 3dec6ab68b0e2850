"""Image editing: img2img, inpainting, FLUX.1 Fill and FLUX.1 Kontext, each as its diffusers pipeline does it
(FluxImg2ImgPipeline, FluxInpaintPipeline, FluxFillPipeline, FluxKontextPipeline), on diffusers' own image
and mask processors.

An edit runs in three parts, which the Serve graph runs in three places:
`prepare_edit` turns the decoded image (and mask) into the pixels the VAE takes (the ingress, on the CPU);
`VAEEncoder.encode` (fluxray.vae) turns them into latent distributions (`EncodedEdit`); `edit_task` makes the
request's DenoiseTask from those, drawing each image's randomness from its own seed (the Denoiser). The
task then steps in `denoise_step` beside text-to-image tasks of the same shape.

Seeds: image i of a request with seed S equals diffusers' pipeline called for that image alone with
`generator=torch.Generator("cpu").manual_seed(S + i)`: that generator first samples the input's latent
distribution (img2img, inpaint, Fill), then draws the noise, then (Fill) samples the masked image's
distribution. diffusers' own list-of-generators batch samples the input with the first generator only,
which would make an image depend on its batch; fluxray keeps batch composition out of every image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from PIL import Image
from pydantic import Field, field_validator

from fluxray.embeds import PromptEmbeds
from fluxray.images import InputImageError, edit_mask, mask_from_alpha, read_input_image
from fluxray.lora import LoraChoice
from fluxray.models.specs import ModelSpec
from fluxray.params import MAX_SIDE, MIN_SIDE, GenerationParams
from fluxray.sampling import (
    LATENT_CHANNELS,
    DenoiseTask,
    InpaintBlend,
    flow_sigmas,
    image_ids,
    initial_noise,
    latent_size,
    pack_latents,
    step_cache,
)

EditMethod = Literal["img2img", "inpaint", "fill", "kontext"]


class EditError(ValueError):
    """An edit request that cannot run; `field` names the request field it is about."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class EditParams(GenerationParams):
    """An edit request: a generation request plus how far the input image is noised."""

    strength: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="How far toward noise the input goes (1 = ignore it but for the mask); the model's default "
        "when unset (0.6 for img2img and inpainting, 1 for FLUX.1 Fill). Kontext takes none.",
    )

    @field_validator("strength")
    @classmethod
    def _strength_finite(cls, value: float | None) -> float | None:
        if value is not None and value != value:
            raise ValueError("must be a number")
        return value

    def resolve(self, spec: ModelSpec) -> EditParams:
        resolved = super().resolve(spec)
        if spec.edit == "kontext":
            return resolved
        strength = spec.default_strength if self.strength is None else self.strength
        return resolved.model_copy(update={"strength": strength})

    def start_step(self) -> int:
        """The first step that runs (diffusers' get_timesteps): strength 1 runs them all, and any strength
        above 0 leaves at least the last."""
        steps = self.num_inference_steps
        if steps is None:
            raise ValueError("resolve() the params before asking for the start step")
        if self.strength is None:
            return 0
        return int(max(steps - min(steps * self.strength, steps), 0))


# An input image (or mask) larger than this many pixels is refused from its header, before it is
# decoded: the CLI's and the job's bound, and the serve config's max_input_pixels default.
MAX_INPUT_PIXELS = 4096 * 4096


def read_edit_inputs(
    spec: ModelSpec, image_data: bytes, mask_data: bytes | None, max_pixels: int = MAX_INPUT_PIXELS
) -> tuple[Image.Image, Image.Image | None]:
    """The one reader of an edit's inputs (the CLI's files, the HTTP route's uploads, the job's rows):
    the image as RGB and the mask as diffusers takes it (L, white = repaint; None for none), each checked
    against `max_pixels` from its header. A mask with alpha follows OpenAI (transparent = edit); with no
    mask, an image whose alpha has transparent pixels marks its own area to edit, as OpenAI's edits do
    (not for Kontext, which takes no mask: its input's alpha is dropped). InputImageError names the field."""
    image = read_input_image(image_data, "image", max_pixels)
    if mask_data is not None:
        mask = edit_mask(read_input_image(mask_data, "mask", max_pixels))
        if mask.size != image.size:
            raise InputImageError(
                "mask", f"{mask.width}x{mask.height} differs from the image's {image.width}x{image.height}"
            )
    else:
        mask = mask_from_alpha(image) if spec.edit != "kontext" else None
    return image.convert("RGB"), mask


def edit_method(spec: ModelSpec, has_mask: bool, strength: float | None = None) -> EditMethod:
    """What the model does with an image: base models img2img (inpainting with a mask), Fill needs a
    mask, Kontext edits by instruction and takes neither a mask nor a strength."""
    if spec.edit == "fill":
        if not has_mask:
            raise EditError("mask", f"{spec.name} (FLUX.1 Fill) needs a mask: it repaints the masked area")
        return "fill"
    if spec.edit == "kontext":
        if has_mask:
            raise EditError("mask", f"{spec.name} (FLUX.1 Kontext) edits by instruction and takes no mask")
        if strength is not None:
            raise EditError("strength", f"{spec.name} (FLUX.1 Kontext) takes no strength: it edits by instruction")
        return "kontext"
    return "inpaint" if has_mask else "img2img"


def _processors(spec: ModelSpec):
    from diffusers.image_processor import VaeImageProcessor

    factor = spec.vae_scale_factor * 2
    image = VaeImageProcessor(vae_scale_factor=factor, vae_latent_channels=LATENT_CHANNELS)
    mask = VaeImageProcessor(
        vae_scale_factor=factor,
        vae_latent_channels=LATENT_CHANNELS,
        do_normalize=False,
        do_binarize=True,
        do_convert_grayscale=True,
    )
    return image, mask


def reference_size(spec: ModelSpec, width: int, height: int) -> tuple[int, int]:
    """Kontext's reference size for an input image (width, height): the preferred resolution nearest its
    aspect ratio (FluxKontextPipeline's auto-resize), sides divided by spec.reference_downscale, multiples of 16."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    multiple = spec.vae_scale_factor * 2
    # diffusers takes the ratio of the sides rounded down to multiples of 16 (a side under 16 counts as 16)
    ratio = max(multiple, width // multiple * multiple) / max(multiple, height // multiple * multiple)
    _, w, h = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    down = spec.reference_downscale
    return w // down // multiple * multiple, h // down // multiple * multiple


def default_size(spec: ModelSpec, image: Image.Image) -> tuple[int, int]:
    """The output size (width, height) of an edit that names none: the input's (Kontext: its reference's),
    rounded down to multiples of 16."""
    if spec.edit == "kontext":
        return reference_size(spec, image.width, image.height)
    multiple = spec.vae_scale_factor * 2
    return max(multiple, image.width // multiple * multiple), max(multiple, image.height // multiple * multiple)


def fit_size(width: int, height: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """A size of the same aspect ratio within max_area pixels and the sides' bounds, multiples of `multiple`:
    the default output size of an edit whose input is large."""
    scale = min(1.0, (max_area / (width * height)) ** 0.5, MAX_SIDE / max(width, height))
    w, h = (max(MIN_SIDE, int(side * scale) // multiple * multiple) for side in (width, height))
    return min(w, MAX_SIDE), min(h, MAX_SIDE)


@dataclass
class EditInputs:
    """The pixels an edit's VAE encoding takes: (1, 3, H, W) in [-1, 1], the mask (1, 1, H, W) in {0, 1}."""

    method: EditMethod
    image: torch.Tensor  # at the output size; Kontext: at its reference size
    mask: torch.Tensor | None = None  # inpaint, fill
    masked_image: torch.Tensor | None = None  # fill: the image with the masked area blanked


def prepare_edit(
    spec: ModelSpec, method: EditMethod, image: Image.Image, mask: Image.Image | None, width: int, height: int
) -> EditInputs:
    """Resize and normalise the input as the method's diffusers pipeline does. `mask` is white where the
    model repaints (diffusers' convention); the image must be RGB."""
    image_processor, mask_processor = _processors(spec)
    if method == "kontext":
        w, h = reference_size(spec, image.width, image.height)
        resized = image_processor.resize(image, h, w)
        return EditInputs(method, image_processor.preprocess(resized, h, w))
    pixels = image_processor.preprocess(image, height=height, width=width)
    if method == "img2img":
        return EditInputs(method, pixels)
    if mask is None:
        raise EditError("mask", f"{method} needs a mask")
    mask_pixels = mask_processor.preprocess(mask, height=height, width=width)
    masked = pixels * (1 - mask_pixels) if method == "fill" else None
    return EditInputs(method, pixels, mask_pixels, masked)


@dataclass
class EncodedEdit:
    """An edit's input after the VAE encoder: the latent distributions' parameters (mean and log-variance
    along channels, as diffusers' DiagonalGaussianDistribution holds them) and the pixel mask."""

    method: EditMethod
    image_moments: torch.Tensor  # (1, 32, h, w)
    mask: torch.Tensor | None = None  # (1, 1, H, W)
    masked_moments: torch.Tensor | None = None  # fill
    encode_s: float = 0.0  # seconds in the VAE encoder (its batch wait included)

    def to(self, device: torch.device | str) -> EncodedEdit:
        def move(t):
            return None if t is None else t.to(device)

        moved = (move(self.image_moments), move(self.mask), move(self.masked_moments))
        return EncodedEdit(self.method, *moved, self.encode_s)

    @property
    def reference_shape(self) -> tuple[int, int] | None:
        """Kontext's reference size in pixels (height, width), which tasks of one step must share."""
        if self.method != "kontext":
            return None
        h, w = self.image_moments.shape[-2:]
        return h * 8, w * 8  # the VAE's 8x


def _latents(moments: torch.Tensor, spec: ModelSpec, generator: torch.Generator | None) -> torch.Tensor:
    """Scaled latents from a distribution: sampled with the generator, or its mode without one."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    dist = DiagonalGaussianDistribution(moments)
    latents = dist.mode() if generator is None else dist.sample(generator=generator)
    return (latents - spec.vae["shift_factor"]) * spec.vae["scaling_factor"]


def _mask_latents(mask: torch.Tensor, spec: ModelSpec, height: int, width: int) -> torch.Tensor:
    """Inpainting's mask at latent resolution, one value per latent channel, packed (1, seq, 64)."""
    h, w = latent_size(height, width, spec.vae_scale_factor)
    small = torch.nn.functional.interpolate(mask, size=(h, w))
    return pack_latents(small.repeat(1, LATENT_CHANNELS, 1, 1))


def _fill_mask(mask: torch.Tensor, spec: ModelSpec, height: int, width: int) -> torch.Tensor:
    """Fill's mask channels: each latent's 8x8 pixels as 64 channels, packed (1, seq, 256)."""
    f = spec.vae_scale_factor
    h, w = latent_size(height, width, f)
    m = mask[:, 0].reshape(1, h, f, w, f).permute(0, 2, 4, 1, 3).reshape(1, f * f, h, w)
    return pack_latents(m)


def edit_task(
    params: EditParams,
    embeds: PromptEmbeds,
    negative: PromptEmbeds | None,
    encoded: EncodedEdit,
    spec: ModelSpec,
    device: torch.device,
    dtype: torch.dtype,
) -> DenoiseTask:
    """The DenoiseTask of a resolved edit request (embeds and negative hold one row, as for denoise_task)."""
    height, width, n = params.height, params.width, params.n
    encoded = encoded.to("cpu")
    steps = params.num_inference_steps
    full = flow_sigmas(steps, (height // 16) * (width // 16), spec.scheduler)
    start = params.start_step()  # at most steps - 1: a strength > 0 always leaves a step
    sigmas = full[start:]
    guidance = params.guidance_per_step()[start:]
    h, w = latent_size(height, width, spec.vae_scale_factor)
    noises, images, masked = [], [], []
    for seed in params.image_seeds():
        if encoded.method == "kontext":
            noises.append(initial_noise(seed, height, width, dtype, spec.vae_scale_factor))
            continue
        generator = torch.Generator("cpu").manual_seed(seed)
        images.append(pack_latents(_latents(encoded.image_moments, spec, generator).to(dtype)))
        noise = torch.randn((1, LATENT_CHANNELS, h, w), generator=generator, dtype=dtype)
        noises.append(pack_latents(noise))
        if encoded.method == "fill":
            masked.append(pack_latents(_latents(encoded.masked_moments, spec, generator).to(dtype)))
    noise = torch.cat(noises)
    task = DenoiseTask(
        latents=noise,
        embeds=embeds.select([0] * n).to(device, dtype),
        sigmas=sigmas,
        guidance=guidance,
        negative=negative.select([0] * n).to(device, dtype) if negative is not None and params.do_true_cfg else None,
        true_cfg_scale=params.true_cfg_scale,
        loras=tuple(LoraChoice(lora.name, lora.scale) for lora in params.loras),
        cache=step_cache(params),
    )
    if encoded.method == "kontext":
        reference = pack_latents(_latents(encoded.image_moments, spec, None).to(dtype))
        ref_h, ref_w = encoded.reference_shape
        ids = image_ids(ref_h, ref_w)
        ids[:, 0] = 1  # FluxKontextPipeline: the reference's ids, first axis 1
        task.reference = reference.repeat(n, 1, 1).to(device)
        task.reference_ids = ids.to(device, dtype)
        task.latents = noise.to(device)
        return task
    image_latents = torch.cat(images)
    s = sigmas[0].to(dtype)
    task.latents = (s * noise + (1.0 - s) * image_latents).to(device)  # the scheduler's scale_noise
    if encoded.method == "inpaint":
        mask = _mask_latents(encoded.mask.to(dtype), spec, height, width).repeat(n, 1, 1)
        task.blend = InpaintBlend(image_latents.to(device), noise.to(device), mask.to(device))
    elif encoded.method == "fill":
        mask = _fill_mask(encoded.mask.to(dtype), spec, height, width)
        task.condition = torch.cat([torch.cat(masked), mask.repeat(n, 1, 1)], dim=2).to(device)
    return task

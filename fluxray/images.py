"""Image files: PNG with every generation parameter as text metadata, JPEG and WebP."""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

import fluxray
from fluxray.params import GenerationParams

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
METADATA_KEY = "fluxray"


def image_metadata(params: GenerationParams, seed: int, model: str) -> dict[str, Any]:
    """Every parameter needed to make an image again (no timestamps: same inputs, same bytes)."""
    return {
        "model": model,
        "prompt": params.prompt,
        "prompt_2": params.prompt_2,
        "negative_prompt": params.negative_prompt,
        "seed": seed,
        "width": params.width,
        "height": params.height,
        "num_inference_steps": params.num_inference_steps,
        "guidance_scale": params.guidance_scale,
        "guidance_scale_end": params.guidance_scale_end,
        "true_cfg_scale": params.true_cfg_scale,
        "sampler": "flow-match-euler",
        "fluxray_version": fluxray.__version__,
        **({"loras": [lora.model_dump() for lora in params.loras]} if params.loras else {}),
    }


def encode_image(pixels: np.ndarray, fmt: str = "png", metadata: Mapping[str, Any] | None = None) -> bytes:
    """Encode (H, W, 3) uint8 pixels. PNG stores `metadata` as one JSON text chunk plus one
    chunk per key; JPEG stores the JSON as a comment. Equal inputs give equal bytes."""
    image = Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    text = json.dumps(dict(metadata or {}), sort_keys=True, default=str)
    out = io.BytesIO()
    if fmt == "png":
        info = PngImagePlugin.PngInfo()
        info.add_text(METADATA_KEY, text)
        for key, value in sorted((metadata or {}).items()):
            if value is not None:
                info.add_text(str(key), str(value))
        image.save(out, format="PNG", pnginfo=info)
    elif fmt == "jpeg":
        image.save(out, format="JPEG", quality=95, comment=text.encode())
    elif fmt == "webp":
        image.save(out, format="WEBP", quality=95)
    else:
        raise ValueError(f"output_format must be one of {', '.join(MEDIA_TYPES)} (got {fmt!r})")
    return out.getvalue()


def read_metadata(data: bytes) -> dict[str, Any]:
    """The generation metadata embedded by encode_image (PNG text or JPEG comment); {} if none."""
    image = Image.open(io.BytesIO(data))
    raw = image.info.get(METADATA_KEY) or image.info.get("comment")
    if isinstance(raw, bytes):
        raw = raw.decode()
    return json.loads(raw) if raw else {}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB of two uint8 images (or stacks of them); inf when equal."""
    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255**2 / mse)


# --- input images (edits) -------------------------------------------------------------------------

INPUT_FORMATS = ("PNG", "JPEG", "WEBP")


class InputImageError(ValueError):
    """An input image that cannot be used; `field` names the request field (image, mask)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def read_input_image(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """Decode an uploaded PNG, JPEG or WebP, checking its size from the header before any pixel is decoded
    (a small file that declares a huge image never gets to allocate it); InputImageError otherwise."""
    if not data:
        raise InputImageError(field, "empty file")
    try:
        image = Image.open(io.BytesIO(data), formats=list(INPUT_FORMATS))
    except Image.UnidentifiedImageError:
        raise InputImageError(field, f"not an image in a supported format ({', '.join(INPUT_FORMATS)})") from None
    except Image.DecompressionBombError:  # PIL's own bound, far above any server's: a bomb
        raise InputImageError(
            field, f"declares more pixels than PIL decodes, over this server's limit of {max_pixels}"
        ) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise InputImageError(field, f"undecodable image ({e})") from None
    width, height = image.size
    if width < 1 or height < 1 or width * height > max_pixels:
        raise InputImageError(
            field, f"{width}x{height} is {width * height} pixels, over this server's limit of {max_pixels}"
        )
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputImageError(field, f"undecodable or truncated image ({e})") from None
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    return image


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)


def mask_from_alpha(image: Image.Image) -> Image.Image | None:
    """OpenAI's mask convention to diffusers': fully transparent pixels (alpha 0) mark the area to edit,
    as white in an L mask (white = repaint). None when the image has no transparent pixel."""
    if not has_alpha(image):
        return None
    alpha = np.asarray(image.convert("RGBA"))[..., 3]
    if not (alpha == 0).any():
        return None
    return Image.fromarray(np.where(alpha == 0, 255, 0).astype(np.uint8), mode="L")


def edit_mask(mask: Image.Image) -> Image.Image:
    """An uploaded mask as diffusers takes it (L, white = repaint): a mask with an alpha channel follows
    OpenAI (transparent = edit); one without is read as diffusers' black-and-white mask."""
    if has_alpha(mask):
        converted = mask_from_alpha(mask)
        if converted is None:
            raise InputImageError("mask", "no transparent pixel: nothing to edit (transparent marks the area to edit)")
        return converted
    return mask.convert("L")


def image_sha256(image: Image.Image) -> str:
    """sha256 of an input image's pixels (mode, size and raw bytes): the same picture in another lossless
    file hashes the same. What an edit's metadata records of its inputs (never the inputs themselves)."""
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()

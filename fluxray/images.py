"""Image files: PNG with every generation parameter as text metadata, JPEG and WebP."""

from __future__ import annotations

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

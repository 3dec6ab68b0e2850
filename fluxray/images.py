"""Image files: PNG with every generation parameter as text metadata, JPEG and WebP."""

from __future__ import annotations

import io
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
METADATA_KEY = "fluxray"


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

"""Images stored for response_format=url: an S3-compatible bucket (fluxray.storage) and presigned GET URLs."""

from __future__ import annotations

import uuid

from deployments.config import ObjectStoreConfig
from fluxray.images import EXTENSIONS, MEDIA_TYPES
from fluxray.storage import S3Storage


class ObjectStore:
    def __init__(self, config: ObjectStoreConfig):
        self.config = config
        self.storage = S3Storage(config.bucket, config.prefix, config.endpoint_url, region=config.region)

    def put(self, data: bytes, fmt: str) -> str:
        """Store one image under a fresh key; return a presigned URL to GET it."""
        name = f"{uuid.uuid4().hex}.{EXTENSIONS[fmt]}"
        self.storage.put(name, data, content_type=MEDIA_TYPES[fmt])
        return self.storage.presigned_url(name, self.config.url_expiry_s)

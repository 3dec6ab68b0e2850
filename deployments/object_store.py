"""Images stored for response_format=url: an S3-compatible bucket and presigned GET URLs."""

from __future__ import annotations

import uuid

from deployments.config import ObjectStoreConfig
from fluxray.images import EXTENSIONS, MEDIA_TYPES


class ObjectStore:
    def __init__(self, config: ObjectStoreConfig):
        import boto3
        from botocore.config import Config

        self.config = config
        self.client = boto3.client(
            "s3",
            endpoint_url=config.endpoint_url,
            region_name=config.region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}, signature_version="s3v4"),
        )

    def put(self, data: bytes, fmt: str) -> str:
        """Store one image under a fresh key; return a presigned URL to GET it."""
        key = f"{self.config.prefix}{uuid.uuid4().hex}.{EXTENSIONS[fmt]}"
        self.client.put_object(Bucket=self.config.bucket, Key=key, Body=data, ContentType=MEDIA_TYPES[fmt])
        return self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.config.bucket, "Key": key},
            ExpiresIn=self.config.url_expiry_s,
        )

"""Files under an s3:// prefix, listed and fetched into a local cache: what the engine reads from object
storage (LoRA files for now) goes through here.

The credentials are boto3's usual ones; the endpoint is the one given, else AWS_ENDPOINT_URL (any
S3-compatible store), else AWS's. A file is
fetched once per (key, ETag, size) into `cache_dir` (a temporary name, then renamed: a reader never sees half
a file), so a replica or an actor that needs it again reads the local copy.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class S3FileError(OSError):
    """An s3:// prefix or object that cannot be listed or fetched; the message names it."""


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key or prefix) of an s3:// URI."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise S3FileError(f"{uri}: not an s3://bucket/... URI")
    return bucket, key


class S3Folder:
    """The objects directly under one s3:// prefix."""

    def __init__(self, uri: str, cache_dir: str | Path | None = None, endpoint_url: str | None = None):
        import boto3

        self.uri = uri if uri.endswith("/") else uri + "/"
        self.bucket, self.prefix = split_uri(self.uri)
        endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self.client = boto3.client("s3", endpoint_url=endpoint)
        self.endpoint_url = endpoint
        default = Path(tempfile.gettempdir()) / "fluxray-s3-cache"
        self.cache_dir = Path(cache_dir) if cache_dir else default

    def names(self, suffix: str) -> list[str]:
        """The names (relative to the prefix) of the objects directly under it that end in `suffix`."""
        names = []
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix, Delimiter="/"
            )
            for page in pages:
                names += [o["Key"][len(self.prefix) :] for o in page.get("Contents", [])]
        except Exception as error:  # noqa: BLE001 - missing bucket, no access, unreachable: one line
            raise S3FileError(f"{self.uri}: cannot list ({type(error).__name__}: {error})") from None
        return sorted(n for n in names if n.endswith(suffix))

    def fetch(self, name: str, max_bytes: int | None = None) -> Path:
        """The object `name` as a local file (fetched unless the cache holds this version of it); S3FileError
        when it cannot be read or is larger than `max_bytes`."""
        key = self.prefix + name
        uri = f"s3://{self.bucket}/{key}"
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=key)
        except Exception as error:  # noqa: BLE001
            raise S3FileError(f"{uri}: cannot read ({type(error).__name__})") from None
        size = int(head["ContentLength"])
        if max_bytes is not None and size > max_bytes:
            raise S3FileError(f"{uri}: {size} bytes, over the {max_bytes} bytes allowed")
        version = hashlib.sha256(f"{uri}\n{head.get('ETag', '')}\n{size}".encode()).hexdigest()[:16]
        local = self.cache_dir / version / Path(key).name
        if local.is_file() and local.stat().st_size == size:
            return local
        local.parent.mkdir(parents=True, exist_ok=True)
        partial = local.with_name(f".{local.name}.{os.getpid()}.part")
        try:
            self.client.download_file(self.bucket, key, str(partial))
            os.replace(partial, local)
        except Exception as error:  # noqa: BLE001
            partial.unlink(missing_ok=True)
            raise S3FileError(f"{uri}: cannot fetch ({type(error).__name__}: {error})") from None
        return local

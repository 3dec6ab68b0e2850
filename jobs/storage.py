"""Where job input is read from and output written to: a local directory or an S3 prefix.

S3 goes through boto3 with retries; `AWS_ENDPOINT_URL` points it at any S3-compatible store. The
driver reads it once and hands it to every stage explicitly, because the workers of a cluster do not
inherit the driver's environment. Local writes are atomic: a temp file in the same directory, then a rename.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse


class StorageError(Exception):
    """An input or output location that cannot be used; the message names it."""


class LocalStorage:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.uri = str(self.root)

    def path(self, key: str) -> Path:
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key under a folder prefix, sorted (input files: their order fixes row ids' order)."""
        base = self.path(prefix) if prefix else self.root
        if base.is_file():
            yield prefix
            return
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.startswith("."):
                yield path.relative_to(self.root).as_posix()

    def scan(self, prefix: str) -> Iterator[str]:
        """Every key starting with prefix, streamed in no particular order: a folder of a million
        files is never held (or sorted) in memory."""
        folder, _, start = prefix.rpartition("/")
        base = self.path(folder) if folder else self.root
        stack = [base] if base.is_dir() else []
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(Path(entry.path))
                        continue
                    key = Path(entry.path).relative_to(self.root).as_posix()
                    if key.startswith(prefix):
                        yield key

    def open_binary(self, key: str):
        return self.path(key).open("rb")


class S3Storage:
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None):
        import boto3
        from botocore.config import Config

        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}"
        self.client = boto3.client(
            "s3",
            endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            config=Config(retries={"max_attempts": 10, "mode": "adaptive"}),
        )

    def key(self, key: str) -> str:
        return f"{self.prefix}{key}" if key else self.prefix.rstrip("/")

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(key))
            return True
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def get(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.key(key))["Body"].read()

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        extra = {"ContentType": content_type} if content_type else {}
        self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data, **extra)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(key))

    def list(self, prefix: str = "") -> Iterator[str]:
        """Every key starting with prefix, in S3's (sorted) order, a page of 1000 at a time."""
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self.key(prefix)):
            for item in page.get("Contents", []):
                yield item["Key"][len(self.prefix) :]

    def scan(self, prefix: str) -> Iterator[str]:
        return self.list(prefix)

    def open_binary(self, key: str):
        body = self.client.get_object(Bucket=self.bucket, Key=self.key(key))["Body"]
        return io.BufferedReader(_BodyReader(body), buffer_size=1 << 20)


class _BodyReader(io.RawIOBase):
    """botocore's StreamingBody as a real binary stream, so io.TextIOWrapper can decode it."""

    def __init__(self, body):
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.body.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self.body.close()
        super().close()


def open_storage(uri: str, endpoint_url: str | None = None) -> LocalStorage | S3Storage:
    """The storage rooted at uri: `s3://bucket/prefix` or a local directory path."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise StorageError(f"{uri}: an s3:// URI needs a bucket")
        prefix = parsed.path.lstrip("/")
        return S3Storage(parsed.netloc, prefix if not prefix or prefix.endswith("/") else prefix + "/", endpoint_url)
    if "://" in uri:
        raise StorageError(f"{uri}: only local paths and s3:// URIs are supported")
    return LocalStorage(uri)


def split_input_uri(uri: str, endpoint_url: str | None = None) -> tuple[LocalStorage | S3Storage, list[str]]:
    """The storage and the input file keys under uri (a single file, or every file below a prefix)."""
    if uri.startswith("s3://"):
        parsed = urlparse(uri)
        key = parsed.path.lstrip("/")
        # Keys are relative to the input's own folder, so row ids do not depend on where it lives.
        if key and not key.endswith("/"):
            folder, _, name = key.rpartition("/")
            storage = S3Storage(parsed.netloc, f"{folder}/" if folder else "", endpoint_url)
            if storage.exists(name):
                return storage, [name]
            key += "/"
        storage = S3Storage(parsed.netloc, key, endpoint_url)
        keys = [k for k in storage.list() if k and not k.endswith("/")]
    else:
        path = Path(uri)
        if path.is_file():
            return LocalStorage(path.parent), [path.name]
        if not path.is_dir():
            raise StorageError(f"{uri}: no such file or directory")
        storage = LocalStorage(path)
        keys = list(storage.list())
    if not keys:
        raise StorageError(f"{uri}: no input files found")
    return storage, keys

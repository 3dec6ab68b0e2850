"""Object storage, one place for all of it: local directories and S3 prefixes (the offline job's input
and output), files under an s3:// prefix fetched into a local cache (the engine's LoRA files), and
uploads with presigned URLs (the ingress's `response_format=url`).

Every S3 client comes from `s3_client`: boto3's usual credentials, one retry policy (adaptive, 10
attempts: a flaky store costs retries, not data), SigV4 signing. The endpoint is the one given, else
`AWS_ENDPOINT_URL` (any S3-compatible store), else AWS's; `endpoint_from_env` is the one place it is
read, and the job's driver reads it once and hands it to every stage explicitly, because the workers of
a cluster do not inherit the driver's environment. Local writes are atomic: a temp file in the same
directory, then a rename; so are cache fills.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

RETRIES = {"max_attempts": 10, "mode": "adaptive"}


def endpoint_from_env() -> str | None:
    """The S3 API endpoint this process was told to use (AWS_ENDPOINT_URL), or None for AWS's."""
    return os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint_url: str | None = None, region: str | None = None):
    """A boto3 S3 client with the project's retry policy, at `endpoint_url` (else AWS_ENDPOINT_URL)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or endpoint_from_env(),
        region_name=region,
        config=Config(retries=dict(RETRIES), signature_version="s3v4"),  # botocore rewrites the dict it gets
    )


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
    def __init__(self, bucket: str, prefix: str, endpoint_url: str | None = None, region: str | None = None):
        self.bucket, self.prefix = bucket, prefix
        self.uri = f"s3://{bucket}/{prefix}"
        self.client = s3_client(endpoint_url, region)

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

    def presigned_url(self, key: str, expires_s: int) -> str:
        """A URL that GETs the object for `expires_s` seconds, with no credentials."""
        return self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self.key(key)}, ExpiresIn=expires_s
        )


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


# --- files under an s3:// prefix, fetched into a local cache -----------------------------------


class S3FileError(OSError):
    """An s3:// prefix or object that cannot be listed or fetched; the message names it."""


def split_uri(uri: str) -> tuple[str, str]:
    """(bucket, key or prefix) of an s3:// URI."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise S3FileError(f"{uri}: not an s3://bucket/... URI")
    return bucket, key


class S3Folder:
    """The objects directly under one s3:// prefix, each fetched once per (key, ETag, size) into
    `cache_dir` (a temporary name, then renamed: a reader never sees half a file), so a replica or an
    actor that needs it again reads the local copy."""

    def __init__(self, uri: str, cache_dir: str | Path | None = None, endpoint_url: str | None = None):
        self.uri = uri if uri.endswith("/") else uri + "/"
        self.bucket, self.prefix = split_uri(self.uri)
        self.endpoint_url = endpoint_url or endpoint_from_env()
        self.client = s3_client(self.endpoint_url)
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

"""fluxray.storage, the one place for object storage, against a real S3 API server on loopback (moto's):
what the job writes and lists, what the engine fetches into its cache, what the ingress presigns, all
through one client factory with one retry policy."""

from __future__ import annotations

import httpx
import pytest
from moto.server import ThreadedMotoServer

from cluster.ray_head import free_port
from fluxray.storage import (
    RETRIES,
    S3FileError,
    S3Folder,
    S3Storage,
    StorageError,
    endpoint_from_env,
    open_storage,
    s3_client,
)


@pytest.fixture(scope="module")
def endpoint():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    url = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ACCESS_KEY_ID", "test")
        env.setenv("AWS_SECRET_ACCESS_KEY", "test")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3_client(url).create_bucket(Bucket="fluxray-test")
        yield url
    server.stop()


def test_every_client_has_the_one_retry_policy_and_the_environments_endpoint(endpoint, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    assert endpoint_from_env() == endpoint
    client = s3_client()
    assert client.meta.endpoint_url == endpoint
    # botocore counts the first try in total_max_attempts: 10 retries are 11 attempts.
    assert client.meta.config.retries == {"mode": RETRIES["mode"], "total_max_attempts": RETRIES["max_attempts"] + 1}
    assert RETRIES == {"max_attempts": 10, "mode": "adaptive"}
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert endpoint_from_env() is None


def test_a_prefix_written_listed_read_and_presigned(endpoint):
    storage = open_storage("s3://fluxray-test/run", endpoint)
    assert isinstance(storage, S3Storage) and storage.prefix == "run/"
    storage.put("images/a.png", b"\x89PNG one", content_type="image/png")
    storage.put("images/b.png", b"\x89PNG two")
    assert list(storage.list("images/")) == ["images/a.png", "images/b.png"]
    assert storage.exists("images/a.png") and not storage.exists("images/c.png")
    assert storage.get("images/b.png") == b"\x89PNG two"
    # A presigned URL: SigV4 in its query, expiring when asked, and a plain GET of it reads the object
    # (moto's server does not check signatures: AWS's rejection of a tampered URL is not tested here).
    url = httpx.URL(storage.presigned_url("images/a.png", 60))
    assert url.path == "/fluxray-test/run/images/a.png"
    assert url.params["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and url.params["X-Amz-Expires"] == "60"
    got = httpx.get(url, timeout=10)
    assert got.status_code == 200 and got.content == b"\x89PNG one"
    assert got.headers["content-type"] == "image/png"
    with pytest.raises(StorageError, match="only local paths and s3://"):
        open_storage("gs://b/run")


def test_a_folder_fetches_each_version_once_into_its_cache(endpoint, tmp_path):
    storage = open_storage("s3://fluxray-test/loras/", endpoint)
    storage.put("ink.safetensors", b"first")
    storage.put("notes.txt", b"not a lora")
    folder = S3Folder("s3://fluxray-test/loras", cache_dir=tmp_path, endpoint_url=endpoint)
    assert folder.names(".safetensors") == ["ink.safetensors"]
    local = folder.fetch("ink.safetensors")
    assert local.read_bytes() == b"first" and local.is_relative_to(tmp_path)
    assert folder.fetch("ink.safetensors") == local  # cached: the same file, not fetched again
    storage.put("ink.safetensors", b"second version")  # a new ETag and size: a new cache entry
    newer = folder.fetch("ink.safetensors")
    assert newer != local and newer.read_bytes() == b"second version"
    with pytest.raises(S3FileError, match="over the 4 bytes allowed"):
        folder.fetch("notes.txt", max_bytes=4)
    with pytest.raises(S3FileError, match="cannot read"):
        folder.fetch("missing.safetensors")

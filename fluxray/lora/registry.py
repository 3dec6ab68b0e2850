"""The adapters a server or a job may load, by name (requests and rows name adapters; they never point at
files or URLs)."""

from __future__ import annotations

from pathlib import Path

from fluxray.lora.adapters import MAX_FILE_BYTES, LoraError
from fluxray.models.sources import EMBEDDED_LORA_ROOTS
from fluxray.storage import S3FileError, S3Folder


class LoraRegistry:
    """The adapters a server may load, by name: each `*.safetensors` directly in `root` (named by its stem; a
    directory, an s3:// prefix, or `tiny` for the embedded tiny model's) and the `files` given by name (paths
    or s3:// URIs). Requests name adapters; they never point at files or URLs. A file on S3 is fetched into a
    local cache when first needed (`path`)."""

    def __init__(
        self, root: str | Path | None = None, files: dict[str, str] | None = None, endpoint_url: str | None = None
    ):
        self.files: dict[str, str] = {}
        self.endpoint_url = endpoint_url  # of the S3 API (else AWS_ENDPOINT_URL, else AWS's)
        if root and str(root).startswith("s3://"):
            try:
                folder = S3Folder(str(root), endpoint_url=endpoint_url)
                self.files.update({Path(n).stem: folder.uri + n for n in folder.names(".safetensors")})
            except S3FileError as error:
                raise LoraError(f"lora_root {error}") from None
        elif root:
            # An embedded model's name is its adapters (`tiny`: fluxray/tiny/loras/); `./tiny` is a directory.
            folder = EMBEDDED_LORA_ROOTS.get(str(root), Path(root))
            if not folder.is_dir():
                raise LoraError(f"lora_root {root}: no such directory")
            self.files.update({p.stem: str(p) for p in sorted(folder.glob("*.safetensors"))})
        for name, path in (files or {}).items():
            self.files[name] = str(path)

    def names(self) -> list[str]:
        return sorted(self.files)

    def __bool__(self) -> bool:
        return bool(self.files)

    def path(self, name: str) -> Path:
        """The adapter's local file (fetched from S3 first if it lives there: call it off the event loop)."""
        try:
            where = self.files[name]
        except KeyError:
            raise LoraError(f"unknown LoRA {name!r}") from None
        if not where.startswith("s3://"):
            return Path(where)
        folder, _, file = where.rpartition("/")
        try:
            return S3Folder(folder, endpoint_url=self.endpoint_url).fetch(file, MAX_FILE_BYTES)
        except S3FileError as error:
            raise LoraError(str(error)) from None

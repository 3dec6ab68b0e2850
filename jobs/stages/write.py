"""The write stage: each image, then its metadata, to the job's output (local or S3)."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor

from fluxray.images import MEDIA_TYPES
from fluxray.storage import open_storage
from jobs.layout import image_key, metadata_key, metadata_prefix, parse_metadata_key
from jobs.stages.base import Stage, fail_row, inject_faults
from jobs.stages.schema import EDIT_RECORD, WRITTEN_SCHEMA


class WriteStage(Stage):
    """Writes each image, then its metadata: a metadata object always means a complete record whose
    sha256 is its image's. A row regenerated with --overwrite first loses its old metadata (and an
    old image of another format), so no image is ever described by another image's metadata."""

    name, schema = "write", WRITTEN_SCHEMA

    def __init__(self, output: str, endpoint_url: str | None, model_name: str, model_identity: str, output_format: str):
        self.storage = open_storage(output, endpoint_url)
        self.model_name, self.model_identity, self.output_format = model_name, model_identity, output_format
        self.pool = ThreadPoolExecutor(8)

    def _forget_previous(self, row_id: str, keep: str) -> None:
        for key in list(self.storage.scan(metadata_prefix(row_id))):
            parsed = parse_metadata_key(key)
            if parsed is None or parsed[0] != row_id or key == keep:
                continue
            previous_image = json.loads(self.storage.get(key)).get("image")
            self.storage.delete(key)
            if previous_image and previous_image != image_key(row_id, self.output_format):
                self.storage.delete(previous_image)

    def _write(self, row: dict) -> None:
        image, meta = image_key(row["id"], self.output_format), metadata_key(row["id"], row["fingerprint"])
        try:
            inject_faults("write", [row])
            if row["overwrite"]:
                self._forget_previous(row["id"], keep=meta)
            self.storage.put(image, row["image_bytes"], MEDIA_TYPES[self.output_format])
            record = {
                **{k: row[k] for k in ("id", "prompt", "prompt_2", "negative_prompt", "seed", "width", "height")},
                **{k: row[k] for k in ("steps", "guidance", "true_cfg_scale", "fingerprint", "sha256", "source")},
                "model": self.model_name,
                "model_identity": self.model_identity,
                "image": image,
                "format": self.output_format,
                "truncated": row["truncated"].split(",") if row["truncated"] else [],
                **{k: row[k] for k in EDIT_RECORD if row["input_image"] is not None},
                **({"loras": json.loads(row["loras"])} if row["loras"] else {}),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self.storage.put(meta, json.dumps(record, sort_keys=True).encode(), "application/json")
            row["status"], row["image"], row["metadata"] = "written", image, meta
        except Exception as error:  # noqa: BLE001 - after the storage's own retries
            fail_row(row, "write", error)

    def run(self, rows: list[dict]) -> None:
        """Each pending row written on its own (a failed write fails that row only), in parallel."""
        pending = [row for row in rows if row["status"] == "pending"]
        list(self.pool.map(self._write, pending))
        for row in rows:
            if row["status"] == "failed":
                row["sha256"] = None

"""The job's stages: a prompt datasource, then Ray Data actor pools that encode, denoise, decode
and write. Every row travels through every stage; a stage works only on rows still 'pending' and
passes the others (skipped, invalid, failed) on, so the last stage's output is the manifest.

Batches are numpy dicts. A stage that fails on a batch marks that batch's pending rows failed with
the reason instead of failing the job: one bad batch costs its rows, never the others.
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import groupby

import numpy as np
import pyarrow as pa
import torch
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from fluxray.acceleration import SpeedOptions
from fluxray.images import EXTENSIONS, MEDIA_TYPES, encode_image
from fluxray.pipeline import denoise_task, image_metadata, stage_runtime
from fluxray.sampling import denoise
from fluxray.sources import load_transformer
from fluxray.text_encoding import PromptEmbeds, TextEncoder
from fluxray.vae import VAEDecoder
from jobs.prompts import RECORD_FIELDS, JobDefaults, params_of, records
from jobs.storage import open_storage

MANIFEST_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("status", pa.string()),
        ("reason", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("steps", pa.int64()),
        ("guidance", pa.float64()),
        ("image", pa.string()),
        ("sha256", pa.string()),
    ]
)
RECORD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("prompt", pa.string()),
        ("prompt_2", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("steps", pa.int64()),
        ("guidance", pa.float64()),
        ("true_cfg_scale", pa.float64()),
        ("status", pa.string()),
        ("reason", pa.string()),
    ]
)


def image_key(row_id: str, fmt: str) -> str:
    return f"images/{row_id}.{EXTENSIONS[fmt]}"


def metadata_key(row_id: str) -> str:
    return f"metadata/{row_id}.json"


class PromptDatasource(Datasource):
    """One read task per input file, streaming its records in blocks."""

    def __init__(
        self,
        input_root: str,
        files: list[tuple[str, int]],
        defaults: JobDefaults,
        endpoint_url: str | None = None,
        block_rows: int = 512,
    ):
        self.input_root, self.files, self.defaults = input_root, files, defaults
        self.endpoint_url, self.block_rows = endpoint_url, block_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        tasks = []
        for key, limit in self.files:

            def read(key=key, limit=limit):
                storage = open_storage(self.input_root, self.endpoint_url)
                block = []
                for record in records(storage, key, self.defaults, limit):
                    block.append(record)
                    if len(block) >= self.block_rows:
                        yield pa.Table.from_pylist(block, schema=RECORD_SCHEMA)
                        block = []
                if block:
                    yield pa.Table.from_pylist(block, schema=RECORD_SCHEMA)

            meta = BlockMetadata(num_rows=limit, size_bytes=None, exec_stats=None, input_files=(key,))
            tasks.append(ReadTask(read, meta, schema=RECORD_SCHEMA))
        return tasks


def _pending(batch: dict) -> np.ndarray:
    return np.flatnonzero(batch["status"] == "pending")


def _missing(value) -> bool:
    # Between stages Ray Data turns a column of nothing but None into float NaN.
    return value is None or (isinstance(value, (float, np.floating)) and value != value)


def _value(value):
    # numpy scalars (np.str_, np.int64) become Python values: tokenizers and JSON want those.
    if _missing(value):
        return None
    return value.item() if isinstance(value, np.generic) else value


def _row(batch: dict, i: int) -> dict:
    return {k: _value(batch[k][i]) for k in RECORD_FIELDS}


def _rows(batch: dict, index) -> list[dict]:
    return [_row(batch, i) for i in index]


def _fail(batch: dict, index, stage: str, error: BaseException) -> dict:
    batch["status"] = batch["status"].astype(object)
    batch["reason"] = batch["reason"].astype(object)
    for i in index:
        batch["status"][i] = "failed"
        batch["reason"][i] = f"{stage}: {type(error).__name__}: {error}"[:500]
    return batch


def _objects(n: int) -> np.ndarray:
    return np.full(n, None, dtype=object)


class SkipWritten:
    """Marks pending rows whose metadata already exists: a finished record from an earlier run."""

    def __init__(self, output: str, endpoint_url: str | None):
        self.storage = open_storage(output, endpoint_url)
        self.pool = ThreadPoolExecutor(16)

    def __call__(self, batch: dict) -> dict:
        index = _pending(batch)
        found = list(self.pool.map(lambda i: self.storage.exists(metadata_key(batch["id"][i])), index))
        batch["status"] = batch["status"].astype(object)
        batch["reason"] = batch["reason"].astype(object)
        for i, exists in zip(index, found):
            if exists:
                batch["status"][i], batch["reason"][i] = "skipped", "already written"
        return batch


class EncodeStage:
    def __init__(
        self, model: str, device: str, dtype: str | None, threads: int | None, speed: SpeedOptions | None = None
    ):
        self.encoder = TextEncoder.load(*stage_runtime(model, device, dtype, threads), speed)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        for column in ("pooled", "sequence", "neg_pooled", "neg_sequence"):
            batch[column] = _objects(n)
        index = _pending(batch)
        if len(index) == 0:
            return batch
        try:
            rows = _rows(batch, index)
            embeds = self.encoder.encode([r["prompt"] for r in rows], [r["prompt_2"] for r in rows])
            cfg = [k for k, r in enumerate(rows) if r["negative_prompt"] and r["true_cfg_scale"] > 1]
            negatives = self.encoder.encode([rows[k]["negative_prompt"] for k in cfg]) if cfg else None
        except Exception as error:  # noqa: BLE001
            return _fail(batch, index, "encode", error)
        for k, i in enumerate(index):
            batch["pooled"][i] = embeds.pooled[k].float().cpu().numpy()
            batch["sequence"][i] = embeds.sequence[k].float().cpu().numpy()
        for j, k in enumerate(cfg):
            batch["neg_pooled"][index[k]] = negatives.pooled[j].float().cpu().numpy()
            batch["neg_sequence"][index[k]] = negatives.sequence[j].float().cpu().numpy()
        return batch


class DenoiseStage:
    def __init__(
        self,
        model: str,
        device: str,
        dtype: str | None,
        threads: int | None,
        output_format: str,
        speed: SpeedOptions | None = None,
    ):
        self.source, self.device, self.dtype = stage_runtime(model, device, dtype, threads)
        self.transformer = load_transformer(self.source, self.device, self.dtype, speed)
        self.output_format = output_format

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        latents = _objects(n)
        index = _pending(batch)
        try:
            tasks = {}
            for i in index:
                params = params_of(_row(batch, i), self.output_format)
                embeds = PromptEmbeds(
                    torch.from_numpy(batch["pooled"][i])[None], torch.from_numpy(batch["sequence"][i])[None]
                )
                negative = None
                if not _missing(batch["neg_pooled"][i]):
                    negative = PromptEmbeds(
                        torch.from_numpy(batch["neg_pooled"][i])[None], torch.from_numpy(batch["neg_sequence"][i])[None]
                    )
                tasks[i] = denoise_task(params, embeds, negative, self.source.spec, self.device, self.dtype)
            # Rows of one size share each transformer call; each keeps its own steps and guidance.
            by_size = sorted(index, key=lambda i: (batch["height"][i], batch["width"][i]))
            for (height, width), group in groupby(by_size, key=lambda i: (batch["height"][i], batch["width"][i])):
                group = list(group)
                denoise(self.transformer, [tasks[i] for i in group], int(height), int(width))
            for i in index:
                latents[i] = tasks[i].latents.float().cpu().numpy()
        except Exception as error:  # noqa: BLE001
            batch = _fail(batch, index, "denoise", error)
        for column in ("pooled", "sequence", "neg_pooled", "neg_sequence"):
            del batch[column]
        batch["latents"] = latents
        return batch


class DecodeStage:
    def __init__(
        self,
        model: str,
        device: str,
        dtype: str | None,
        threads: int | None,
        output_format: str,
        speed: SpeedOptions | None = None,
    ):
        self.source, dev, torch_dtype = stage_runtime(model, device, dtype, threads)
        self.decoder = VAEDecoder.load(self.source, dev, torch_dtype, speed)
        self.output_format = output_format

    def __call__(self, batch: dict) -> dict:
        n = len(batch["id"])
        images, digests = _objects(n), np.full(n, "", dtype=object)
        index = [i for i in _pending(batch) if not _missing(batch["latents"][i])]
        try:
            by_size = sorted(index, key=lambda i: (batch["height"][i], batch["width"][i]))
            for (height, width), group in groupby(by_size, key=lambda i: (batch["height"][i], batch["width"][i])):
                group = list(group)
                stacked = torch.from_numpy(np.stack([batch["latents"][i] for i in group]))
                pixels = self.decoder.decode(stacked.reshape(len(group), *stacked.shape[-2:]), int(height), int(width))
                for k, i in enumerate(group):
                    params = params_of(_row(batch, i), self.output_format)
                    meta = image_metadata(params, params.seed, self.source.name)
                    data = encode_image(pixels[k].numpy(), self.output_format, meta)
                    images[i], digests[i] = data, hashlib.sha256(data).hexdigest()
        except Exception as error:  # noqa: BLE001
            batch = _fail(batch, index, "decode", error)
        del batch["latents"]
        batch["image_bytes"], batch["sha256"] = images, digests
        return batch


class WriteStage:
    """Writes each image, then its metadata: a metadata object always means a complete record."""

    def __init__(self, output: str, endpoint_url: str | None, model_name: str, output_format: str):
        self.storage = open_storage(output, endpoint_url)
        self.model_name, self.output_format = model_name, output_format
        self.pool = ThreadPoolExecutor(8)

    def _write(self, row: dict, data: bytes, digest: str) -> tuple[str, str]:
        key = image_key(row["id"], self.output_format)
        try:
            self.storage.put(key, data, MEDIA_TYPES[self.output_format])
            meta = {
                "id": row["id"],
                "prompt": row["prompt"],
                "prompt_2": row["prompt_2"],
                "negative_prompt": row["negative_prompt"],
                "seed": int(row["seed"]),
                "width": int(row["width"]),
                "height": int(row["height"]),
                "steps": int(row["steps"]),
                "guidance": float(row["guidance"]),
                "true_cfg_scale": float(row["true_cfg_scale"]),
                "model": self.model_name,
                "image": key,
                "format": self.output_format,
                "sha256": digest,
                "source": row["source"],
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self.storage.put(metadata_key(row["id"]), json.dumps(meta, sort_keys=True).encode(), "application/json")
            return "written", ""
        except Exception as error:  # noqa: BLE001 - after the storage's own retries
            return "failed", f"write: {type(error).__name__}: {error}"[:500]

    def __call__(self, batch: dict) -> pa.Table:
        n = len(batch["id"])
        batch["status"] = batch["status"].astype(object)
        batch["reason"] = batch["reason"].astype(object)
        image_keys = np.full(n, "", dtype=object)
        index = [i for i in _pending(batch) if not _missing(batch["image_bytes"][i])]
        rows = _rows(batch, index)
        results = self.pool.map(
            lambda k: self._write(rows[k], batch["image_bytes"][index[k]], batch["sha256"][index[k]]), range(len(index))
        )
        for i, (status, reason) in zip(index, results):
            batch["status"][i], batch["reason"][i] = status, reason
            image_keys[i] = image_key(batch["id"][i], self.output_format) if status == "written" else ""
        for i in _pending(batch):  # pending without an image: an earlier stage lost it
            batch["status"][i], batch["reason"][i] = "failed", "no image was produced"
        batch["image"] = image_keys

        def column(name: str) -> list:
            return [_value(v) for v in batch[name]]

        return pa.table({f.name: column(f.name) for f in MANIFEST_SCHEMA}, schema=MANIFEST_SCHEMA)

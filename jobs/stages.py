"""The job's stages: a prompt datasource, then Ray Data actor pools that encode, denoise, decode
and write. Only the rows the plan marked for this pass enter; a stage works on rows still
'pending' and passes failed ones on, so the last stage's output is those rows' manifest entries.

Batches are pyarrow tables, and every stage returns its own fixed schema whatever mix of pending
and failed rows a batch holds: a column never depends on a block's contents (a column that held
nothing but nulls in one block once failed to unify with the same column holding tensors in
another). Tensors travel as safetensors bytes in the model's dtype (bfloat16 on GPUs).

An edit row (an `image`, fluxray.editing) has its input read and VAE-encoded in the encode stage, which
passes the latent distributions on as safetensors bytes; the denoise stage makes its edit task from them.

A stage that raises on a batch splits it in halves until the rows that raise are found: only they
are failed, with the reason. A row that kills its worker process is the driver's to find
(jobs.generate): Ray Data drops that batch after --max-retries, and the driver runs its rows again
in smaller batches.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import torch
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from fluxray.acceleration import SpeedOptions
from fluxray.editing import EncodedEdit, edit_method, edit_task, prepare_edit, read_edit_inputs
from fluxray.embeds import PromptEmbeds
from fluxray.images import (
    MEDIA_TYPES,
    InputImageError,
    encode_image,
    image_metadata,
    image_sha256,
)
from fluxray.lora import MAX_LORAS_PER_ROW, LoraRegistry, LoraSlots, read_lora
from fluxray.lora_cache import HostCache, LoraResidency, make_room
from fluxray.runtime import stage_runtime
from fluxray.sampling import denoise, denoise_task, group_by_size
from fluxray.storage import open_storage
from fluxray.text_encoding import TextEncoder
from fluxray.transformer import load_transformer
from fluxray.vae import VAEDecoder, VAEEncoder
from jobs.layout import image_key, metadata_key, metadata_prefix, parse_metadata_key
from jobs.manifest import MANIFEST_SCHEMA
from jobs.plan import OVERWRITE, FilePlan
from jobs.prompts import JobDefaults, params_of, records

# Tests only: "stage:action:MARKER,...": a pending row whose prompt holds MARKER makes that stage
# raise (action "raise") or kill its own worker process (action "kill"), as a bad kernel would.
FAULTS_ENV = "FLUXRAY_JOB_FAULTS"
STAGE_NAMES = ("encode", "denoise", "decode", "write")
TIMES = [(f"{stage}_s", pa.float64()) for stage in STAGE_NAMES]  # each row's share of its batches' time
ZERO_TIMES = {name: 0.0 for name, _ in TIMES}
POSITION = [("file", pa.int64()), ("row", pa.int64())]  # where the row is in the plan
RECORD = [
    *POSITION,
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
    ("input_image", pa.string()),  # an edit's input: a key under the input's folder, or an s3:// URI
    ("input_mask", pa.string()),
    ("strength", pa.float64()),
    ("loras", pa.string()),  # JSON text of the row's [{name, scale}] (jobs.prompts), or null
    ("image_sha256", pa.string()),  # of the input's pixels (fluxray.images.image_sha256), once read
    ("mask_sha256", pa.string()),
    ("fingerprint", pa.string()),
    ("overwrite", pa.bool_()),
    ("truncated", pa.string()),  # the encoders that read only the start of the prompt, comma-separated
    ("status", pa.string()),
    ("reason", pa.string()),
    *TIMES,
]
RECORD_SCHEMA = pa.schema(RECORD)
# An edit row's encoded input: its latent distributions (safetensors bytes, pack_edit) and its method.
ENCODED_SCHEMA = pa.schema([*RECORD, ("embeds", pa.binary()), ("edit", pa.binary()), ("edit_method", pa.string())])
DENOISED_SCHEMA = pa.schema([*RECORD, ("latents", pa.binary())])
# What an edit's metadata adds: its inputs (as the row named them), their pixels' sha256 and the strength.
EDIT_RECORD = ("input_image", "input_mask", "strength", "image_sha256", "mask_sha256")


# Host memory per denoise actor for LoRAs evicted from the device (fluxray.lora_cache.HostCache).
LORA_HOST_CACHE_BYTES = 2 << 30
DECODED_SCHEMA = pa.schema([*RECORD, ("image_bytes", pa.binary()), ("sha256", pa.string())])
WRITTEN_SCHEMA = pa.schema([*POSITION, *MANIFEST_SCHEMA, *TIMES])


class PromptDatasource(Datasource):
    """One read task per input file, streaming the records its plan marks for this pass."""

    def __init__(
        self,
        input_root: str,
        plans: list[FilePlan],
        defaults: JobDefaults,
        endpoint_url: str | None = None,
        block_rows: int = 8,
    ):
        self.input_root, self.plans, self.defaults = input_root, plans, defaults
        self.endpoint_url, self.block_rows = endpoint_url, block_rows

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None):
        tasks = []
        for number, plan in enumerate(self.plans):
            if not plan.pending:
                continue

            def read(number=number, plan=plan):
                storage = open_storage(self.input_root, self.endpoint_url)
                block = []
                for row, record in enumerate(records(storage, plan.key, self.defaults, len(plan.codes))):
                    if not plan.codes[row]:
                        continue
                    overwrite = plan.codes[row] == OVERWRITE
                    row_fields = {**ZERO_TIMES, "file": number, "row": row, "overwrite": overwrite}
                    block.append({**record, **row_fields, "image_sha256": None, "mask_sha256": None})
                    if len(block) >= self.block_rows:
                        yield pa.Table.from_pylist(block, schema=RECORD_SCHEMA)
                        block = []
                if block:
                    yield pa.Table.from_pylist(block, schema=RECORD_SCHEMA)

            meta = BlockMetadata(num_rows=plan.pending, size_bytes=None, exec_stats=None, input_files=(plan.key,))
            tasks.append(ReadTask(read, meta, schema=RECORD_SCHEMA))
        return tasks


def _fail(row: dict, stage: str, error: BaseException) -> None:
    row["status"], row["reason"] = "failed", f"{stage}: {type(error).__name__}: {error}"[:500]


def _inject_faults(stage: str, rows: list[dict]) -> None:
    for spec in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
        where, action, marker = spec.split(":", 2)
        if where == stage and any(marker in row["prompt"] for row in rows):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault {marker!r}")


def _run_split(stage: str, rows: list[dict], work: Callable[[list[dict]], None]) -> None:
    """work(rows) on the pending rows; where it raises, halves until only the rows that raise on
    their own are failed (a bad prompt or an out-of-memory batch costs no other row)."""

    def attempt(part: list[dict]) -> None:
        try:
            _inject_faults(stage, part)
            work(part)
        except Exception as error:  # noqa: BLE001 - recorded as the row's reason
            if len(part) == 1:
                _fail(part[0], stage, error)
                return
            attempt(part[: len(part) // 2])
            attempt(part[len(part) // 2 :])

    pending = [row for row in rows if row["status"] == "pending"]
    if pending:
        attempt(pending)


def _timed(stage: str, schema: pa.Schema, rows: list[dict], started: float) -> pa.Table:
    share = (time.perf_counter() - started) / max(len(rows), 1)
    for row in rows:
        row[f"{stage}_s"] += share
    return pa.Table.from_pylist(rows, schema=schema)


def _by_size(rows: list[dict]) -> list[tuple[tuple[int, int], list[dict]]]:
    return group_by_size(rows, lambda r: (r["height"], r["width"]))


def read_input(uri: str, input_root: str, endpoint_url: str | None, field: str) -> bytes:
    """An edit's input file: an s3:// URI as it is, anything else a key under the input's folder;
    InputImageError naming the field and the file when it cannot be read."""
    try:
        if uri.startswith("s3://"):
            folder, _, name = uri.removeprefix("s3://").rpartition("/")
            return open_storage(f"s3://{folder}/", endpoint_url).get(name)
        return open_storage(input_root, endpoint_url).get(uri)
    except Exception as error:  # noqa: BLE001 - missing, forbidden, unreachable: the row's reason
        raise InputImageError(field, f"cannot read {uri} ({type(error).__name__})") from None


def pack_edit(encoded: EncodedEdit) -> bytes:
    """An encoded edit's tensors as safetensors bytes (its method travels in the row's edit_method)."""
    tensors = {"image_moments": encoded.image_moments}
    if encoded.mask is not None:
        tensors["mask"] = encoded.mask
    if encoded.masked_moments is not None:
        tensors["masked_moments"] = encoded.masked_moments
    return save_tensors({k: t.contiguous() for k, t in tensors.items()})


def unpack_edit(data: bytes, method: str) -> EncodedEdit:
    tensors = load_tensors(data)
    return EncodedEdit(method, tensors["image_moments"], tensors.get("mask"), tensors.get("masked_moments"))


class EncodeStage:
    def __init__(
        self,
        model: str,
        device: str,
        dtype: str | None,
        threads: int | None,
        speed: SpeedOptions | None = None,
        input_root: str = "",
        endpoint_url: str | None = None,
    ):
        self.source, self.device, self.dtype = stage_runtime(model, device, dtype, threads)
        self.encoder = TextEncoder.load(self.source, self.device, self.dtype, speed)
        self.speed, self.input_root, self.endpoint_url = speed, input_root, endpoint_url
        self.image_encoder: VAEEncoder | None = None  # loaded with the first edit row

    def _edit(self, row: dict) -> tuple[bytes, str]:
        """An edit row's input, read, checked and through the VAE's encoder (its sha256s set on the row):
        the packed latent distributions and the edit's method."""
        spec = self.source.spec
        image_data = read_input(row["input_image"], self.input_root, self.endpoint_url, "image")
        mask_data = None
        if row["input_mask"] is not None:
            mask_data = read_input(row["input_mask"], self.input_root, self.endpoint_url, "mask")
        image, mask = read_edit_inputs(spec, image_data, mask_data)
        if mask is not None:
            row["mask_sha256"] = image_sha256(mask)
        row["image_sha256"] = image_sha256(image)
        method = edit_method(spec, mask is not None, None if spec.edit == "kontext" else row["strength"])
        if self.image_encoder is None:
            self.image_encoder = VAEEncoder.load(self.source, self.device, self.dtype, self.speed)
        inputs = prepare_edit(spec, method, image, mask, int(row["width"]), int(row["height"]))
        return pack_edit(self.image_encoder.encode(inputs)), method

    def _encode(self, rows: list[dict]) -> None:
        embeds = self.encoder.encode([r["prompt"] for r in rows], [r["prompt_2"] for r in rows])
        cfg = [k for k, r in enumerate(rows) if r["negative_prompt"] and r["true_cfg_scale"] > 1]
        negatives = self.encoder.encode([rows[k]["negative_prompt"] for k in cfg]) if cfg else None
        for k, row in enumerate(rows):
            row["truncated"] = ",".join(self.encoder.length.truncated(row["prompt"], row["prompt_2"]))
            tensors = {"pooled": embeds.pooled[k], "sequence": embeds.sequence[k]}
            if k in cfg:
                j = cfg.index(k)
                tensors |= {"neg_pooled": negatives.pooled[j], "neg_sequence": negatives.sequence[j]}
            row["embeds"] = save_tensors({name: t.to("cpu", self.dtype).contiguous() for name, t in tensors.items()})
            row["edit"], row["edit_method"] = self._edit(row) if row["input_image"] is not None else (None, None)

    def __call__(self, table: pa.Table) -> pa.Table:
        started, rows = time.perf_counter(), table.to_pylist()
        _run_split("encode", rows, self._encode)
        return _timed("encode", ENCODED_SCHEMA, rows, started)


class DenoiseStage:
    def __init__(
        self,
        model: str,
        device: str,
        dtype: str | None,
        threads: int | None,
        output_format: str,
        speed: SpeedOptions | None = None,
        lora_root: str | None = None,
        max_lora_rank: int = 64,
        max_resident_loras: int = 8,
        endpoint_url: str | None = None,
    ):
        self.source, self.device, self.dtype = stage_runtime(model, device, dtype, threads)
        self.lora_registry = LoraRegistry(lora_root, endpoint_url=endpoint_url) if lora_root else None
        slots = LoraSlots(MAX_LORAS_PER_ROW, max_lora_rank, max_resident_loras) if lora_root else None
        self.transformer = load_transformer(self.source, self.device, self.dtype, speed, slots)
        self.output_format = output_format
        self.max_lora_rank, self.lora_residency = max_lora_rank, LoraResidency(max_resident_loras)
        self.lora_host = HostCache(LORA_HOST_CACHE_BYTES)

    def _load_loras(self, rows: list[dict]) -> None:
        """The adapters these rows name, loaded (least recently used ones evicted, never one of these rows');
        a file that cannot be used raises LoraError, which fails the rows that name it."""
        names = {lora["name"] for row in rows for lora in json.loads(row["loras"] or "[]")}
        if not names:
            return
        bank = self.transformer.fluxray_loras
        self.lora_residency.touch(names, time.monotonic())
        for name in sorted(names - set(bank.adapters)):
            adapter = self.lora_host.take(name) or read_lora(
                self.lora_registry.path(name), self.transformer, name, self.max_lora_rank
            )
            make_room(bank, self.lora_residency, self.lora_host, held=names)
            bank.add(adapter)

    def _task(self, row: dict):
        tensors = load_tensors(row["embeds"])
        embeds = PromptEmbeds(tensors["pooled"][None], tensors["sequence"][None])
        negative = None
        if "neg_pooled" in tensors:
            negative = PromptEmbeds(tensors["neg_pooled"][None], tensors["neg_sequence"][None])
        params = params_of(row, self.output_format)
        if row["edit"] is not None:
            edit = unpack_edit(row["edit"], row["edit_method"])
            return edit_task(params, embeds, negative, edit, self.source.spec, self.device, self.dtype)
        return denoise_task(params, embeds, negative, self.source.spec, self.device, self.dtype)

    def _denoise(self, rows: list[dict]) -> None:
        self._load_loras(rows)
        for (height, width), group in _by_size(rows):
            tasks = [self._task(row) for row in group]
            # Kontext's reference tokens join every row: one transformer call per reference size.
            for _, same in group_by_size(tasks, _reference_shape):
                denoise(self.transformer, same, height, width)
            for row, task in zip(group, tasks):
                row["latents"] = save_tensors({"latents": task.latents.to("cpu", self.dtype).contiguous()})

    def __call__(self, table: pa.Table) -> pa.Table:
        started, rows = time.perf_counter(), table.to_pylist()
        _run_split("denoise", rows, self._denoise)
        return _timed("denoise", DENOISED_SCHEMA, rows, started)


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
        self.source, self.device, self.dtype = stage_runtime(model, device, dtype, threads)
        self.decoder = VAEDecoder.load(self.source, self.device, self.dtype, speed)
        self.output_format = output_format

    def _decode(self, rows: list[dict]) -> None:
        for (height, width), group in _by_size(rows):
            latents = torch.cat([load_tensors(row["latents"])["latents"] for row in group])
            pixels = self.decoder.decode(latents.to(self.device, self.dtype), height, width)
            for row, image in zip(group, pixels):
                params = params_of(row, self.output_format)
                meta = image_metadata(params, params.seed, self.source.name)
                if row["input_image"] is not None:
                    meta |= {k: row[k] for k in EDIT_RECORD}
                data = encode_image(image.numpy(), self.output_format, meta)
                row["image_bytes"], row["sha256"] = data, hashlib.sha256(data).hexdigest()

    def __call__(self, table: pa.Table) -> pa.Table:
        started, rows = time.perf_counter(), table.to_pylist()
        _run_split("decode", rows, self._decode)
        return _timed("decode", DECODED_SCHEMA, rows, started)


def _reference_shape(task) -> tuple[int, ...]:
    return () if task.reference_ids is None else tuple(task.reference_ids.shape)


class WriteStage:
    """Writes each image, then its metadata: a metadata object always means a complete record whose
    sha256 is its image's. A row regenerated with --overwrite first loses its old metadata (and an
    old image of another format), so no image is ever described by another image's metadata."""

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
            _inject_faults("write", [row])
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
            _fail(row, "write", error)

    def __call__(self, table: pa.Table) -> pa.Table:
        started, rows = time.perf_counter(), table.to_pylist()
        pending = [row for row in rows if row["status"] == "pending"]
        list(self.pool.map(self._write, pending))
        for row in rows:
            if row["status"] == "failed":
                row["sha256"] = None
        return _timed("write", WRITTEN_SCHEMA, rows, started)

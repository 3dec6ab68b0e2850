"""Prompt input: JSONL, CSV, Parquet or plain text files, read as a stream of validated records.

Every row becomes a record with a stable id (its own `id`, else `<file>-<row>` where <file> is the
file's whole key, extension included, so prompts.csv and prompts.jsonl never share an id), a seed
(its own, else derived from --seed-base and the id), every generation parameter resolved, and the
fingerprint of the image it makes (jobs.layout), so the same input gives the same records, seeds
and images on every run. A row that fails GenerationParams is kept, marked invalid with the
reason; a file that cannot be parsed fails with its name and line.

A row with an `image` (a key relative to the input's folder, or an s3:// URI), optionally a `mask` and a
`strength`, is an edit: the job's model picks the method as the HTTP route does (fluxray.editing).

A row's `loras` names LoRAs in the job's --lora-root with their scales: a list of {"name", "scale"} (JSONL,
Parquet), {name: scale}, or text ("ink=0.8;cat", or that JSON, in CSV and text cells). The record keeps
them as canonical JSON text; a name not under --lora-root makes the row invalid.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from pydantic import ValidationError

from fluxray.editing import EditError, EditParams, edit_method
from fluxray.models.specs import ModelSpec
from fluxray.params import SEED_LIMIT, GenerationParams, describe_validation_error
from jobs.layout import EDIT_FIELDS, IMAGE_FIELDS, LORA_FIELDS, fingerprint

FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
}
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
COLUMN_OF_FIELD = {"num_inference_steps": "steps", "guidance_scale": "guidance"}
OPTIONAL_TEXT = ("prompt_2", "negative_prompt")
EDIT_COLUMNS = {"image": "input_image", "mask": "input_mask"}  # input column -> record field
RECORD_FIELDS = ("id", "source", *IMAGE_FIELDS, *EDIT_FIELDS, *LORA_FIELDS, "fingerprint", "status", "reason")
MAX_FILE_ID = 100  # leaves room for '-' and the row number within an id's 128 characters


class InputError(Exception):
    """An input file that cannot be read or parsed; the message names the file (and line)."""


class ColumnError(ValueError):
    """A cell that cannot be used; the row is invalid with this reason ('column: why')."""

    def __init__(self, column: str, message: str):
        super().__init__(f"{column}: {message}")


@dataclass(frozen=True)
class JobDefaults:
    """Values for columns a row leaves out, and what every row's image is made with."""

    spec: ModelSpec
    width: int = 1024
    height: int = 1024
    steps: int | None = None
    guidance: float | None = None
    true_cfg_scale: float = 1.0
    seed_base: int = 0
    output_format: str = "png"
    model_identity: str = ""  # jobs.layout.model_identity: part of each record's fingerprint
    lora_names: frozenset[str] | None = None  # the LoRAs under --lora-root (None: the job has no --lora-root)


def input_format(key: str) -> str:
    suffix = PurePosixPath(key).suffix.lower()
    if suffix not in FORMATS:
        raise InputError(f"{key}: unsupported input format {suffix or '(none)'!r}; use .jsonl, .csv, .parquet or .txt")
    return FORMATS[suffix]


def file_id(key: str) -> str:
    """The id prefix of a file's rows: its whole relative key, extension included (a.csv and a.jsonl
    differ), made safe for object keys; a very long key keeps its end and a digest of the whole."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(PurePosixPath(key))).strip("._-") or "input"
    if len(name) > MAX_FILE_ID:
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        name = f"{digest}_{name[-(MAX_FILE_ID - 13) :].lstrip('._-')}"
    return name


def derived_seed(seed_base: int, row_id: str) -> int:
    digest = hashlib.sha256(f"{seed_base}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % SEED_LIMIT


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "") or value != value  # NaN


def raw_rows(storage, key: str) -> Iterator[tuple[int, dict]]:
    """(row number, raw column dict) of every row of one file, streamed."""
    fmt = input_format(key)
    try:
        if fmt == "parquet":
            yield from _parquet_rows(storage, key)
            return
        with storage.open_binary(key) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="" if fmt == "csv" else None)
            if fmt == "csv":
                reader = csv.DictReader(text)
                if not reader.fieldnames or "prompt" not in reader.fieldnames:
                    raise InputError(f"{key}: CSV header must have a 'prompt' column (got {reader.fieldnames})")
                for number, row in enumerate(reader, start=2):
                    yield number, row
                return
            for number, line in enumerate(text, start=1):
                if not line.strip():
                    continue
                if fmt == "text":
                    yield number, {"prompt": line.rstrip("\r\n")}
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise InputError(f"{key} line {number}: not valid JSON ({error.msg})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{key} line {number}: expected a JSON object, got {type(row).__name__}")
                yield number, row
    except UnicodeDecodeError:
        raise InputError(f"{key}: not UTF-8 text") from None
    except OSError as error:
        raise InputError(f"{key}: cannot read ({error})") from None


def _parquet_rows(storage, key: str) -> Iterator[tuple[int, dict]]:
    import pyarrow.parquet as pq

    with tempfile.NamedTemporaryFile(suffix=".parquet") as tmp:
        with storage.open_binary(key) as raw:
            while chunk := raw.read(1 << 20):
                tmp.write(chunk)
        tmp.flush()
        try:
            parquet = pq.ParquetFile(tmp.name)
        except Exception as error:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise InputError(f"{key}: not a readable Parquet file ({error})") from None
        if "prompt" not in parquet.schema_arrow.names:
            raise InputError(f"{key}: Parquet file must have a 'prompt' column")
        number = 0
        for batch in parquet.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                number += 1
                yield number, row


def lora_cell(value: Any) -> list:
    """A `loras` cell as GenerationParams takes it (a list of {"name", "scale"}); ColumnError when its shape
    is wrong (the names and scales are checked by GenerationParams)."""
    if value is None:
        return []
    if isinstance(value, str):
        text = value.strip()
        if text.startswith(("[", "{")):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as error:
                raise ColumnError("loras", f"not valid JSON ({error.msg})") from None
        else:
            value = [part for part in re.split(r"[;,]", text) if part.strip()]
    if isinstance(value, dict):
        value = [{"name": name, "scale": scale} for name, scale in value.items()]
    if not isinstance(value, list):
        raise ColumnError("loras", f"expected a list of {{name, scale}}, got {type(value).__name__}")
    choices = []
    for item in value:
        if isinstance(item, str):
            name, sep, scale = item.partition("=")
            item = {"name": name.strip(), "scale": scale.strip() if sep else 1.0}
        choices.append(item)
    return choices


def make_record(raw: dict, key: str, number: int, defaults: JobDefaults) -> dict:
    """A record with every parameter resolved; status 'pending', or 'invalid' with the reason."""
    raw = {k: (None if _blank(v) else v) for k, v in raw.items()}
    row_id = str(raw["id"]) if raw.get("id") is not None else f"{file_id(key)}-{number:07d}"
    record = {
        "id": row_id,
        "source": f"{key}:{number}",
        "prompt": str(raw.get("prompt") or ""),
        **{name: raw.get(name) for name in OPTIONAL_TEXT},
        **{field: None if raw.get(column) is None else str(raw[column]) for column, field in EDIT_COLUMNS.items()},
        "strength": raw.get("strength"),
        "loras": None,
        "status": "pending",
        "reason": "",
    }

    def pick(column: str, default: Any) -> Any:
        return raw[column] if raw.get(column) is not None else default

    fields = {
        "prompt": pick("prompt", ""),
        "prompt_2": raw.get("prompt_2"),
        "negative_prompt": raw.get("negative_prompt"),
        "width": pick("width", defaults.width),
        "height": pick("height", defaults.height),
        "num_inference_steps": pick("steps", defaults.steps),
        "guidance_scale": pick("guidance", defaults.guidance),
        "true_cfg_scale": pick("true_cfg_scale", defaults.true_cfg_scale),
        "seed": pick("seed", derived_seed(defaults.seed_base, row_id)),
        "output_format": defaults.output_format,
    }
    if not ID_PATTERN.match(row_id):
        return {
            **record,
            **_unresolved(fields),
            "status": "invalid",
            "reason": "id: may only hold letters, digits, '.', '_' and '-' (at most 128), starting alnum",
        }
    try:
        fields["loras"] = lora_cell(raw.get("loras"))
        params = _params(record, fields, defaults)
        _check_lora_names(params, defaults)
    except ValidationError as error:
        return {
            **record,
            **_unresolved(fields),
            "status": "invalid",
            "reason": describe_validation_error(error, COLUMN_OF_FIELD),
        }
    except (EditError, ColumnError) as error:
        return {**record, **_unresolved(fields), "strength": None, "status": "invalid", "reason": str(error)}
    resolved = {
        **record,
        "prompt": params.prompt,
        "seed": params.seed,
        "width": params.width,
        "height": params.height,
        "steps": params.num_inference_steps,
        "guidance": params.guidance_scale,
        "true_cfg_scale": params.true_cfg_scale,
        "strength": getattr(params, "strength", None),
        "loras": json.dumps([lora.model_dump() for lora in params.loras]) if params.loras else None,
    }
    resolved["fingerprint"] = fingerprint(resolved, defaults.model_identity, defaults.output_format)
    return resolved


def _params(record: dict, fields: dict, defaults: JobDefaults) -> GenerationParams:
    """A row's resolved params: an edit's (EditParams, checked against the model's method) when it has an
    image; EditError for a mask or strength without one, or what the model cannot take."""
    if record["input_image"] is None:
        if defaults.spec.edit == "fill":
            raise EditError("image", f"{defaults.spec.name} (FLUX.1 Fill) needs an image and a mask in every row")
        for column in ("mask", "strength"):
            value = record["input_mask"] if column == "mask" else record["strength"]
            if value is not None:
                raise EditError(column, "needs an image (the row has no 'image')")
        return GenerationParams(**fields).resolve(defaults.spec)
    edit_method(defaults.spec, record["input_mask"] is not None, record["strength"])
    return EditParams(**fields, strength=record["strength"]).resolve(defaults.spec)


def _check_lora_names(params: GenerationParams, defaults: JobDefaults) -> None:
    if not params.loras:
        return
    if defaults.lora_names is None:
        raise ColumnError("loras", "the job has no --lora-root to find LoRAs in")
    unknown = [lora.name for lora in params.loras if lora.name not in defaults.lora_names]
    if unknown:
        raise ColumnError("loras", f"unknown LoRA {unknown[0][:200]!r} (not in --lora-root)")


def _unresolved(fields: dict) -> dict:
    def number(value, kind):
        try:
            return kind(value)
        except (TypeError, ValueError):
            return None

    return {
        "fingerprint": None,
        "seed": number(fields["seed"], int),
        "width": number(fields["width"], int),
        "height": number(fields["height"], int),
        "steps": number(fields["num_inference_steps"], int),
        "guidance": number(fields["guidance_scale"], float),
        "true_cfg_scale": number(fields["true_cfg_scale"], float),
    }


def params_of(record: dict, output_format: str) -> GenerationParams:
    """The resolved GenerationParams of a pending record (EditParams for an edit)."""
    if record.get("input_image") is not None:
        return EditParams(
            **params_of({**record, "input_image": None}, output_format).model_dump(), strength=record["strength"]
        )
    return GenerationParams(
        prompt=record["prompt"],
        prompt_2=record["prompt_2"],
        negative_prompt=record["negative_prompt"],
        width=int(record["width"]),
        height=int(record["height"]),
        num_inference_steps=int(record["steps"]),
        guidance_scale=float(record["guidance"]),
        true_cfg_scale=float(record["true_cfg_scale"]),
        seed=int(record["seed"]),
        output_format=output_format,
        loras=json.loads(record["loras"]) if record.get("loras") else (),
    )


def records(storage, key: str, defaults: JobDefaults, limit: int | None = None) -> Iterator[dict]:
    """The records of one file, at most `limit` of them."""
    for count, (number, raw) in enumerate(raw_rows(storage, key)):
        if limit is not None and count >= limit:
            return
        yield make_record(raw, key, number, defaults)

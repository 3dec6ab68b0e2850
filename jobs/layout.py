"""Where a row's files go under --output, and the fingerprint that says what made them.

    images/{id}.{png|jpg|webp}
    metadata/{id}.{fingerprint}.json     written after its image: it marks a complete record
    manifest/{run}.parquet               every input row of one run, with its status

The fingerprint (16 hex digits) covers everything that decides an image's bytes: the model and a
digest of its weights, the lossy speed switch (quantize), every generation parameter and the output
format. It sits in the metadata's key, so one paged LIST of metadata/ tells a re-run which rows are
done *with these settings* without reading any object.
"""

from __future__ import annotations

import hashlib
import json
import re

from fluxray.images import EXTENSIONS
from fluxray.models.sources import ModelSource

FINGERPRINT_DIGITS = 16
_METADATA_KEY = re.compile(rf"^metadata/(?P<id>.+)\.(?P<fingerprint>[0-9a-f]{{{FINGERPRINT_DIGITS}}})\.json$")
# The record fields that decide an image's pixels; with the model identity and the format, its bytes.
IMAGE_FIELDS = (
    "prompt",
    "prompt_2",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "guidance",
    "true_cfg_scale",
)


# An edit's inputs (fluxray.editing): part of the fingerprint only for rows that have an image, so the
# fingerprints of text-to-image rows stay what earlier runs wrote.
EDIT_FIELDS = ("input_image", "input_mask", "strength")
# A row's LoRAs (names and scales, as JSON text): part of the fingerprint only for rows that have any.
LORA_FIELDS = ("loras",)


def image_key(row_id: str, output_format: str) -> str:
    return f"images/{row_id}.{EXTENSIONS[output_format]}"


def metadata_key(row_id: str, fingerprint: str) -> str:
    return f"metadata/{row_id}.{fingerprint}.json"


def metadata_prefix(row_id: str) -> str:
    """A prefix that every metadata key of row_id starts with (and possibly other ids' too:
    check candidates with parse_metadata_key)."""
    return f"metadata/{row_id}."


def parse_metadata_key(key: str) -> tuple[str, str] | None:
    """(id, fingerprint) of a metadata key, or None for anything else under metadata/."""
    match = _METADATA_KEY.match(key)
    return (match["id"], match["fingerprint"]) if match else None


def model_identity(source: ModelSource, quantize: str) -> str:
    """The model as far as its images are concerned: name, weights digest, and quantisation
    (lossy; the lossless speed switches and the device's float rounding are left out)."""
    return f"{source.name}:{source.weights_digest()}:quantize={quantize}"


def fingerprint(record: dict, identity: str, output_format: str) -> str:
    """The fingerprint of a resolved record's image (see the module docstring)."""
    made_of = {"model": identity, "format": output_format, **{k: record[k] for k in IMAGE_FIELDS}}
    if record.get("input_image") is not None:
        made_of.update({k: record[k] for k in EDIT_FIELDS})
    if record.get("loras"):
        made_of.update({k: record[k] for k in LORA_FIELDS})
    return hashlib.sha256(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:FINGERPRINT_DIGITS]

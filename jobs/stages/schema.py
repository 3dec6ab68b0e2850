"""The job's row schemas: what every stage returns, whatever mix of pending and failed rows a batch holds.

Batches are pyarrow tables, and every stage returns its own fixed schema: a column never depends on a
block's contents (a column that held nothing but nulls in one block once failed to unify with the same
column holding tensors in another). Tensors travel as safetensors bytes in the model's dtype (bfloat16 on
GPUs).
"""

from __future__ import annotations

import pyarrow as pa

from jobs.manifest import MANIFEST_SCHEMA

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


DECODED_SCHEMA = pa.schema([*RECORD, ("image_bytes", pa.binary()), ("sha256", pa.string())])
WRITTEN_SCHEMA = pa.schema([*POSITION, *MANIFEST_SCHEMA, *TIMES])

"""The job's stages (one module each; what they share in base, the row schemas in schema, the read side in
datasource): a prompt datasource, then Ray Data actor pools that encode, denoise, decode
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

from jobs.stages.base import FAULTS_ENV, Stage
from jobs.stages.datasource import PromptDatasource
from jobs.stages.decode import DecodeStage
from jobs.stages.denoise import DenoiseStage
from jobs.stages.encode import EncodeStage
from jobs.stages.schema import (
    DECODED_SCHEMA,
    DENOISED_SCHEMA,
    ENCODED_SCHEMA,
    RECORD_SCHEMA,
    WRITTEN_SCHEMA,
    ZERO_TIMES,
)
from jobs.stages.write import WriteStage

__all__ = [
    "DECODED_SCHEMA",
    "DENOISED_SCHEMA",
    "ENCODED_SCHEMA",
    "FAULTS_ENV",
    "RECORD_SCHEMA",
    "WRITTEN_SCHEMA",
    "ZERO_TIMES",
    "DecodeStage",
    "DenoiseStage",
    "EncodeStage",
    "PromptDatasource",
    "Stage",
    "WriteStage",
]

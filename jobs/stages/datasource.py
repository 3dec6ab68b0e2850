"""The job's read side: one Ray Data read task per input file, streaming the rows its plan marks for this
pass (only those enter the stages)."""

from __future__ import annotations

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from fluxray.storage import open_storage
from jobs.plan import OVERWRITE, FilePlan
from jobs.prompts import JobDefaults, records
from jobs.stages.schema import RECORD_SCHEMA, ZERO_TIMES


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

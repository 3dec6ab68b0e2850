"""The run's manifest: one row per input row with its status, streamed to a local Parquet file as
rows finish (the driver holds one batch at a time) and stored under manifest/ when the run ends.

Statuses: written, skipped (done before with the same fingerprint), invalid (fails the bounds),
duplicate (its id was taken by an earlier row: the reason names that row), conflict (written
before with other settings; --overwrite regenerates it), failed (the reason says where and why).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

STATUSES = ("written", "skipped", "invalid", "duplicate", "conflict", "failed")
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
        ("fingerprint", pa.string()),
        ("image", pa.string()),
        ("metadata", pa.string()),
        ("sha256", pa.string()),
    ]
)


class ManifestWriter:
    """Appends rows (dicts or tables with at least the manifest's columns) and counts statuses."""

    def __init__(self, path: Path, buffer_rows: int = 1024):
        self.path, self.buffer_rows = path, buffer_rows
        self.writer = pq.ParquetWriter(path, MANIFEST_SCHEMA)
        self.counts: Counter[str] = Counter()
        self.first: dict[str, dict] = {}  # the first row of each status, for one-line reports
        self._rows: list[dict] = []

    def add(self, row: dict) -> None:
        self._rows.append({name: row.get(name) for name in MANIFEST_SCHEMA.names})
        self._count(self._rows[-1])
        if len(self._rows) >= self.buffer_rows:
            self.flush()

    def add_table(self, table: pa.Table) -> None:
        self.flush()
        table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
        self.writer.write_table(table)
        for row in table.select(["id", "source", "status", "reason"]).to_pylist():
            self._count(row)

    def _count(self, row: dict) -> None:
        self.counts[row["status"]] += 1
        self.first.setdefault(row["status"], row)

    def flush(self) -> None:
        if self._rows:
            self.writer.write_table(pa.Table.from_pylist(self._rows, schema=MANIFEST_SCHEMA))
            self._rows = []

    def close(self) -> bytes:
        """Finish the file; its bytes."""
        self.flush()
        self.writer.close()
        return self.path.read_bytes()

"""Which rows this run generates, decided in one streamed pass over the input before any work.

Each row is settled here or marked for the pipeline:
- invalid: fails GenerationParams (or its id is unusable);
- duplicate: an earlier row (this file or another) already has its id; that row is generated;
- skipped: metadata with the row's fingerprint exists, from an earlier run;
- conflict: metadata exists for its id with another fingerprint (other settings), and no --overwrite;
- else pending (with --overwrite and older metadata: overwrite).

Settled rows go straight to the manifest. What earlier runs wrote comes from one paged LIST of
metadata/ (no request per row), and the ids seen so far, in an SQLite file on local disk: the
driver's memory does not grow with the number of rows beyond one byte per row for the plan.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jobs.config import UsageError
from jobs.layout import image_key, metadata_key, parse_metadata_key
from jobs.manifest import ManifestWriter
from jobs.prompts import JobDefaults, records

SETTLED, PENDING, OVERWRITE = 0, 1, 2  # a row's code in its file's plan


@dataclass
class FilePlan:
    """One input file: its key and one code per row (SETTLED, PENDING or OVERWRITE)."""

    key: str
    codes: np.ndarray

    @property
    def pending(self) -> int:
        return int(np.count_nonzero(self.codes))


class OutputIndex:
    """The output's finished rows (id -> fingerprints) and the ids this run has taken."""

    def __init__(self, path: Path):
        self.db = sqlite3.connect(path)
        # A scratch file rebuilt every run: no journal, no fsync; 8 MiB of page cache at most.
        self.db.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-8192;"
            "CREATE TABLE written (id TEXT NOT NULL, fingerprint TEXT NOT NULL);"
            "CREATE TABLE taken (id TEXT PRIMARY KEY, source TEXT NOT NULL) WITHOUT ROWID;"
        )

    def load(self, keys: Iterator[str]) -> int:
        """Index the metadata keys of the output (one LIST, streamed); how many."""
        count, chunk = 0, []
        for key in keys:
            parsed = parse_metadata_key(key)
            if parsed is None:
                continue
            chunk.append(parsed)
            if len(chunk) >= 10_000:
                count += self._insert(chunk)
                chunk = []
        count += self._insert(chunk)
        self.db.execute("CREATE INDEX written_id ON written (id)")
        return count

    def _insert(self, rows: list[tuple[str, str]]) -> int:
        self.db.executemany("INSERT INTO written VALUES (?, ?)", rows)
        return len(rows)

    def take(self, row_id: str, source: str) -> str | None:
        """Claim row_id for source; None, or the source that took it first."""
        if self.db.execute("INSERT OR IGNORE INTO taken VALUES (?, ?)", (row_id, source)).rowcount:
            return None
        return self.db.execute("SELECT source FROM taken WHERE id = ?", (row_id,)).fetchone()[0]

    def fingerprints(self, row_id: str) -> list[str]:
        return [fp for (fp,) in self.db.execute("SELECT fingerprint FROM written WHERE id = ?", (row_id,))]

    def close(self) -> None:
        self.db.close()


def plan_rows(
    input_storage,
    keys: list[str],
    defaults: JobDefaults,
    index: OutputIndex,
    manifest: ManifestWriter,
    limit: int | None = None,
    strict: bool = False,
    overwrite: bool = False,
) -> list[FilePlan]:
    """The plan of every input file (--limit applied in file order). Settled rows are added to the
    manifest; with strict, the first invalid or duplicate row raises UsageError."""
    plans, remaining = [], limit
    for key in keys:
        if remaining is not None and remaining <= 0:
            break
        codes = bytearray()
        for record in records(input_storage, key, defaults, remaining):
            codes.append(_settle(record, defaults, index, manifest, strict, overwrite))
        plans.append(FilePlan(key, np.frombuffer(codes, dtype=np.uint8)))
        if remaining is not None:
            remaining -= len(codes)
    return plans


def _settle(record: dict, defaults, index: OutputIndex, manifest: ManifestWriter, strict: bool, overwrite: bool):
    if record["status"] == "invalid":
        if strict:
            raise UsageError(f"--strict: {record['source']} is invalid: {record['reason']}")
        manifest.add(record)
        return SETTLED
    row_id, fingerprint = record["id"], record["fingerprint"]
    first = index.take(row_id, record["source"])
    if first is not None:
        if strict:
            raise UsageError(f"--strict: {record['source']} repeats the id {row_id!r} of {first}")
        manifest.add({**record, "status": "duplicate", "reason": f"id {row_id!r} is taken by {first}"})
        return SETTLED
    earlier = index.fingerprints(row_id)
    if not earlier:
        return PENDING
    if fingerprint in earlier:
        done = {"image": image_key(row_id, defaults.output_format), "metadata": metadata_key(row_id, fingerprint)}
        manifest.add({**record, **done, "status": "skipped", "reason": "written before with these settings"})
        return SETTLED
    if overwrite:
        return OVERWRITE
    reason = f"written before with other settings (fingerprint {earlier[0]}, now {fingerprint}); --overwrite redoes it"
    manifest.add({**record, "status": "conflict", "reason": reason})
    return SETTLED

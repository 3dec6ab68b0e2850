"""What every stage does around its own work: take a batch's pending rows (failed ones pass on untouched),
split a batch that raises in halves until the rows that raise are found (only they are failed, with the
reason), time each row's share, and return the stage's fixed schema. A row that kills its worker process is
the driver's to find (jobs.generate): Ray Data drops that batch after --max-retries, and the driver runs its
rows again in smaller batches.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pyarrow as pa

from fluxray.sampling import group_by_size

# Tests only: "stage:action:MARKER,...": a pending row whose prompt holds MARKER makes that stage
# raise (action "raise") or kill its own worker process (action "kill"), as a bad kernel would.
FAULTS_ENV = "FLUXRAY_JOB_FAULTS"


class Stage:
    """One stage's actor (a Ray Data callable class): `work(rows)` on a batch's pending rows, split where it
    raises (`run`), each row's time and the stage's `schema` around it (`__call__`)."""

    name: str
    schema: pa.Schema

    def work(self, rows: list[dict]) -> None:
        raise NotImplementedError

    def run(self, rows: list[dict]) -> None:
        run_split(self.name, rows, self.work)

    def __call__(self, table: pa.Table) -> pa.Table:
        started, rows = time.perf_counter(), table.to_pylist()
        self.run(rows)
        return timed_table(self.name, self.schema, rows, started)


def fail_row(row: dict, stage: str, error: BaseException) -> None:
    row["status"], row["reason"] = "failed", f"{stage}: {type(error).__name__}: {error}"[:500]


def inject_faults(stage: str, rows: list[dict]) -> None:
    for spec in filter(None, os.environ.get(FAULTS_ENV, "").split(",")):
        where, action, marker = spec.split(":", 2)
        if where == stage and any(marker in row["prompt"] for row in rows):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"injected fault {marker!r}")


def run_split(stage: str, rows: list[dict], work: Callable[[list[dict]], None]) -> None:
    """work(rows) on the pending rows; where it raises, halves until only the rows that raise on
    their own are failed (a bad prompt or an out-of-memory batch costs no other row)."""

    def attempt(part: list[dict]) -> None:
        try:
            inject_faults(stage, part)
            work(part)
        except Exception as error:  # noqa: BLE001 - recorded as the row's reason
            if len(part) == 1:
                fail_row(part[0], stage, error)
                return
            attempt(part[: len(part) // 2])
            attempt(part[len(part) // 2 :])

    pending = [row for row in rows if row["status"] == "pending"]
    if pending:
        attempt(pending)


def timed_table(stage: str, schema: pa.Schema, rows: list[dict], started: float) -> pa.Table:
    share = (time.perf_counter() - started) / max(len(rows), 1)
    for row in rows:
        row[f"{stage}_s"] += share
    return pa.Table.from_pylist(rows, schema=schema)


def by_size(rows: list[dict]) -> list[tuple[tuple[int, int], list[dict]]]:
    return group_by_size(rows, lambda r: (r["height"], r["width"]))

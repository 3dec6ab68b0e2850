"""What the driver prints while the job runs and when it ends: a progress line every few seconds
(rows done of those to generate, images/s, ETA, failures so far) and each stage's throughput."""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable

STAGES = ("encode", "denoise", "decode", "write")


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    """Counts the rows that come out of the pipeline and the seconds each stage spent on them."""

    def __init__(self, total: int, interval_s: float, clock: Callable[[], float] = time.monotonic, out=None):
        self.total, self.interval_s, self.clock = total, interval_s, clock
        self.out = out or sys.stdout
        self.started = self.last = clock()
        self.counts: Counter[str] = Counter()
        self.stage_seconds: Counter[str] = Counter()
        self.stage_rows = 0

    def update(self, statuses: Iterable[str], stage_seconds: dict[str, float], rows: int) -> None:
        self.counts.update(statuses)
        self.stage_seconds.update(stage_seconds)
        self.stage_rows += rows
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.last = now
            print(self.line(), file=self.out, flush=True)

    @property
    def done(self) -> int:
        return sum(self.counts.values())

    def rate(self) -> float:
        elapsed = self.clock() - self.started
        return self.counts["written"] / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        done, rate = self.done, self.rate()
        eta = _duration((self.total - done) / rate) if rate > 0 else "?"
        percent = 100 * done / self.total if self.total else 100.0
        return (
            f"progress: {done}/{self.total} rows ({percent:.0f}%), {rate:.2f} images/s, ETA {eta}, "
            f"failed so far {self.counts['failed']}"
        )

    def stage_lines(self) -> list[str]:
        """Per stage: busy seconds summed over its actors, and rows per busy second (one actor's rate)."""
        lines = []
        for stage in STAGES:
            busy = self.stage_seconds.get(stage, 0.0)
            rate = f"{self.stage_rows / busy:.2f} rows/s per actor" if busy > 0 else "idle"
            lines.append(f"stage {stage}: {busy:.1f}s busy, {rate}")
        return lines

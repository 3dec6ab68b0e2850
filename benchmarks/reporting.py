"""Where a benchmark's report goes: one JSON file (the results/ folder by default), echoed to stdout."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

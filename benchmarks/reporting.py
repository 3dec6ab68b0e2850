"""Where a benchmark's report goes: one JSON file (the results/ folder by default), echoed to stdout."""

from __future__ import annotations

import json
import re
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def results_path(stem: str, device: str) -> Path:
    """benchmarks/results/<stem>-<device slug>.json ("NVIDIA H200" -> nvidia-h200)."""
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return RESULTS / f"{stem}-{slug}.json"


def write_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))

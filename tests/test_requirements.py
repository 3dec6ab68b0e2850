"""The declared dependency floors are true: each torch API the engine uses exists at the floor."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# torch APIs newer than some releases, and the release that brought each (its PR or release notes).
TORCH_API_SINCE = {
    "torch._dynamo.config.recompile_limit": (2, 7),  # renamed from cache_size_limit, pytorch#143709
    "torch.compiler.set_stance": (2, 6),
    "torch.nn.attention.sdpa_kernel": (2, 3),
}


def declared_torch_floor() -> tuple[int, int]:
    # A regex, not tomllib: the project supports Python 3.10, which has none.
    (floor,) = re.findall(r'^\s*"torch>=(\d+)\.(\d+)', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return int(floor[0]), int(floor[1])


def test_the_torch_floor_has_every_api_the_engine_uses():
    source = "\n".join(p.read_text() for p in (ROOT / "fluxray").rglob("*.py"))
    used = {api: since for api, since in TORCH_API_SINCE.items() if api in source}
    assert used, "none of the listed APIs is used: the table is stale"
    floor = declared_torch_floor()
    too_new = {api: since for api, since in used.items() if since > floor}
    assert not too_new, f"pyproject declares torch>={floor[0]}.{floor[1]} but the engine uses {too_new}"

"""Every block a reader might run in README.md and docs/*.md is either run by the test command with its
outcome checked (a hidden `invisible-code-block: python` check after it, or asserts of its own), or says
why not (`<!-- skip: next "reason" -->` before it). The runner is conftest.py at the repository root."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
SKIP = re.compile(r"<!--\s*skip:\s*next\s+(\"[^\"]+\"|'[^']+')\s*-->\s*$")
CHECK = re.compile(r"\A\s*<!--\s*invisible-code-block:\s*python\b")
RUNNABLE = {"bash", "sh", "shell", "python", "py", "python3"}


def unchecked_blocks(text: str) -> list[str]:
    """The runnable blocks with neither a check nor a skip (line numbers)."""
    found = []
    for block in FENCE.finditer(text):
        language, code = block.group(1).lower(), block.group(2)
        if language not in RUNNABLE:
            continue
        line = text.count("\n", 0, block.start()) + 1
        if language not in ("bash", "python"):
            found.append(f"line {line}: ```{language} is neither run nor skipped; write ```bash or ```python")
            continue
        before = text[: block.start()].rstrip().splitlines()[-1:] or [""]
        if SKIP.search(before[0]):
            continue
        if CHECK.match(text[block.end() :]) or re.search(r"^\s*assert\s", code, re.MULTILINE):
            continue
        found.append(f"line {line}: ```{language} has no check after it and no skip before it")
    return found


def test_every_runnable_block_is_checked_or_says_why_not():
    problems = {p.name: unchecked_blocks(p.read_text()) for p in PAGES}
    assert not {k: v for k, v in problems.items() if v}, problems


def test_the_lint_catches_an_unchecked_block():
    page = (
        "Run it:\n\n```bash\ncurl -s localhost:8000/healthz\n```\n\n"
        'Then:\n\n<!-- skip: next "a GPU" -->\n```python\nrun()\n```\n'
    )
    assert unchecked_blocks(page) == ["line 3: ```bash has no check after it and no skip before it"]
    checked = page.replace("```\n\nThen", '```\n<!-- invisible-code-block: python\nassert "ok" in out\n-->\nThen')
    assert unchecked_blocks(checked) == []
    wrong = "line 1: ```sh is neither run nor skipped; write ```bash or ```python"
    assert unchecked_blocks("```sh\nls\n```\n") == [wrong]

"""The docs site builds cleanly, and the benchmark tables in docs/benchmarks.md are the JSON reports'."""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "render_benchmark_tables.py"
PAGE = ROOT / "docs" / "benchmarks.md"


def run_script(*args: str) -> int:
    """The render script's main() in this process, as `python scripts/render_benchmark_tables.py ARGS`."""
    main = runpy.run_path(str(SCRIPT), run_name="render_benchmark_tables")["main"]
    return main(list(args))


def test_the_benchmark_tables_match_the_json_reports():
    assert run_script("--check") == 0


def test_a_stale_table_fails_the_check_and_a_render_fixes_it(tmp_path, capsys):
    page = tmp_path / "benchmarks.md"
    shutil.copy(PAGE, page)
    assert run_script("--check", "--page", str(page)) == 0
    text = page.read_text()
    start = text.index("<!-- table: gpu -->")
    row = text.index("| fluxray fp8 |", start)
    page.write_text(text[:row] + text[row:].replace("3.20 s", "2.20 s", 1))
    capsys.readouterr()
    assert run_script("--check", "--page", str(page)) == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "table gpu is stale" in message
    assert run_script("--page", str(page)) == 0  # render in place: the copy, never the real page
    assert page.read_text() == PAGE.read_text()


def test_a_missing_table_fails_the_check(tmp_path, capsys):
    page = tmp_path / "benchmarks.md"
    text = PAGE.read_text()
    start = text.index("<!-- table: lora -->")
    end = text.index("<!-- /table -->", start) + len("<!-- /table -->")
    page.write_text(text[:start] + text[end:])
    assert run_script("--check", "--page", str(page)) == 1
    assert "table lora (missing) is stale" in capsys.readouterr().err


def test_a_changed_figure_copy_fails_the_check(tmp_path, capsys):
    images = tmp_path / "img"
    shutil.copytree(ROOT / "docs" / "img", images)
    assert run_script("--check", "--images", str(images)) == 0
    (images / "quality-steps-cpu.png").write_bytes(b"not the figure")
    assert run_script("--check", "--images", str(images)) == 1
    assert "quality-steps-cpu.png differs" in capsys.readouterr().err


def test_the_site_builds_strictly(tmp_path):
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stdout + build.stderr
    assert "WARNING" not in build.stderr, build.stderr
    for page in ("index.html", "architecture/index.html", "benchmarks/index.html", "http-api/index.html"):
        assert (site / page).is_file(), page
    assert (site / "img" / "quality-steps-cpu.png").is_file()

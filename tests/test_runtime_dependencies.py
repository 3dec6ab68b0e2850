"""What `pip install .` brings covers every third-party import of the shipped packages.

The test extras install more than a user gets, so an import that only the test extras satisfy passes
the suite and fails a user's `make serve` (it did: deployments/async_jobs/webhooks.py imported httpx). This walks
the declared runtime requirements of the installed fluxray distribution (and what they require in
turn, with the extras they name) and every import in fluxray/, deployments/ and jobs/. The as-shipped
phase of the test command (tests/as_shipped) then proves it for real, in a venv with only the runtime
install.
"""

from __future__ import annotations

import ast
import re
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("fluxray", "deployments", "jobs")
# Extras a user may install for a feature; the test and bench extras are not a runtime install.
NOT_RUNTIME = {"test", "bench", "docs"}


def _name(requirement: str) -> tuple[str, list[str], str]:
    match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?", requirement)
    extras = [e.strip() for e in (match.group(2) or "").split(",") if e.strip()]
    marker = requirement.split(";", 1)[1] if ";" in requirement else ""
    return _norm(match.group(1)), extras, marker


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _wanted(marker: str, extras: set[str]) -> bool:
    """A requirement applies when it names no extra, or one of the extras asked for."""
    named = re.findall(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
    return not named or any(_norm(e) in extras for e in named)


def runtime_closure() -> set[str]:
    """The distributions `pip install .` installs (the project's runtime requirements, transitively)."""
    seen: set[str] = set()
    extras = {_norm(e) for e in (metadata.metadata("fluxray").get_all("Provides-Extra") or [])} - NOT_RUNTIME
    todo = [("fluxray", extras)]
    while todo:
        name, extras = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for requirement in requires:
            dep, dep_extras, marker = _name(requirement)
            if _wanted(marker, extras):
                todo.append((dep, {_norm(e) for e in dep_extras}))
    return seen


def shipped_imports() -> dict[str, set[str]]:
    """Top-level modules imported by the shipped packages -> the files importing them."""
    found: dict[str, set[str]] = {}
    for package in SHIPPED:
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules = [node.module]
                else:
                    continue
                for module in modules:
                    top = module.split(".")[0]
                    if top not in SHIPPED and top not in sys.stdlib_module_names:
                        found.setdefault(top, set()).add(str(path.relative_to(ROOT)))
    return found


def test_every_shipped_import_comes_with_the_runtime_install():
    closure = runtime_closure()
    providers = metadata.packages_distributions()
    missing = {
        module: sorted(files)
        for module, files in shipped_imports().items()
        # A module no installed distribution provides (an optional extra's, not installed here) is
        # taken to be its distribution's name.
        if not any(_norm(d) in closure for d in providers.get(module) or [module])
    }
    assert not missing, f"imported by shipped code but not brought by `pip install .`: {missing}"


def test_the_check_sees_a_test_only_dependency():
    """The check can fail: a test-only distribution is outside the runtime closure."""
    closure = runtime_closure()
    assert "torch" in closure and "ray" in closure and "httpx" in closure
    for test_only in ("pytest", "hypothesis", "selenium", "moto"):
        assert test_only not in closure, test_only

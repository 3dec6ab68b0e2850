"""The product as shipped, proved by the test command beside the suite proper (tests/).

1. The run command: a runtime-only venv made by `make install` (the install step of the README's run
   command, no test extras), then `make serve` from it exactly as the README says, waited for until
   /healthz answers, and stopped when the last item that needs it has run.
2. The docs: every ```bash and ```python block in README.md and docs/*.md runs (sybil), in order per
   page, against that service (bash in the runtime venv, from a scratch copy of the repository's
   layout; Python in this process), and the hidden check after each block asserts its outcome:
       <!-- invisible-code-block: python
       assert image_size("cat.png") == (256, 256)
       -->
   A block a reader is not meant to run in CI (kubectl, GPUs, real S3) says why before its fence:
       <!-- skip: next "needs a Kubernetes cluster" -->
   tests/as_shipped/test_docs_blocks.py checks every runnable block has a check or a skip.

The in-process tests run first, and the service installs and starts in a thread behind them; then the
items that use it; then the live tests, once it has stopped (pytest_collection_modifyitems).
`FLUXRAY_RUN_VENV=<dir>` reuses a runtime venv made earlier (a quicker working loop); by default each
run makes a fresh one, as a new user's clone does.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from sybil import Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent
SERVICE_URL = "http://127.0.0.1:8000"
INSTALL_TIMEOUT_S = 1200  # a fresh venv: torch (CPU, local disk), Ray, diffusers, transformers
READY_TIMEOUT_S = 600  # `make serve` until /healthz answers 200
BLOCK_TIMEOUT_S = 600
# What a scratch directory holds of the repository (symlinked): what the examples name.
LAYOUT = ("examples", "deployments", "jobs", "fluxray", "k8s", "scripts", "benchmarks", "cluster", "docs")
LAYOUT_FILES = ("Makefile", "pyproject.toml", "README.md")


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return "(no output)"


class ShippedService:
    """`make serve` in a runtime-only venv, as a user runs it."""

    def __init__(self) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="fluxray-shipped-"))
        reuse = os.environ.get("FLUXRAY_RUN_VENV")
        self.venv = Path(reuse) if reuse else self.base / "venv"
        self.log = self.base / "serve.log"
        self.process: subprocess.Popen | None = None
        # The environment a user's shell has: none of this test process' Ray settings.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "VIRTUAL_ENV"))}
        self.env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{self.env.get('PATH', '')}"
        self.env["VIRTUAL_ENV"] = str(self.venv)
        self.env.setdefault("RAY_AUTH_MODE", "token")  # what Ray's CLI needs against a 2.60 head
        self.env["RAY_USAGE_STATS_ENABLED"] = "0"

    def install(self) -> None:
        """The README run command's own install step, into its own venv."""
        log = self.base / "install.log"
        with log.open("w") as out:
            started = time.monotonic()
            done = subprocess.run(
                ["make", "install", f"VENV={self.venv}"],
                cwd=ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=INSTALL_TIMEOUT_S,
            )
        if done.returncode != 0:
            pytest.fail(f"`make install VENV={self.venv}` failed (exit {done.returncode}):\n{_tail(log)}", False)
        self.install_s = time.monotonic() - started

    def start(self) -> None:
        if _healthz() is not None:
            pytest.fail(f"something already answers on {SERVICE_URL}: `make serve` could not bind it", False)
        self.install()
        started = time.monotonic()
        self.process = subprocess.Popen(
            ["make", "serve", f"VENV={self.venv}"],
            cwd=ROOT,
            env=self.env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: stop() ends make, serve and the Ray it started
        )
        while time.monotonic() - started < READY_TIMEOUT_S:
            if self.process.poll() is not None:
                code = self.process.returncode
                pytest.fail(f"`make serve` exited ({code}) before it served:\n{_tail(self.log)}", False)
            if _healthz() == 200:
                self.ready_s = time.monotonic() - started
                _timings.append(
                    f"shipped service: make install {self.install_s:.0f} s, make serve healthy in {self.ready_s:.0f} s"
                )
                return
            time.sleep(1)
        self.stop()
        pytest.fail(f"`make serve` not healthy after {READY_TIMEOUT_S} s; its output:\n{_tail(self.log)}", False)

    def stop(self) -> None:
        """Ctrl-C, as a user stops it (serve run tears the app and its local Ray down), then SIGKILL."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
            os.killpg(self.process.pid, signal.SIGINT)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(30)
        self.process = None
        deadline = time.monotonic() + 30
        while _healthz() is not None and time.monotonic() < deadline:
            time.sleep(0.5)


def _healthz() -> int | None:
    try:
        with urllib.request.urlopen(f"{SERVICE_URL}/healthz", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


_service: ShippedService | None = None
_failed: str | None = None  # why the service could not start: every item that needs it fails at once
_starting: tuple[ShippedService, threading.Thread] | None = None  # started behind the in-process tests


def _start_in_background() -> None:
    """Install and start the service in a thread while the in-process tests run (they come first, see
    pytest_collection_modifyitems): its install waits on the network and its start on process spawns and
    health checks, time the in-process tests use; shipped_service() waits for it."""
    global _starting
    service = ShippedService()

    def start() -> None:
        global _failed
        try:
            service.start()
        except BaseException as error:  # noqa: BLE001 - pytest.fail's exception too: reported by shipped_service
            _failed = f"the shipped service did not start: {error}"

    thread = threading.Thread(target=start, name="shipped-service", daemon=True)
    thread.start()
    _starting = (service, thread)


def shipped_service() -> ShippedService:
    global _service, _failed, _starting
    if _starting is not None:
        service, thread = _starting
        thread.join()
        _starting = None
        if not _failed:
            _service = service
    if _failed:
        pytest.fail(_failed, False)
    if _service is None:
        service = ShippedService()
        try:
            service.start()
        except BaseException as error:
            _failed = f"the shipped service did not start: {error}"
            raise
        _service = service
    return _service


@pytest.hookimpl(trylast=True)  # after tests/conftest.py has marked the live items
def pytest_collection_modifyitems(items):
    """The run's order: the in-process tests first (the shipped service installs and starts behind them),
    then everything that uses the shipped service (the docs' blocks, tests/as_shipped/), then the live
    tests (their clusters never run beside the service). Each group keeps its collected order."""

    def group(item) -> int:
        if _needs_service(item):
            return 1
        return 2 if item.get_closest_marker("live") else 0

    if not any(_needs_service(item) for item in items):
        return
    items.sort(key=group)
    if group(items[0]) == 0:
        _start_in_background()


@pytest.fixture(scope="session", name="shipped_service")
def _shipped_service_fixture():
    return shipped_service()


def _needs_service(item) -> bool:
    return item is not None and "shipped_service" in getattr(item, "fixturenames", ())


def pytest_runtest_teardown(item, nextitem):
    """The service stops once the items that need it have run: the suite's own clusters (tests/)
    never run beside it (both would want the machine's cores, and port 8000)."""
    global _service
    if _service is not None and not _needs_service(nextitem):
        _service.stop()
        shutil.rmtree(_service.base, ignore_errors=True)
        _service = None


def pytest_sessionfinish(session, exitstatus):
    if _starting is not None:  # the session ended before an item needed it
        _starting[1].join()
        _starting[0].stop()
    if _service is not None:
        _service.stop()


_timings: list[str] = []


def pytest_terminal_summary(terminalreporter):
    for line in _timings:
        terminalreporter.write_line(line)


# --- the docs' blocks ------------------------------------------------------------------------------


def image_size(path: str | Path) -> tuple[int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def _enter(example) -> dict:
    """The page's scratch directory, made at its first block: the repository's layout symlinked, the
    working directory of its bash blocks and, while the page runs, of this process (its Python blocks)."""
    namespace = example.namespace
    if "scratch" not in namespace:
        service = shipped_service()
        scratch = service.base / "docs" / Path(example.document.path).stem
        if scratch.exists():
            shutil.rmtree(scratch)
        scratch.mkdir(parents=True)
        for name in LAYOUT + LAYOUT_FILES:
            if (ROOT / name).exists():
                (scratch / name).symlink_to(ROOT / name)
        namespace.update(scratch=scratch, service=service, image_size=image_size, json=json, Path=Path, out="")
        namespace["_cwd"] = os.getcwd()
    os.chdir(namespace["scratch"])
    return namespace


def _teardown(namespace: dict) -> None:
    if "_cwd" in namespace:
        os.chdir(namespace["_cwd"])


_python = PythonEvaluator()


def _run_python(example) -> None:
    _enter(example)
    _python(example)


def _run_bash(example) -> None:
    namespace = _enter(example)
    service = namespace["service"]
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example.parsed],
        cwd=namespace["scratch"],
        env=service.env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
    )
    namespace["out"] = done.stdout
    if done.returncode != 0:
        raise AssertionError(
            f"the block at line {example.line} exited {done.returncode}\n--- stdout\n{done.stdout[-3000:]}"
            f"\n--- stderr\n{done.stderr[-3000:]}"
        )


pytest_collect_file = Sybil(
    parsers=[
        SkipParser(),
        CodeBlockParser(language="bash", evaluator=_run_bash),
        CodeBlockParser(language="python", evaluator=_run_python),
    ],
    patterns=["README.md", "docs/*.md"],
    excludes=["*/README.md"],  # the README of a folder (k8s/crds/, benchmarks/results/) is not a page
    path=str(ROOT),
    teardown=_teardown,
    fixtures=["shipped_service"],
).pytest()

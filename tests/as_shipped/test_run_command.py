"""The README's run command as a user meets it: `make serve` from a runtime-only venv (conftest.py at the
repository root starts it, and fails the run with the service's own output if it never comes up)."""

from __future__ import annotations

import io
import json
import subprocess
import time
import urllib.request

from PIL import Image

SHIPPED = ("fluxray", "deployments", "jobs")
URL = "http://127.0.0.1:8000"  # local.yaml's, where the README says the service is


def _post(url: str, body: dict, timeout: float = 120):
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST"
    )
    started = time.monotonic()
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.status, response.headers, response.read(), time.monotonic() - started


def test_the_runtime_venv_has_no_test_extras_and_imports_every_shipped_module(shipped_service):
    """Every module of the shipped packages imports with only `pip install .` (and nothing of the test
    extras is there to hide a missing runtime dependency)."""
    script = (
        "import importlib, importlib.util, pkgutil, json\n"
        f"names = []\nfor top in {SHIPPED!r}:\n"
        "    package = importlib.import_module(top)\n"
        "    for info in pkgutil.walk_packages(package.__path__, top + '.'):\n"
        "        if '.tiny_' in info.name or info.name.endswith('__main__'): continue\n"
        "        importlib.import_module(info.name); names.append(info.name)\n"
        "extras = [m for m in ('pytest', 'hypothesis', 'moto', 'selenium', 'peft') if importlib.util.find_spec(m)]\n"
        "print(json.dumps({'imported': names, 'test_extras': extras}))\n"
    )
    done = subprocess.run(
        [str(shipped_service.venv / "bin" / "python"), "-c", script],
        env=shipped_service.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["test_extras"] == [], report["test_extras"]
    shipped = {"deployments.app", "deployments.async_jobs.webhooks", "jobs.generate", "fluxray.pipeline"}
    assert shipped <= set(report["imported"])


def test_the_service_serves_the_default_model(shipped_service):
    with urllib.request.urlopen(f"{URL}/healthz", timeout=10) as response:
        assert response.status == 200
        assert json.loads(response.read())["model"] == "tiny"
    with urllib.request.urlopen(f"{URL}/v1/models", timeout=10) as response:
        models = {m["id"] for m in json.loads(response.read())["data"]}
    assert models == {"tiny", "tiny-kontext", "tiny-fill"}


def test_a_generation_right_after_ready(shipped_service):
    body = {"prompt": "a red circle on the left, white background", "size": "256x256", "seed": 7}
    status, headers, png, _ = _post(f"{URL}/generate", body)
    assert status == 200 and headers["X-Seed"] == "7"
    image = Image.open(io.BytesIO(png))
    assert image.size == (256, 256)
    # The same seed gives the same image (the service's determinism, through the whole graph).
    assert _post(f"{URL}/generate", body)[2] == png

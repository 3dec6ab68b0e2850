"""A Ray head of our own on this machine, for the tests and the benchmarks: the one way they start, talk
to and stop a single-node cluster (cluster/scripted_cluster.py is the handle on the multi-node one that
cluster/local_cluster.sh runs).

- `start()`: `ray start --head` on free ports with its own `--temp-dir` (not the machine's /tmp/ray), tried
  again on new ports when one was taken meanwhile; every process it starts carries an environment marker.
- `api()`, `serve_status()`, `deploy()`: the dashboard's REST API with the cluster's token (what the
  `serve status` and `serve deploy` CLIs call), no process per call.
- `driver()`: one long-lived Ray driver per cluster (JSON lines over its stdin and stdout) runs snippets
  that need a driver (handle calls, actor listings, ray.kill); restarted if it dies or hangs.
- `stop()`: ends this cluster's processes only (`ray stop` would end every Ray of the user).

Imported from the repository root as `cluster.ray_head` (pytest puts the root on sys.path through the
root conftest.py; the benchmarks put it there themselves).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MARKER = "FLUXRAY_TEST_CLUSTER"  # in the environment of every process a RayHead starts
START_ATTEMPTS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 1.0):
    """Poll `predicate` until it returns something truthy (returned) or `timeout` s pass (TimeoutError
    naming `what` and the last error the predicate raised)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            result = predicate()
            if result:
                return result
        except Exception as error:  # noqa: BLE001 - retried until the deadline
            last = error
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s (last error: {last!r})")


# The driver's loop: each stdin line is {"code": ...}; the code runs with `ray`, `serve` and `json` in
# scope and its stdout captured; the reply line is {"ok": true, "out": captured} or {"ok": false,
# "error": traceback}. Replies go to the original stdout, which nothing else writes to.
DRIVER_LOOP = """
import contextlib, io, json, os, sys, traceback
reply = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # whatever Ray or the code prints outside the capture goes to the log, not the replies
import ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
reply.write(json.dumps({"ok": True, "out": "ready"}) + "\\n")
for line in sys.stdin:
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(json.loads(line)["code"], {"ray": ray, "serve": serve, "json": json})
        answer = {"ok": True, "out": out.getvalue()}
    except BaseException:
        answer = {"ok": False, "out": out.getvalue(), "error": traceback.format_exc()}
    reply.write(json.dumps(answer) + "\\n")
"""


class Driver:
    """One long-lived Ray driver process connected to `address`, started on first use: DRIVER_LOOP, or
    another `loop` that answers a JSON line with one (its first line says it is ready)."""

    def __init__(self, address: str, env: dict, log: Path, loop: str = DRIVER_LOOP):
        self.address, self.env, self.log, self.loop = address, env, log, loop
        self.process: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _start(self, timeout: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-c", self.loop, self.address],
            env=self.env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log.open("ab"),
            text=True,
        )
        self._read(timeout)

    def _read(self, timeout: float) -> dict:
        """The driver's next reply line, or kill it (it is restarted on the next call) after `timeout` s."""
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.process.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not got or not got[0]:
            self.close()
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise TimeoutError(f"the cluster's driver gave no answer within {timeout:.0f} s; its log ends:\n{tail}")
        return json.loads(got[0])

    def call(self, request: dict, timeout: float = 120) -> dict:
        """Send one request line; the driver's answer line, parsed (the driver restarted if it had died)."""
        with self.lock:
            if self.process is None or self.process.poll() is not None:
                self._start(timeout)
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            return self._read(timeout)

    def run(self, code: str, timeout: float = 120):
        """Run `code` in the driver; the JSON it printed last, parsed (AssertionError with its traceback if
        it raised)."""
        answer = self.call({"code": code}, timeout)
        assert answer["ok"], answer["error"][-2000:]
        return json.loads(answer["out"].strip().splitlines()[-1])

    def close(self) -> None:
        if self.process is not None:
            with contextlib.suppress(OSError):
                self.process.kill()
            self.process.wait(timeout=30)
            self.process = None


class RayHead:
    """A single-node Ray cluster of our own. `env` is the environment of everything it starts (and of the
    clients it runs: `run`, the driver); extra variables may be added before `start()`."""

    def __init__(self, tmp: Path | None = None, num_cpus: int | None = None, metrics_report_ms: int | None = None):
        self.tmp = Path(tmp) if tmp is not None else Path(tempfile.mkdtemp(prefix="fluxray-ray-"))
        self.num_cpus = num_cpus
        self.marker = secrets.token_hex(8)
        self.token = secrets.token_hex(16)
        self.env = {
            **os.environ,
            MARKER: self.marker,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONPATH": str(ROOT),
            # `ray job submit -- python ...` runs whatever `python` is on PATH: make it this venv's, as it
            # is on a cluster node (CI runs the tests without activating the venv).
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("RAY_ADDRESS", None)
        if metrics_report_ms is not None:
            self.env["RAY_metrics_report_interval_ms"] = str(metrics_report_ms)
        # Ray's own files (sessions, logs, sockets): a short path of its own, since a unix socket's path
        # must stay under 108 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fluxray-ray-"))
        self._pick_ports()
        self._driver: Driver | None = None

    def _pick_ports(self) -> None:
        self.gcs_port, self.dashboard_port, self.metrics_port = free_port(), free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.address = f"127.0.0.1:{self.gcs_port}"

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """A command of this venv (ray, serve, python) as a client of the cluster, from the repository root."""
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )

    def start(self) -> RayHead:
        """`ray start --head`; on failure (say a port taken between picking and binding it) the processes
        it left are stopped and it is tried again on new ports."""
        for attempt in range(1, START_ATTEMPTS + 1):
            args = [f"--num-cpus={self.num_cpus}"] if self.num_cpus is not None else []
            started = self.run(
                "ray",
                "start",
                "--head",
                f"--port={self.gcs_port}",
                f"--dashboard-port={self.dashboard_port}",
                f"--metrics-export-port={self.metrics_port}",
                f"--temp-dir={self.temp_dir}",
                "--disable-usage-stats",
                "--include-dashboard=true",
                *args,
                timeout=300,
            )
            if started.returncode == 0:
                with contextlib.suppress(TimeoutError):
                    wait_until(lambda: self.api("/api/version"), 60, "the dashboard", 0.5)
                    self.env["RAY_ADDRESS"] = self.address
                    return self
            self.stop()
            if attempt == START_ATTEMPTS:
                raise RuntimeError(f"ray start failed {START_ATTEMPTS} times; last: {started.stderr[-2000:]}")
            self._pick_ports()
        raise AssertionError("unreachable")

    def api(self, path: str, method: str = "GET", body: dict | None = None, timeout: float = 30) -> dict:
        """The dashboard's REST API, with the token."""
        headers = {"Authorization": f"Bearer {self.token}"}
        response = httpx.request(method, f"{self.dashboard}{path}", json=body, headers=headers, timeout=timeout)
        response.raise_for_status()
        return response.json() if response.content else {}

    def serve_status(self) -> dict:
        """What `serve status` prints, from the REST API: applications with their status and message, each
        deployment's status, message and replica_states (replica counts by state)."""
        details = self.api("/api/serve/applications/")
        applications = {}
        for name, app in (details.get("applications") or {}).items():
            deployments = {}
            for deployment_name, deployment in app.get("deployments", {}).items():
                states: dict[str, int] = {}
                for replica in deployment.get("replicas", []):
                    states[replica["state"]] = states.get(replica["state"], 0) + 1
                deployments[deployment_name] = {
                    "status": deployment["status"],
                    "message": deployment.get("message", ""),
                    "replica_states": states,
                }
            applications[name] = {
                "status": app["status"],
                "message": app.get("message", ""),
                "deployments": deployments,
            }
        return {"applications": applications}

    def deploy(self, config: dict, timeout: float = 300) -> None:
        """Deploy a whole serve config (its applications replace the running set, as `serve deploy`) and wait
        until exactly its applications are RUNNING (RuntimeError at once if one fails to deploy)."""
        self.api("/api/serve/applications/", method="PUT", body=config, timeout=120)
        names = {app["name"] for app in config["applications"]}

        def running() -> bool:
            apps = self.serve_status()["applications"]
            failed = {n: a["message"] for n, a in apps.items() if n in names and a["status"] == "DEPLOY_FAILED"}
            if failed:
                raise RuntimeError(f"serve applications failed to deploy: {failed}")
            return set(apps) == names and all(a["status"] == "RUNNING" for a in apps.values())

        deadline = time.monotonic() + timeout
        while not running():
            if time.monotonic() > deadline:
                raise TimeoutError(f"serve applications {sorted(names)} not RUNNING after {timeout:.0f} s")
            time.sleep(1)

    def shutdown_serve(self, timeout: float = 120) -> None:
        """Delete every Serve application (what `serve shutdown` does) and wait until none is left."""
        self.api("/api/serve/applications/", method="DELETE", timeout=60)
        wait_until(lambda: not self.serve_status()["applications"], timeout, "serve to shut down", 1)

    def driver(self, code: str, timeout: float = 120):
        """Run code in the cluster's long-lived driver (`ray`, `serve`, `json` in scope); the JSON it
        printed last."""
        if self._driver is None:
            self._driver = Driver(self.address, self.env, self.tmp / "driver.log")
        return self._driver.run(code, timeout)

    def handle_call(self, app: str, deployment: str, method: str):
        """Call a deployment method through a real DeploymentHandle, from the cluster's driver."""
        # The driver outlives Serve's controller when the applications are deleted and deployed again:
        # the cached controller handle is dropped, so each call finds the running one by name.
        return self.driver(
            "from ray.serve import context\ncontext._disconnect()\n"
            f"h = serve.get_deployment_handle({deployment!r}, app_name={app!r})\n"
            f"print(json.dumps(getattr(h, {method!r}).remote().result()))\n"
        )

    def live_actors(self) -> list[dict]:
        """Every live actor of the cluster: its class name, actor name and worker pid."""
        actors = self.api(
            "/api/v0/actors?limit=10000&detail=true&filter_keys=state&filter_predicates=%3D&filter_values=ALIVE"
        )
        return [
            {"class": a.get("class_name"), "name": a.get("name") or None, "pid": a.get("pid")}
            for a in actors["data"]["result"]["result"]
        ]

    def own_processes(self) -> list[psutil.Process]:
        """Every process this cluster started (Ray's daemons, workers, job drivers, the driver): each
        inherits the marker from the environment `ray start` ran with."""
        own = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get(MARKER) == self.marker:
                    own.append(process)
        return own

    def stop(self) -> None:
        """Stops this cluster's processes only, repeated while any is left (a raylet being stopped can still
        start a worker), then removes its temp dir."""
        if self._driver is not None:
            self._driver.close()
        for _ in range(5):
            processes = self.own_processes()
            if not processes:
                break
            for process in processes:
                with contextlib.suppress(psutil.Error):
                    process.terminate()
            _, alive = psutil.wait_procs(processes, timeout=10)
            for process in alive:
                with contextlib.suppress(psutil.Error):
                    process.kill()
            psutil.wait_procs(alive, timeout=10)
        # `ray start` recorded this head as the machine's current cluster (in its temp dir and in
        # /tmp/ray), which a later bare ray.init() would try to join; `ray stop` removes the record.
        for current in (self.temp_dir / "ray_current_cluster", Path("/tmp/ray/ray_current_cluster")):
            with contextlib.suppress(OSError):
                if current.read_text().strip().endswith(f":{self.gcs_port}"):
                    current.unlink()
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # Ray's files of this cluster, its logs included

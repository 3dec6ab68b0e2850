"""cluster/local_cluster.sh: a real head + worker Ray cluster on this machine, with token auth, runs the
cpu-tiny RayJob's entrypoint and serves the cpu-tiny RayService's serve config; `stop` then leaves none
of its processes, and touches no other cluster."""

from __future__ import annotations

import base64
import io
import os
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from local_cluster import free_port, wait_until
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "cluster" / "local_cluster.sh"
TINY = ROOT / "k8s" / "cpu-tiny"
BIN = Path(sys.executable).parent


class LocalCluster:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir
        self.script_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}

    def script(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(SCRIPT), *args, "--state-dir", str(self.state_dir)],
            env=self.script_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def state(self) -> dict:
        lines = (self.state_dir / "state.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)

    def env(self) -> dict:
        """A client's environment: this cluster's token, explicitly, whatever the caller's environment holds."""
        env = {k: v for k, v in self.script_env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        token = Path(self.state()["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONPATH": str(ROOT)}

    def api(self, path: str) -> dict:
        """GET from the dashboard's REST API, with the token."""
        headers = {"Authorization": f"Bearer {self.env()['RAY_AUTH_TOKEN']}"}
        response = httpx.get(f"{self.state()['RAY_DASHBOARD']}{path}", headers=headers, timeout=30)
        response.raise_for_status()
        return response.json()

    def nodes(self) -> dict[str, dict]:
        """The live nodes, by name."""
        nodes = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return {n["node_name"]: n for n in nodes if n["state"] == "ALIVE"}

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]], env=self.env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    def processes(self) -> set[int]:
        """Every process of the recorded nodes: their process groups and all their descendants."""
        leaders = {int(line.split()[1]) for line in (self.state_dir / "nodes").read_text().splitlines()}
        stats = {}
        for entry in Path("/proc").iterdir():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                stats[int(entry.name)] = (fields[0], int(fields[1]), int(fields[2]))  # state, ppid, pgid
            except (ValueError, OSError):
                continue
        mine = {pid for pid, (state, _, pgid) in stats.items() if pgid in leaders and state != "Z"}
        while more := {pid for pid, (state, ppid, _) in stats.items() if ppid in mine and state != "Z"} - mine:
            mine |= more
        return mine


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("local-cluster"))
    started = c.script("start", "--workers", "1", "--cpus-per-worker", "3")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield c
    finally:
        c.script("stop")


def test_start_makes_a_head_and_a_worker_with_token_auth(cluster):
    state = cluster.state()
    assert state["RAY_AUTH_MODE"] == "token"
    nodes = cluster.nodes()
    assert set(nodes) == {"head", "worker-1"}
    assert nodes["head"]["resources_total"].get("CPU", 0) == 0
    assert nodes["worker-1"]["resources_total"]["CPU"] == 3
    # Without the token the dashboard refuses (with it, cluster.api above was answered).
    assert httpx.get(f"{state['RAY_DASHBOARD']}/api/jobs/").status_code == 401
    status = cluster.script("status")
    assert "head: running" in status.stdout and "worker-1: running" in status.stdout


def set_option(argv: list[str], option: str, value: str) -> list[str]:
    i = argv.index(option)
    return [*argv[: i + 1], value, *argv[i + 2 :]]


def test_the_rayjob_entrypoint_runs_across_the_nodes(cluster, tmp_path):
    (job,) = yaml.safe_load_all((TINY / "rayjob.yaml").read_text())
    argv = shlex.split(job["spec"]["entrypoint"])
    argv = set_option(argv, "--input", "examples/prompts.jsonl")
    argv = set_option(argv, "--output", str(tmp_path / "run"))
    argv += ["--width", "64", "--height", "64", "--steps", "2"]
    address = cluster.state()["RAY_DASHBOARD"]
    submitted = cluster.run("ray", "job", "submit", "--address", address, "--working-dir", ".", "--", *argv)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    assert "written=6 skipped=0 invalid=0 duplicate=0 conflict=0 failed=0" in submitted.stdout
    images = sorted((tmp_path / "run" / "images").iterdir())
    assert len(images) == 6 and len(list((tmp_path / "run" / "metadata").iterdir())) == 6
    assert {Image.open(p).format for p in images} == {"PNG"}


def test_the_rayservice_serve_config_answers_http(cluster, tmp_path):
    (service,) = yaml.safe_load_all((TINY / "rayservice.yaml").read_text())
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    port = free_port()
    config["http_options"]["port"] = port
    (tmp_path / "serve.yaml").write_text(yaml.safe_dump(config))
    address = cluster.state()["RAY_DASHBOARD"]
    deployed = cluster.run("serve", "deploy", str(tmp_path / "serve.yaml"), "--address", address)
    assert deployed.returncode == 0, deployed.stderr[-2000:]

    def running() -> dict | None:
        app = cluster.api("/api/serve/applications/")["applications"].get("fluxray", {})
        return app if app.get("status") == "RUNNING" else None

    app = wait_until(running, 240, "the fluxray application", 1)
    # Every replica is on the worker: the head has no CPU to give.
    replica_nodes = {r["node_id"] for d in app["deployments"].values() for r in d["replicas"]}
    assert replica_nodes == {cluster.nodes()["worker-1"]["node_id"]}
    body = {"prompt": "a cat", "size": "64x64", "num_inference_steps": 2}
    response = httpx.post(f"http://127.0.0.1:{port}/v1/images/generations", json=body, timeout=120)
    assert response.status_code == 200, response.text
    (image,) = response.json()["data"]
    assert Image.open(io.BytesIO(base64.b64decode(image["b64_json"]))).size == (64, 64)


def test_stop_ends_every_process_it_started_and_only_those(cluster):
    before = cluster.processes()
    leaders = {int(line.split()[1]) for line in (cluster.state_dir / "nodes").read_text().splitlines()}
    temp_dir = Path(cluster.state()["RAY_TEMP_DIR"])
    assert leaders <= before and len(before) > len(leaders)  # the nodes, and the raylets, workers, ... they run
    # A process that looks like Ray's but is none of ours: `ray stop` would kill it (it matches command lines
    # such as "log_monitor.py"), and so would stop if it did the same.
    bystander = subprocess.Popen(["bash", "-c", "exec -a log_monitor.py sleep 300"], start_new_session=True)
    try:
        stopped = cluster.script("stop")
        assert stopped.returncode == 0 and "killing" not in stopped.stderr, stopped.stderr
        assert [pid for pid in before if alive(pid)] == []
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
    assert not temp_dir.exists() and not (cluster.state_dir / "state.env").exists()
    assert "no cluster recorded" in cluster.script("status").stdout

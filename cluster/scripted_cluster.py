"""A Python handle on a cluster that `cluster/local_cluster.sh` runs: its script, its state, a client's
environment (its token), its dashboard's REST API, and the processes of its nodes.

Used by the tests (tests/cluster/) and by benchmarks/failover.py; nothing here starts Ray itself.

    from cluster.scripted_cluster import LocalCluster  # from the repository root
    cluster = LocalCluster(Path("/tmp/my-cluster"))
    cluster.script("start", "--workers", "1", "--gcs-redis")
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cluster" / "local_cluster.sh"
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

    def serve_url(self, worker: int) -> str:
        """The HTTP address of Serve's proxy on worker-N (each worker's proxy has a port of its own)."""
        return f"http://127.0.0.1:{self.state()[f'FLUXRAY_WORKER_{worker}_SERVE_PORT']}"

    def env(self) -> dict:
        """A client's environment: this cluster's token, explicitly, whatever the caller's environment holds."""
        env = {k: v for k, v in self.script_env.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
        token = Path(self.state()["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONPATH": str(ROOT)}

    def api(self, path: str, timeout: float = 30) -> dict:
        """GET from the dashboard's REST API, with the token."""
        headers = {"Authorization": f"Bearer {self.env()['RAY_AUTH_TOKEN']}"}
        response = httpx.get(f"{self.state()['RAY_DASHBOARD']}{path}", headers=headers, timeout=timeout)
        response.raise_for_status()
        return response.json()

    def nodes(self) -> dict[str, dict]:
        """The live nodes, by name."""
        nodes = self.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        return {n["node_name"]: n for n in nodes if n["state"] == "ALIVE"}

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """A command of this venv (ray, serve, python) as a client of the cluster, from the repository root."""
        return subprocess.run(
            [str(BIN / args[0]), *args[1:]], env=self.env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )

    def processes(self, *names: str) -> set[int]:
        """Every process of the recorded nodes (or of the nodes named): their process groups and all their
        descendants."""
        lines = [line.split() for line in (self.state_dir / "nodes").read_text().splitlines()]
        leaders = {int(pid) for name, pid in lines if not names or name in names}
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

"""cluster/local_cluster.sh: a real head + worker Ray cluster on this machine, with token auth, runs the
cpu-tiny RayJob's entrypoint and serves the cpu-tiny RayService's serve config; `stop` then leaves none
of its processes, and touches no other cluster. With `--gcs-redis`, the head's GCS keeps its tables in a
real redis-server: a head killed with SIGKILL and restarted takes back its worker and a detached actor
with its state."""

from __future__ import annotations

import base64
import io
import json
import os
import shlex
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml
from local_cluster import free_port, wait_until
from PIL import Image

from cluster.scripted_cluster import LocalCluster, alive

ROOT = Path(__file__).resolve().parents[2]

TINY = ROOT / "k8s" / "cpu-tiny"


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


def test_restart_head_refuses_a_cluster_without_gcs_redis(cluster):
    # Without GCS fault tolerance a new head would not know the workers (their node ids, actors): refused
    # before anything is touched.
    head = cluster.processes("head")
    refused = cluster.script("restart-head")
    assert refused.returncode != 0 and refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("local_cluster.sh: restart-head needs a cluster started with --gcs-redis"), line
    assert all(alive(pid) for pid in head) and set(cluster.nodes()) == {"head", "worker-1"}


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


# A driver of its own for each step, as a client after a head crash would be: a detached named actor (owned
# by the GCS, not by the driver) that counts, on the worker (the head has no CPU), and a task that needs
# the worker's other CPU, so that the worker must be in the cluster's resource view.
COUNTER_DRIVER = """
import json, os, sys
import ray

ray.init(address=sys.argv[1], namespace="fluxray-ft-test", log_to_driver=False)


@ray.remote(num_cpus=1)
class Counter:
    def __init__(self):
        self.value = 0

    def increment(self):
        self.value += 1
        return self.value

    def where(self):
        return os.getpid(), ray.get_runtime_context().get_node_id()


@ray.remote(num_cpus=1)
def node_of_a_task():
    return ray.get_runtime_context().get_node_id()


if sys.argv[2] == "create":
    counter = Counter.options(name="counter", lifetime="detached").remote()
    values = [ray.get(counter.increment.remote(), timeout=60) for _ in range(3)]
else:
    counter = ray.get_actor("counter", namespace="fluxray-ft-test")
    values = [ray.get(counter.increment.remote(), timeout=60)]
pid, node = ray.get(counter.where.remote(), timeout=60)
task_node = ray.get(node_of_a_task.remote(), timeout=60)
print(json.dumps({"values": values, "pid": pid, "node": node, "task_node": task_node}))
"""


# A node's own processes, by what their command lines hold (the agents rename themselves once started).
NODE_DAEMONS = {
    "ray start": ("ray start --block",),
    "raylet": ("/raylet/raylet ",),
    "dashboard agent": ("ray::DashboardAgent", "/dashboard/agent.py"),
    "runtime env agent": ("ray::RuntimeEnvAgent", "/runtime_env/agent/main.py"),
}


def describe(pid: int) -> str:
    """A process's state, parent, group and command, for a failure's message."""
    try:
        state, ppid, pgid = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[:3]
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"
    return f"{state} ppid={ppid} pgid={pgid} {command[:150]}"


def node_daemon(pid: int) -> str | None:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return next((name for name, marks in NODE_DAEMONS.items() if any(m in command for m in marks)), None)


@pytest.fixture(scope="module")
def ft_cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("ft-cluster"))
    started = c.script("start", "--workers", "1", "--cpus-per-worker", "2", "--gcs-redis")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        yield c
    finally:
        c.script("stop")


def counter_driver(cluster: LocalCluster, step: str) -> dict:
    done = cluster.run("python", "-c", COUNTER_DRIVER, cluster.state()["RAY_ADDRESS"], step, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_detached_actor_and_its_worker_outlive_a_head_crash_with_the_gcs_in_redis(ft_cluster):
    state = ft_cluster.state()
    redis_pid = int((ft_cluster.state_dir / "redis.pid").read_text())
    namespace = state["FLUXRAY_GCS_STORAGE_NAMESPACE"]
    # The GCS keeps its tables in this cluster's redis-server, under the cluster's own namespace.
    redis_env = {**os.environ, "REDISCLI_AUTH": Path(state["FLUXRAY_REDIS_PASSWORD_PATH"]).read_text().strip()}
    host, port = state["FLUXRAY_REDIS_ADDRESS"].split(":")
    keys = subprocess.run(
        ["redis-cli", "-h", host, "-p", port, "--scan"], env=redis_env, capture_output=True, text=True, timeout=30
    )
    assert keys.returncode == 0 and any(key.startswith(f"RAY{namespace}@") for key in keys.stdout.split()), keys

    before = counter_driver(ft_cluster, "create")
    nodes = ft_cluster.nodes()
    worker_id, old_head_id = nodes["worker-1"]["node_id"], nodes["head"]["node_id"]
    assert before["values"] == [1, 2, 3] and before["node"] == before["task_node"] == worker_id

    # A head that runs is not restarted over.
    running = ft_cluster.script("restart-head")
    assert running.returncode != 0 and "kill-head first" in running.stderr

    head, worker = ft_cluster.processes("head"), ft_cluster.processes("worker-1")
    assert before["pid"] in worker and len(head) > 3  # the node, its GCS, raylet, dashboard, ...
    # The worker node itself (its `ray start`, raylet and agents) and the actor's process; the node's idle
    # worker processes may end meanwhile for their own reasons (the raylet reaps a finished job's).
    daemons = {pid: name for pid in worker if (name := node_daemon(pid))}
    assert sorted(daemons.values()) == sorted(NODE_DAEMONS), daemons
    killed = ft_cluster.script("kill-head")
    assert killed.returncode == 0, killed.stderr
    assert {pid: describe(pid) for pid in head if alive(pid)} == {}, killed.stdout
    time.sleep(2)  # the worker has noticed the lost GCS by now
    assert {pid: name for pid, name in daemons.items() if not alive(pid)} == {}
    assert alive(before["pid"]) and alive(redis_pid)
    assert "head: stopped" in ft_cluster.script("status").stdout

    t0 = time.monotonic()
    restarted = ft_cluster.script("restart-head")
    head_up_s = time.monotonic() - t0
    assert restarted.returncode == 0, restarted.stdout + restarted.stderr
    assert ft_cluster.state()["RAY_ADDRESS"] == state["RAY_ADDRESS"]  # same GCS address, same dashboard

    def back() -> dict:
        # Every node the GCS knows, by id: the killed head stays listed (DEAD) beside the new one.
        nodes = ft_cluster.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        states = {n["node_id"]: (n["node_name"], n["state"]) for n in nodes}
        # The same worker node (not a new registration), a new head, and the killed head DEAD.
        ready = states.get(worker_id) == ("worker-1", "ALIVE") and states.get(old_head_id) == ("head", "DEAD")
        assert ready and sorted(states.values()) == [("head", "ALIVE"), ("head", "DEAD"), ("worker-1", "ALIVE")], states
        return states

    wait_until(back, 120, "the worker ALIVE, a new head ALIVE and the killed head DEAD")
    nodes_back_s = time.monotonic() - t0

    after = counter_driver(ft_cluster, "get")
    actor_back_s = time.monotonic() - t0
    # The same actor process, its state intact, and the worker schedules new work.
    assert after["values"] == [4] and after["pid"] == before["pid"]
    assert after["node"] == after["task_node"] == worker_id
    assert {pid: name for pid, name in daemons.items() if not alive(pid)} == {}
    print(
        f"\nhead restart: up {head_up_s:.1f}s, nodes ALIVE {nodes_back_s:.1f}s, actor answered {actor_back_s:.1f}s"
        " after restart-head began"
    )


def test_stop_ends_the_restarted_head_the_worker_and_redis(ft_cluster):
    before = ft_cluster.processes()
    redis_pid = int((ft_cluster.state_dir / "redis.pid").read_text())
    assert alive(redis_pid) and len(before) > 4
    stopped = ft_cluster.script("stop")
    assert stopped.returncode == 0 and "killing" not in stopped.stderr, stopped.stderr
    assert [pid for pid in before | {redis_pid} if alive(pid)] == []
    # Redis's config (with its password), its password file and its dump of the GCS tables are gone.
    assert not (ft_cluster.state_dir / "redis").exists() and not (ft_cluster.state_dir / "redis_password").exists()
    assert "no cluster recorded" in ft_cluster.script("status").stdout

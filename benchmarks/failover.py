"""Failover under load: the head killed, the serve config rolled out, the Denoiser scaled down, each
while clients stream requests through a worker node's Serve proxy.

    python benchmarks/failover.py                  # its own cluster (cluster/local_cluster.sh --gcs-redis)
    python benchmarks/failover.py --clients 4 --outage-s 20

The cluster: a head with no CPUs (Serve's controller, the GCS with its tables in a real redis-server)
and one worker node that runs every replica and a Serve proxy of its own port; the clients go through
that proxy, as a Kubernetes Service goes through the worker pods'. The app is the shipped local config
with two Denoiser replicas. `--clients` threads each send generations back to back, each with a seed
of its own, for the whole of a scenario:

- head: every process of the head node SIGKILLed, `--outage-s` later the head restarted against the same
  Redis; the scenario ends `--after-s` after the application is RUNNING again;
- rollout-in-place: a `serve deploy` that changes the Denoiser's autoscaling bounds and its user_config
  (batch size, scheduling policy), which Serve applies to the running replicas;
- rollout-replace: a `serve deploy` that changes a speed switch in the app's args (fused QKV), after
  which Serve replaces every replica of every deployment, the ingress' too;
- downscale: the Denoiser from two replicas to one while both hold requests (longer ones: 128x128 at
  16 steps); the replica removed finishes what it holds before it exits (graceful_shutdown_timeout_s).

Reported per scenario: requests sent and failed (every answer but a 200 with an image counts as a
failure; the goal is 0), the longest request latency (and during the outage or the rollout), the
seconds until the application was RUNNING again, which replicas the event kept or replaced, and how
many images differ from the engine's for their seed (by more than 2/255: batching's float noise).
Writes benchmarks/results/failover-cpu.json. tests/cluster/test_failover.py runs the same scenarios
shorter and asserts on them.
"""

from __future__ import annotations

import argparse
import base64
import copy
import io
import json
import platform
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "cluster"))
from reporting import write_report  # noqa: E402 - benchmarks/ is the script's own folder
from scripted_cluster import LocalCluster  # noqa: E402 - cluster/ is not a package
from serve_load import free_port  # noqa: E402

from fluxray.params import GenerationParams  # noqa: E402
from fluxray.pipeline import Pipeline  # noqa: E402

LOCAL_CONFIG = ROOT / "deployments" / "configs" / "local.yaml"
PROMPT = "a red circle on the left, blue background"
APP = "fluxray"
TOLERANCE = 2  # /255: a batched image may differ from the one made alone by float noise


@dataclass
class Answer:
    seed: int
    sent: float  # time.monotonic()
    seconds: float
    status: int  # HTTP status; 0 when there was no answer (connection refused or reset, timeout)
    error: str = ""
    png: bytes | None = None


class Stream:
    """`clients` threads, each POSTing /v1/images/generations back to back through `url` with seeds of
    its own, from entering the `with` until leaving it."""

    def __init__(self, url: str, clients: int = 3, size: str = "64x64", steps: int = 4, first_seed: int = 0):
        self.url, self.clients, self.size, self.steps = url, clients, size, steps
        self.answers: list[Answer] = []
        self._seeds = iter(range(first_seed, first_seed + 10**7))
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _client(self) -> None:
        with httpx.Client(timeout=300) as http:
            while not self._stop.is_set():
                with self._lock:
                    seed = next(self._seeds)
                body = {"prompt": PROMPT, "size": self.size, "num_inference_steps": self.steps, "seed": seed}
                sent = time.monotonic()
                try:
                    r = http.post(f"{self.url}/v1/images/generations", json=body)
                    answer = Answer(seed, sent, time.monotonic() - sent, r.status_code)
                    if r.status_code == 200:
                        answer.png = base64.b64decode(r.json()["data"][0]["b64_json"])
                    else:
                        answer.error = r.text[:300]
                except Exception as error:  # noqa: BLE001 - every failure is recorded, none is raised
                    answer = Answer(seed, sent, time.monotonic() - sent, 0, repr(error)[:300])
                with self._lock:
                    self.answers.append(answer)

    def __enter__(self) -> Stream:
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()

    def sent_since(self, t: float) -> int:
        with self._lock:
            return sum(a.sent >= t for a in self.answers)


def summary(answers: list[Answer], window: tuple[float, float] | None = None) -> dict:
    """Counts and latencies; with a window, also the requests in flight at any moment of it."""
    failed = [a for a in answers if a.status != 200 or not a.png]
    out = {
        "sent": len(answers),
        "failed": len(failed),
        "failures": [f"seed {a.seed}: {a.status} {a.error}" for a in failed[:5]],
        "max_latency_s": round(max((a.seconds for a in answers), default=0.0), 3),
        "p50_latency_s": round(float(np.median([a.seconds for a in answers])), 3) if answers else None,
    }
    if window:
        during = [a for a in answers if a.sent <= window[1] and a.sent + a.seconds >= window[0]]
        out["in_flight_during"] = len(during)
        out["failed_during"] = sum(a.status != 200 or not a.png for a in during)
        out["max_latency_during_s"] = round(max((a.seconds for a in during), default=0.0), 3)
    return out


def differing_images(answers: list[Answer], pipeline: Pipeline, size: str, steps: int) -> list[str]:
    """The seeds whose image differs from the engine's by more than TOLERANCE (the engine makes runs of
    up to 8 consecutive seeds in one call: image i of a request has seed + i)."""
    width, height = (int(v) for v in size.split("x"))
    got = {a.seed: a.png for a in answers if a.status == 200 and a.png}
    seeds, runs = sorted(got), []
    for seed in seeds:
        if runs and seed == runs[-1][-1] + 1 and len(runs[-1]) < 8:
            runs[-1].append(seed)
        else:
            runs.append([seed])
    differing = []
    for run in runs:
        params = GenerationParams(
            prompt=PROMPT, width=width, height=height, num_inference_steps=steps, seed=run[0], n=len(run)
        )
        for seed, image in zip(run, pipeline.generate(params), strict=True):
            pixels = np.asarray(Image.open(io.BytesIO(got[seed])).convert("RGB"))
            diff = int(np.abs(pixels.astype(np.int16) - image.pixels.astype(np.int16)).max())
            if diff > TOLERANCE:
                differing.append(f"seed {seed}: {diff}/255")
    return differing


def serve_config(http_port: int) -> dict:
    """The shipped local config, with two Denoiser replicas (one is removed by the downscale), serving the
    tiny model alone (the scenarios generate; the edit variants' Denoisers would only add processes)."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["http_options"]["port"] = http_port
    app = config["applications"][0]
    app["args"].pop("models", None)
    app["deployments"] = [d for d in app["deployments"] if not d["name"].startswith("Denoiser-")]
    for deployment in app["deployments"]:
        if deployment["name"] == "Denoiser":
            deployment["autoscaling_config"].update(min_replicas=2, max_replicas=2)
    return config


def with_denoiser(config: dict, **changes) -> dict:
    """A copy of the config with the Denoiser deployment's entries changed."""
    config = copy.deepcopy(config)
    for deployment in config["applications"][0]["deployments"]:
        if deployment["name"] == "Denoiser":
            for key, value in changes.items():
                if isinstance(value, dict) and isinstance(deployment.get(key), dict):
                    deployment[key] = {**deployment[key], **value}
                else:
                    deployment[key] = value
    return config


class Service:
    """The fluxray application on a LocalCluster: deploys, its state from the dashboard, and calls
    into its replicas from a driver of its own."""

    def __init__(self, cluster: LocalCluster, workdir: Path):
        self.cluster, self.workdir = cluster, workdir
        self.config: dict | None = None

    def app(self, timeout: float = 10) -> dict:
        return self.cluster.api("/api/serve/applications/", timeout=timeout)["applications"].get(APP, {})

    def replicas(self) -> dict[str, list[str]]:
        """The running replicas of each deployment: replica id and pid."""
        deployments = self.app()["deployments"]
        return {
            name: sorted(f"{r['replica_id']}:{r['pid']}" for r in d["replicas"] if r["state"] == "RUNNING")
            for name, d in deployments.items()
        }

    def deploy(self, config: dict, timeout: float = 300) -> float:
        """`serve deploy`, then wait until the application has taken it and is RUNNING with every
        deployment at its target; the seconds that took."""
        started = time.monotonic()
        try:
            before = self.app().get("last_deployed_time_s")
        except httpx.HTTPError:
            before = None
        path = self.workdir / f"serve-{time.monotonic_ns()}.yaml"
        path.write_text(yaml.safe_dump(config))
        deployed = self.cluster.run("serve", "deploy", str(path), "--address", self.cluster.state()["RAY_DASHBOARD"])
        if deployed.returncode != 0:
            raise RuntimeError(f"serve deploy failed: {deployed.stderr[-2000:]}")
        self.config = config
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                app = self.app()
            except httpx.HTTPError:
                app = {}
            if app.get("last_deployed_time_s") != before and self.settled(app):
                return time.monotonic() - started
            time.sleep(0.5)
        raise TimeoutError(f"the application was not RUNNING {timeout:.0f} s after serve deploy")

    def settled(self, app: dict) -> bool:
        """RUNNING, and each deployment has exactly its target of running replicas, none starting or
        stopping (RUNNING comes before an old replica has finished draining)."""
        if app.get("status") != "RUNNING":
            return False
        targets = {
            d["name"]: d["autoscaling_config"]["min_replicas"] for d in self.config["applications"][0]["deployments"]
        }
        for name, deployment in app["deployments"].items():
            states = [r["state"] for r in deployment["replicas"]]
            if deployment["status"] != "HEALTHY" or states != ["RUNNING"] * targets[name]:
                return False
        return True

    def driver(self, code: str) -> object:
        """Run code in a Ray driver of its own, connected to the cluster; the JSON it prints last."""
        prelude = (
            "import json, sys, ray\nfrom ray import serve\n"
            f"ray.init(address={self.cluster.state()['RAY_ADDRESS']!r}, logging_level='ERROR', log_to_driver=False)\n"
            # The state API finds its cluster by itself unless told, and refuses when another Ray runs here.
            f"DASHBOARD = {self.cluster.state()['RAY_DASHBOARD']!r}\n"
        )
        done = self.cluster.run("python", "-c", prelude + code, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-2000:])
        return json.loads(done.stdout.strip().splitlines()[-1])

    def ingress_retries(self) -> int:
        """Generations the ingress re-ran after a stage replica was lost under them."""
        code = "h = serve.get_deployment_handle('Ingress', app_name=%r)\nprint(json.dumps(h.stats.remote().result()))\n"
        return self.driver(code % APP)["retries"]

    def when_denoisers_busy(self, at_least: int = 1, within_s: float = 60) -> dict[str, int]:
        """Waits until every Denoiser replica holds `at_least` requests (as Serve's router counts them);
        their counts then, by replica actor name."""
        code = f"""
import time
from ray.util.state import list_actors
names = sorted(a.name for a in list_actors(address=DASHBOARD, filters=[("state", "=", "ALIVE")], limit=10000)
               if (a.name or "").startswith("SERVE_REPLICA::{APP}#Denoiser#"))
replicas = [ray.get_actor(name, namespace="serve") for name in names]
deadline = time.monotonic() + {within_s}
while True:
    ongoing = ray.get([r.get_num_ongoing_requests.remote() for r in replicas], timeout=30)
    if min(ongoing) >= {at_least} or time.monotonic() > deadline:
        break
    time.sleep(0.05)
print(json.dumps(dict(zip(names, ongoing))))
"""
        return self.driver(code)


# --- the scenarios -------------------------------------------------------------------------------


def head_failure(service: Service, url: str, clients: int, outage_s: float, after_s: float, warm_s: float = 3) -> dict:
    """SIGKILL every process of the head under load, restart it `outage_s` later against the same
    Redis, and keep the load on until `after_s` after the application is RUNNING again."""
    cluster = service.cluster
    replicas = service.replicas()
    with Stream(url, clients, first_seed=1_000_000) as stream:
        time.sleep(warm_s)
        killed = cluster.script("kill-head")
        if killed.returncode != 0:
            raise RuntimeError(f"kill-head: {killed.stderr}")
        killed_at = time.monotonic()
        time.sleep(outage_s)
        served_while_down = stream.sent_since(killed_at)
        restart_at = time.monotonic()
        restarted = cluster.script("restart-head")
        if restarted.returncode != 0:
            raise RuntimeError(f"restart-head: {restarted.stderr}")
        head_up_at = time.monotonic()
        while True:  # the dashboard is back with the head; Serve's state with its restarted controller
            try:
                if service.app(timeout=5).get("status") == "RUNNING":
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() - restart_at > 300:
                raise TimeoutError("the application was not RUNNING 300 s after the head restarted")
            time.sleep(0.25)
        running_at = time.monotonic()
        time.sleep(after_s)
    status = cluster.run("serve", "status", "--address", cluster.state()["RAY_DASHBOARD"], timeout=60)
    return {
        **summary(stream.answers, (killed_at, running_at)),
        "requests_sent_while_head_down": served_while_down,
        "head_down_s": round(restart_at - killed_at, 2),
        "head_restart_s": round(head_up_at - restart_at, 2),
        "running_after_restart_s": round(running_at - restart_at, 2),
        "running_after_kill_s": round(running_at - killed_at, 2),
        "serve_status_ok": status.returncode == 0
        and yaml.safe_load(status.stdout)["applications"][APP]["status"] == "RUNNING",
        "replicas_kept": service.replicas() == replicas,
        "_answers": stream.answers,
    }


def rollout(service: Service, url: str, clients: int, config: dict, after_s: float, warm_s: float = 2) -> dict:
    """`serve deploy` a changed config under load; the load goes on `after_s` after it settled."""
    replicas = service.replicas()
    with Stream(url, clients, first_seed=2_000_000 + int(time.monotonic()) % 1000 * 1000) as stream:
        time.sleep(warm_s)
        started = time.monotonic()
        settled_s = service.deploy(config)
        settled = time.monotonic()
        time.sleep(after_s)
    after = service.replicas()
    return {
        **summary(stream.answers, (started, settled)),
        "settled_after_s": round(settled_s, 2),
        "replicas_kept": {name: after.get(name) == ids for name, ids in replicas.items()},
        "replicas_replaced": {name: not set(after.get(name, [])) & set(ids) for name, ids in replicas.items()},
        "_answers": stream.answers,
    }


def downscale(service: Service, url: str, clients: int, config: dict, after_s: float) -> dict:
    """The Denoiser from two replicas to one (config), deployed once both hold requests."""
    retries = service.ingress_retries()
    replicas = service.replicas()["Denoiser"]
    with Stream(url, clients, size="128x128", steps=16, first_seed=3_000_000) as stream:
        ongoing = service.when_denoisers_busy()
        started = time.monotonic()
        settled_s = service.deploy(config)
        settled = time.monotonic()
        time.sleep(after_s)
    kept = service.replicas()["Denoiser"]
    removed = [r for r in replicas if r not in kept]
    return {
        **summary(stream.answers, (started, settled)),
        "ongoing_at_downscale": sorted(ongoing.values()),
        "removed": removed,
        "kept": kept,
        "removed_replica_gone_after_s": round(settled_s, 2),
        "requests_re_run": service.ingress_retries() - retries,
        "_answers": stream.answers,
    }


def start_cluster(state_dir: Path, workers: int = 1, cpus: int = 4) -> LocalCluster:
    cluster = LocalCluster(state_dir)
    started = cluster.script("start", "--workers", str(workers), "--cpus-per-worker", str(cpus), "--gcs-redis")
    if started.returncode != 0:
        cluster.script("stop")
        raise RuntimeError(started.stdout + started.stderr)
    return cluster


def in_place_change(config: dict) -> dict:
    """Autoscaling bounds and the Denoiser's user_config: applied to the running replicas."""
    return with_denoiser(
        config,
        autoscaling_config={"max_replicas": 3},
        user_config={"denoiser_max_batch_images": 2, "scheduler": "fifo"},
    )


def replacing_change(config: dict) -> dict:
    """A speed switch in the app's args: every deployment's replicas are replaced."""
    config = copy.deepcopy(config)
    config["applications"][0]["args"]["speed"] = {"fuse_qkv": "on"}
    return config


def public(result: dict) -> dict:
    return {k: v for k, v in result.items() if not k.startswith("_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--outage-s", type=float, default=15)
    parser.add_argument("--after-s", type=float, default=10)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "failover-cpu.json"))
    args = parser.parse_args()
    pipeline = Pipeline.load("tiny", device="cpu")
    with tempfile.TemporaryDirectory(prefix="fluxray-failover-") as tmp:
        cluster = start_cluster(Path(tmp) / "cluster")
        try:
            service = Service(cluster, Path(tmp))
            config = serve_config(free_port())
            deployed_s = service.deploy(config)
            url = cluster.serve_url(1)
            scenarios = {}
            scenarios["head"] = head_failure(service, url, args.clients, args.outage_s, args.after_s)
            scenarios["rollout_in_place"] = rollout(service, url, args.clients, in_place_change(config), args.after_s)
            changed = replacing_change(in_place_change(config))
            scenarios["rollout_replace"] = rollout(service, url, args.clients, changed, args.after_s)
            scenarios["downscale"] = downscale(
                service,
                url,
                args.clients * 2,
                with_denoiser(changed, autoscaling_config={"min_replicas": 1, "max_replicas": 1}),
                args.after_s,
            )
        finally:
            cluster.script("stop")
    for name, result in scenarios.items():
        size, steps = ("128x128", 16) if name == "downscale" else ("64x64", 4)
        result["images_differing_from_the_engine"] = len(differing_images(result["_answers"], pipeline, size, steps))
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "cluster": "head (0 CPUs, GCS in redis-server) + 1 worker (4 CPUs); clients through the worker's proxy",
        "clients": args.clients,
        "first_deploy_s": round(deployed_s, 2),
        "scenarios": {name: public(result) for name, result in scenarios.items()},
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()

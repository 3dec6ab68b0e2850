"""Overload: several times the service's capacity for a fixed time, and what it answers.

    python benchmarks/overload.py                   # local.yaml (its own bounds) on a Ray of its own, 4x for 60 s
    python benchmarks/overload.py --url http://HOST:8000 --clients 256 --seconds 120

`--clients` callers each send requests back to back (distinct seeds) for `--seconds`; capacity is
what the service admits at once (the ingress' max_pending_requests; 32 in local.yaml), so the default
128 clients are 4x that. Every answer must be 200 or 429/503 with Retry-After; every 200 must be a
valid image of the size asked. Reported: answers by code, admitted images/s, latency of 200s,
the RSS of this machine's Serve replica processes before and after (and their pids: none may have
restarted), and /healthz afterwards. tests/deployments/test_overload.py runs `drive` for a shorter time.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import platform
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from reporting import write_report  # noqa: E402 - benchmarks/ is the script's own folder
from serve_load import PROMPTS, percentile, start_service  # noqa: E402

from cluster.ray_head import MARKER  # noqa: E402
from fluxray.params import parse_size  # noqa: E402


def replica_memory(app: str, cluster_marker: str | None = None) -> dict[str, dict]:
    """pid and RSS (MiB) of each local Serve replica process of `app`, by its process title; with
    `cluster_marker`, only the processes of that RayHead (cluster/ray_head.py), not another Ray's."""
    out = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        marker = f"ServeReplica:{app}:"
        if marker in title:
            if cluster_marker is not None:
                try:
                    if proc.environ().get(MARKER) != cluster_marker:
                        continue
                except psutil.Error:
                    continue
            name = title.split(marker, 1)[1].split()[0]
            try:
                out[f"{name}#{proc.info['pid']}"] = {
                    "pid": proc.info["pid"],
                    "rss_mib": round(proc.memory_info().rss / 2**20, 1),
                }
            except psutil.NoSuchProcess:
                pass
    return out


def drive(
    url: str, clients: int, seconds: float, size: str = "128x128", steps: int = 4, headers: dict | None = None
) -> dict:
    """Send back-to-back requests from `clients` threads for `seconds`; the answers, tallied and checked."""
    width, height = parse_size(size)
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    codes: Counter = Counter()
    latencies: list[float] = []
    problems: list[str] = []
    seq = iter(range(10**9))

    def client(_: int) -> None:
        with httpx.Client(timeout=300, headers=headers) as http:
            while time.monotonic() < stop:
                with lock:
                    i = next(seq)
                body = {
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "size": size,
                    "num_inference_steps": steps,
                    "seed": 50_000 + i,
                }
                start = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/images/generations", json=body)
                except httpx.HTTPError as error:
                    with lock:
                        codes["transport_error"] += 1
                        problems.append(f"request {i}: {error!r}")
                    continue
                elapsed = time.perf_counter() - start
                problem = _check(r, width, height)
                with lock:
                    codes[r.status_code] += 1
                    if r.status_code == 200:
                        latencies.append(elapsed)
                    if problem:
                        problems.append(f"request {i}: {problem}")

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    wall = time.perf_counter() - started
    ok = codes.get(200, 0)
    return {
        "clients": clients,
        "seconds": seconds,
        "size": size,
        "steps": steps,
        "answers": sum(codes.values()),
        "codes": {str(k): v for k, v in sorted(codes.items(), key=str)},
        "images_per_s": round(ok / wall, 3),
        "p50_s": round(percentile(latencies, 0.5), 3) if latencies else None,
        "p99_s": round(percentile(latencies, 0.99), 3) if latencies else None,
        "max_s": round(max(latencies), 3) if latencies else None,
        "wall_s": round(wall, 2),
        "problems": problems[:20],
        "problem_count": len(problems),
    }


def _check(r: httpx.Response, width: int, height: int) -> str | None:
    """What is wrong with an answer, or None."""
    if r.status_code in (429, 503):
        if not r.headers.get("retry-after", "").isdigit():
            return f"{r.status_code} without Retry-After: {r.text[:200]}"
        # fluxray's own rejections are OpenAI-style JSON; Serve's proxy (its queue full) answers text.
        if r.headers.get("content-type", "").startswith("application/json"):
            return None if r.json().get("error", {}).get("message") else f"{r.status_code} without an error message"
        return None if r.text.strip() else f"{r.status_code} with an empty body"
    if r.status_code != 200:
        return f"unexpected {r.status_code}: {r.text[:200]}"
    try:
        (item,) = r.json()["data"]
        image = Image.open(io.BytesIO(base64.b64decode(item["b64_json"])))
        image.load()
    except Exception as error:  # noqa: BLE001 - any failure to read it is the finding
        return f"200 without a valid image: {error!r}"
    return None if image.size == (width, height) else f"200 with a {image.size} image"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--url", default=None, help="a running service; default: local.yaml on a Ray instance of its own"
    )
    parser.add_argument("--config", default=str(ROOT / "deployments" / "configs" / "local.yaml"))
    parser.add_argument("--app", default="fluxray", help="application name, to find its replica processes")
    parser.add_argument("--clients", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--size", default="128x128")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "overload-cpu.json"))
    args = parser.parse_args()

    cluster, url = (None, args.url) if args.url else start_service(Path(args.config), max_pending_requests=None)
    try:
        drive(url, 4, 5, args.size, args.steps)  # warm-up
        mine = cluster.marker if cluster is not None else None
        before = replica_memory(args.app, mine)
        result = drive(url, args.clients, args.seconds, args.size, args.steps)
        after = replica_memory(args.app, mine)
        healthy = httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    finally:
        if cluster is not None:
            cluster.stop()  # only the processes of its own Ray instance
    report = {
        "benchmark": "overload",
        "env": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "config": {"url": args.url or "serve deploy " + Path(args.config).name},
        "load": result,
        "replicas_before": before,
        "replicas_after": after,
        "replicas_restarted": sorted(set(before) ^ set(after)),
        "rss_growth_mib": round(
            sum(v["rss_mib"] for v in after.values()) - sum(v["rss_mib"] for v in before.values()), 1
        ),
        "healthy_after": healthy,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()

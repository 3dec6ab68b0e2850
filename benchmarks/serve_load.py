"""HTTP load on the Serve graph beside the in-process engine, in the same run.

    python benchmarks/serve_load.py                     # starts `serve run` on local.yaml itself
    python benchmarks/serve_load.py --url http://HOST:8000 --model-size 1024x1024   # a running service

For each concurrency level, a fixed number of requests (one image each, distinct seeds) go through
`POST /v1/images/generations`; we report p50/p99 latency and images/s. The in-process engine then
makes the same images one call at a time (the floor a single request can reach) and as one batch,
so the Serve graph's per-request cost is a measured difference, not a guess.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from reporting import write_report  # noqa: E402 - benchmarks/ is the script's own folder

from fluxray.params import parse_size  # noqa: E402

PROMPTS = ["a lighthouse at dusk", "a red fox in the snow", "a bowl of fruit", "an owl in the rain"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(config: Path, max_pending_requests: int | None = 256) -> tuple[subprocess.Popen, str]:
    """`serve run` the config on a free port; max_pending_requests overrides its bound (None keeps it)."""
    raw = yaml.safe_load(config.read_text())
    port = free_port()
    raw["http_options"]["port"] = port
    # By default, bounds high enough that the benchmark measures latency, not rejections.
    if max_pending_requests is not None:
        raw["applications"][0]["args"]["max_pending_requests"] = max_pending_requests
    tmp = Path(tempfile.mkdtemp()) / "serve.yaml"
    tmp.write_text(yaml.safe_dump(raw))
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "serve"), "run", str(tmp)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit("the service did not come up within 300 s")


def load(url: str, concurrency: int, requests: int, width: int, height: int, steps: int, seed0: int) -> dict:
    def one(i: int) -> float:
        body = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "size": f"{width}x{height}",
            "seed": seed0 + i,
            "num_inference_steps": steps,
        }
        start = time.perf_counter()
        response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
        elapsed = time.perf_counter() - start
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:200]}")
        return elapsed

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": requests,
        "p50_s": round(percentile(latencies, 0.5), 4),
        "p99_s": round(percentile(latencies, 0.99), 4),
        "mean_s": round(statistics.mean(latencies), 4),
        "images_per_s": round(requests / wall, 3),
        "wall_s": round(wall, 2),
    }


def in_process(width: int, height: int, steps: int, images: int, threads: int | None) -> dict:
    import torch

    from fluxray.params import GenerationParams
    from fluxray.pipeline import Pipeline

    torch.set_grad_enabled(False)
    if threads:
        torch.set_num_threads(threads)
    pipeline = Pipeline.load("tiny", device="cpu")
    params = [
        GenerationParams(
            prompt=PROMPTS[i % len(PROMPTS)], width=width, height=height, seed=i, num_inference_steps=steps
        )
        for i in range(images)
    ]
    pipeline.generate(params[0])  # warm-up
    latencies = []
    started = time.perf_counter()
    for p in params:
        t = time.perf_counter()
        pipeline.generate(p)
        latencies.append(time.perf_counter() - t)
    sequential_wall = time.perf_counter() - started
    started = time.perf_counter()
    pipeline.generate(params)
    batched_wall = time.perf_counter() - started
    return {
        "images": images,
        "p50_s": round(percentile(latencies, 0.5), 4),
        "mean_s": round(statistics.mean(latencies), 4),
        "images_per_s_one_at_a_time": round(images / sequential_wall, 3),
        "images_per_s_one_batch": round(images / batched_wall, 3),
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running service; default: start local.yaml here")
    parser.add_argument("--config", default=str(ROOT / "deployments" / "configs" / "local.yaml"))
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load-cpu.json"))
    args = parser.parse_args()
    width, height = parse_size(args.size)

    process, url = (None, args.url) if args.url else start_service(Path(args.config))
    try:
        load(url, 2, 4, width, height, args.steps, 10_000)  # warm-up: first requests load lazily
        levels = [
            load(url, c, max(args.requests, c), width, height, args.steps, 1000 * c)
            for c in (int(v) for v in args.concurrency.split(","))
        ]
    finally:
        if process is not None:
            os.killpg(process.pid, 15)
            process.wait(timeout=60)
            subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], capture_output=True)
    # The engine gets the threads each replica gets (the config's torch_threads), so the difference
    # is the graph's cost, not a different CPU budget.
    threads = yaml.safe_load(Path(args.config).read_text())["applications"][0]["args"].get("torch_threads")
    engine = in_process(width, height, args.steps, images=16, threads=threads)
    single = levels[0]
    report = {
        "benchmark": "serve_load",
        "env": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "config": {"url": args.url or "serve run " + Path(args.config).name, "size": args.size, "steps": args.steps},
        "http": levels,
        "in_process": engine,
        "serve_overhead": {
            "p50_latency_s_at_concurrency_1_minus_in_process": round(single["p50_s"] - engine["p50_s"], 4),
            "latency_ratio_at_concurrency_1": round(single["p50_s"] / engine["p50_s"], 3),
            "best_http_images_per_s_vs_in_process_batch": round(
                max(level["images_per_s"] for level in levels) / engine["images_per_s_one_batch"], 3
            ),
        },
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()

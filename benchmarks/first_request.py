"""The first request after the service reports ready, against the warm ones, with and without warm-up.

    python benchmarks/first_request.py                 # local.yaml (the tiny model, CPU)
    python benchmarks/first_request.py --warm 8 --steps 28

For each setting of `warm_up` (off: every replica starts cold, as before deployments.warmup; on: the
default), a fresh Ray of the benchmark's own deploys the config and waits for /healthz; then one
`POST /generate` (256x256 on local.yaml, its default steps) is timed, then `--warm` more, each with a
prompt of its own (so the prompt cache never helps a warm one more than the first). The report gives
each request's latency and Server-Timing stages, the first's ratio to the warm median, and the time
from deploy to ready, which is where warm-up moves the cost.
"""

from __future__ import annotations

import argparse
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from reporting import write_report  # noqa: E402 - benchmarks/ is the script's own folder
from serve_load import BenchCluster, fluxray_config  # noqa: E402

PROMPTS = [
    "a red circle on the left, white background",
    "a blue square in the center, white background",
    "a green triangle on the right, white background",
    "a yellow circle at the top, white background",
    "a purple square at the bottom, white background",
    "a red triangle in the center, white background",
    "a blue circle on the right, white background",
    "a green square on the left, white background",
    "a yellow triangle at the top, white background",
]


def stages(header: str) -> dict[str, float]:
    """Server-Timing `name;dur=ms, ...` as {name: ms}."""
    return {name: float(ms) for name, ms in re.findall(r"(\w+);dur=([\d.]+)", header or "")}


def one(url: str, prompt: str, seed: int, steps: int | None) -> dict:
    body = {"prompt": prompt, "seed": seed}
    if steps:
        body["num_inference_steps"] = steps
    started = time.monotonic()
    response = httpx.post(f"{url}/generate", json=body, timeout=300)
    seconds = time.monotonic() - started
    response.raise_for_status()
    return {"seconds": round(seconds, 4), "stages_ms": stages(response.headers.get("server-timing", ""))}


def measure(config: Path, warm_up: bool, warm: int, steps: int | None) -> dict:
    raw = fluxray_config(config)
    raw["applications"][0]["args"]["warm_up"] = warm_up
    cluster = BenchCluster().start()
    try:
        started = time.monotonic()
        url = cluster.deploy(raw)
        ready_s = time.monotonic() - started
        first = one(url, PROMPTS[0], 1, steps)
        rest = [one(url, PROMPTS[1 + i % (len(PROMPTS) - 1)], 2 + i, steps) for i in range(warm)]
    finally:
        cluster.stop()
    median = statistics.median(r["seconds"] for r in rest)
    return {
        "warm_up": warm_up,
        "deploy_to_ready_s": round(ready_s, 2),
        "first": first,
        "warm": rest,
        "warm_median_s": round(median, 4),
        "first_over_warm": round(first["seconds"] / median, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=ROOT / "deployments" / "configs" / "local.yaml")
    parser.add_argument("--warm", type=int, default=5, help="warm requests after the first")
    parser.add_argument("--steps", type=int, default=None, help="num_inference_steps (the model's default if unset)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "first_request-cpu.json")
    args = parser.parse_args()
    runs = [measure(args.config, warm_up, args.warm, args.steps) for warm_up in (False, True)]
    report = {
        "benchmark": "first_request",
        "command": "python benchmarks/first_request.py",
        "config": str(args.config.relative_to(ROOT)) if args.config.is_relative_to(ROOT) else str(args.config),
        "machine": {"platform": platform.platform(), "python": platform.python_version()},
        "runs": runs,
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()

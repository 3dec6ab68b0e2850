"""HTTP load on the Serve graph beside a naive one-deployment service and the in-process engine, in one run.

    python benchmarks/serve_load.py                     # its own local Ray: local.yaml, then the naive app
    python benchmarks/serve_load.py --url http://HOST:8000 --size 1024x1024   # a running service only

For each concurrency level, a fixed number of requests (one image each, distinct seeds) go through
`POST /v1/images/generations`; we report p50/p99 latency and images/s. The same load then goes, on
the same fresh Ray instance, to the baseline a user would write instead (benchmarks/naive_app.py:
diffusers' FluxPipeline in one deployment with `@serve.batch(max_batch_size=8)`), and the report
gives fluxray / naive ratios per level. While fluxray serves, its Prometheus metrics are scraped
before and after each level, so each level's mean time per request in each stage (queueing in the
replica included) and in the ingress is a measured split of the latency. The in-process engine
and FluxPipeline then make the same images one call at a time and as one batch, so the cost of
serving is a measured difference, not a guess. The same levels also go through the async API
(`POST /v1/images/jobs`, its events followed to the end, then `GET` of the job), and the report
gives its latency and throughput against the synchronous route's (`async_vs_sync`).

The Ray instance is this script's own (`ray start --head` on free ports, token auth) and is stopped
by killing only the processes it started: a cluster someone else runs on the machine is left alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from reporting import write_report  # noqa: E402 - benchmarks/ is the script's own folder

from cluster.ray_head import RayHead, free_port, wait_until  # noqa: E402, F401 - free_port: benchmarks import it
from fluxray.params import parse_size  # noqa: E402

PROMPTS = ["a lighthouse at dusk", "a red fox in the snow", "a bowl of fruit", "an owl in the rain"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class BenchCluster(RayHead):
    """A Ray head of the benchmark's own (cluster/ray_head.py) on free ports, its metrics exported every
    2 s (each level's show up within seconds); Serve configs are deployed on it in turn."""

    def __init__(self):
        super().__init__(metrics_report_ms=2000)

    def deploy(self, config: dict, timeout: float = 300) -> str:
        """Deploy the config (replacing what runs), wait until it is RUNNING and its first application
        answers /healthz; that application's URL (its route prefix included)."""
        try:
            super().deploy(config, timeout)
        except (RuntimeError, TimeoutError) as error:
            raise SystemExit(f"serve deploy: {error}") from None
        prefix = config["applications"][0].get("route_prefix", "/").rstrip("/")
        url = f"http://127.0.0.1:{config['http_options']['port']}{prefix}"
        try:
            wait_until(lambda: httpx.get(f"{url}/healthz", timeout=2).status_code == 200, timeout, "/healthz")
        except TimeoutError:
            raise SystemExit(f"{config['applications'][0]['name']} did not come up within {timeout:.0f} s") from None
        return url

    def start(self) -> BenchCluster:
        try:
            return super().start()
        except RuntimeError as error:
            raise SystemExit(str(error)) from None


def fluxray_config(config: Path, max_pending_requests: int | None = 256) -> dict:
    """The serve config on a free port; max_pending_requests overrides its bound (None keeps it)."""
    raw = yaml.safe_load(config.read_text())
    raw["http_options"]["port"] = free_port()
    # By default, bounds high enough that the benchmark measures latency, not rejections.
    if max_pending_requests is not None:
        raw["applications"][0]["args"]["max_pending_requests"] = max_pending_requests
    return raw


def naive_config(model: str, threads: int | None, port: int) -> dict:
    """benchmarks/naive_app.py as a serve config: one replica, one CPU, as a user would deploy it.
    The port is the running Serve instance's: Serve keeps its first http_options."""
    return {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [
            {
                "name": "naive",
                "route_prefix": "/",
                "import_path": "benchmarks.naive_app:build_app",
                "args": {"model": model, "threads": threads},
                "deployments": [{"name": "NaiveFlux", "num_replicas": 1, "ray_actor_options": {"num_cpus": 1}}],
            }
        ],
    }


def start_service(config: Path, max_pending_requests: int | None = 256) -> tuple[BenchCluster, str]:
    """A fresh Ray of our own serving the config; stop it with the returned cluster's stop()."""
    cluster = BenchCluster().start()
    try:
        return cluster, cluster.deploy(fluxray_config(config, max_pending_requests))
    except BaseException:
        cluster.stop()
        raise


def scrape(url: str) -> dict[str, float]:
    """Sums of the Prometheus samples (over replicas and other labels) that the split of latency needs."""
    wanted = {
        "ray_fluxray_request_latency_s_sum": {"route": "/v1/images/generations", "code": "200"},
        "ray_fluxray_request_latency_s_count": {"route": "/v1/images/generations", "code": "200"},
        "ray_fluxray_stage_latency_s_sum": None,
        "ray_fluxray_stage_latency_s_count": None,
        "ray_serve_deployment_processing_latency_ms_sum": None,
        "ray_serve_deployment_processing_latency_ms_count": None,
    }
    totals: dict[str, float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        name, _, rest = line.partition("{")
        if name not in wanted or "}" not in rest:
            continue
        tags = dict(re.findall(r'(\w+)="([^"]*)"', rest[: rest.rindex("}")]))
        if any(tags.get(k) != v for k, v in (wanted[name] or {}).items()):
            continue
        key = name + (
            f"[{tags['stage']}]" if "stage" in tags else f"[{tags['deployment']}]" if "deployment" in tags else ""
        )
        totals[key] = totals.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def split(before: dict[str, float], after: dict[str, float]) -> dict:
    """Mean seconds per request of one level: in the ingress, in each stage, and what the hops leave."""
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}

    def mean(prefix: str, label: str, scale: float = 1.0) -> float | None:
        count = diff.get(f"{prefix}_count{label}", 0.0)
        return round(diff[f"{prefix}_sum{label}"] / count * scale, 4) if count else None

    # Serve tags every fluxray metric with its deployment too: the request latency is the Ingress'.
    out: dict = {"ingress_s": mean("ray_fluxray_request_latency_s", "[Ingress]")}
    for stage in ("encode", "denoise", "decode"):
        out[f"{stage}_s"] = mean("ray_fluxray_stage_latency_s", f"[{stage}]")
    for deployment in ("Ingress", "TextEncoder", "Denoiser", "VAEDecoder"):
        out[f"serve_processing_{deployment}_s"] = mean(
            "ray_serve_deployment_processing_latency_ms", f"[{deployment}]", 1e-3
        )
    stages = [out[f"{s}_s"] for s in ("encode", "denoise", "decode")]
    if out["ingress_s"] is not None and None not in stages:
        # Ingress time not spent inside a stage: handle routing, object-store hops, the ingress' own
        # work (validation, image encoding to b64 and JSON).
        out["ingress_minus_stages_s"] = round(out["ingress_s"] - sum(stages), 4)
    return out


def wait_for_counts(url: str, before: dict[str, float], requests: int, timeout: float = 60) -> dict[str, float]:
    """Scrape until the ingress and every stage have reported this level's requests."""
    keys = ["ray_fluxray_request_latency_s_count[Ingress]"] + [
        f"ray_fluxray_stage_latency_s_count[{s}]" for s in ("encode", "denoise", "decode")
    ]
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(url)
        if all(after.get(k, 0) - before.get(k, 0) >= requests for k in keys) or time.monotonic() > deadline:
            return after
        time.sleep(2)


def load(url: str, concurrency: int, requests: int, width: int, height: int, steps: int, seed0: int) -> dict:
    def one(i: int) -> float:
        body = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "size": f"{width}x{height}",
            "seed": seed0 + i,
            "num_inference_steps": steps,
            "n": 1,
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


def load_async(url: str, concurrency: int, requests: int, width: int, height: int, steps: int, seed0: int) -> dict:
    """The same load through async jobs: POST /v1/images/jobs, follow its events until it ends, then GET
    the job with its image. Latency is from the POST to that record, as a client of the async API sees it."""

    def one(i: int) -> float:
        body = {
            "prompt": PROMPTS[i % len(PROMPTS)],
            "size": f"{width}x{height}",
            "seed": seed0 + i,
            "num_inference_steps": steps,
            "n": 1,
        }
        start = time.perf_counter()
        with httpx.Client(timeout=600) as http:
            created = http.post(f"{url}/v1/images/jobs", json=body)
            if created.status_code != 202:
                raise RuntimeError(f"HTTP {created.status_code}: {created.text[:200]}")
            job = created.json()
            with http.stream("GET", f"{url}{job['links']['events']}") as events:
                for line in events.iter_lines():
                    if line.startswith("event: ") and line[7:] in ("succeeded", "failed", "cancelled"):
                        break
            record = http.get(f"{url}{job['links']['self']}").json()
        elapsed = time.perf_counter() - start
        if record["status"] != "succeeded" or not record["data"]:
            raise RuntimeError(f"job {record['id']}: {record['status']} {record['error']}")
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
    """fluxray's engine and diffusers' FluxPipeline (the naive app's code) in this process: one
    image per call (the floor a request at concurrency 1 can reach) and all images in one call."""
    import torch

    from benchmarks.naive_app import ImageRequest, generate
    from fluxray.params import GenerationParams
    from fluxray.pipeline import Pipeline

    torch.set_grad_enabled(False)
    if threads:
        torch.set_num_threads(threads)
    pipeline = Pipeline.load("tiny", device="cpu")
    pipe = pipeline.to_diffusers()
    length = pipeline.source.spec.max_sequence_length  # the naive app's T5 length, as it serves the model
    params = [
        GenerationParams(
            prompt=PROMPTS[i % len(PROMPTS)], width=width, height=height, seed=i, num_inference_steps=steps
        )
        for i in range(images)
    ]
    bodies = [
        ImageRequest(prompt=p.prompt, size=f"{width}x{height}", seed=p.seed, num_inference_steps=steps) for p in params
    ]
    out = {"images": images, "torch_threads": torch.get_num_threads()}
    for name, one, many in (
        ("fluxray_engine", lambda i: pipeline.generate(params[i]), lambda: pipeline.generate(params)),
        # With PNG encoding, as the naive app answers.
        (
            "diffusers_flux_pipeline",
            lambda i: generate(pipe, [bodies[i]], length),
            lambda: generate(pipe, bodies[:8], length),
        ),
    ):
        one(0)  # warm-up
        latencies = []
        started = time.perf_counter()
        for i in range(images):
            t = time.perf_counter()
            one(i)
            latencies.append(time.perf_counter() - t)
        sequential_wall = time.perf_counter() - started
        started = time.perf_counter()
        many()
        batch = images if name == "fluxray_engine" else min(images, 8)
        out[name] = {
            "p50_s": round(percentile(latencies, 0.5), 4),
            "mean_s": round(statistics.mean(latencies), 4),
            "images_per_s_one_at_a_time": round(images / sequential_wall, 3),
            f"images_per_s_one_batch_of_{batch}": round(batch / (time.perf_counter() - started), 3),
        }
    return out


def run_levels(url: str, levels: list[int], requests: int, width: int, height: int, steps: int, metrics=None):
    load(url, 2, 4, width, height, steps, 10_000)  # warm-up: first requests load lazily
    if metrics:
        wait_for_counts(metrics, {}, 4)  # the warm-up's metrics in before the first level's baseline
    results = []
    for c in levels:
        before = scrape(metrics) if metrics else None
        level = load(url, c, max(requests, c), width, height, steps, 1000 * c)
        print(f"{url} c={c}: {level}", file=sys.stderr, flush=True)
        if metrics:
            level["split_mean_s"] = split(before, wait_for_counts(metrics, before, level["requests"]))
        results.append(level)
    return results


def run_async_levels(url: str, levels: list[int], requests: int, width: int, height: int, steps: int) -> list[dict]:
    results = []
    for c in levels:
        level = load_async(url, c, max(requests, c), width, height, steps, 1000 * c)
        print(f"{url} async c={c}: {level}", file=sys.stderr, flush=True)
        results.append(level)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="a running fluxray service (no naive run, no metrics)")
    parser.add_argument("--config", default=str(ROOT / "deployments" / "configs" / "local.yaml"))
    parser.add_argument("--size", default="256x256")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--requests", type=int, default=32, help="requests per concurrency level")
    parser.add_argument(
        "--naive-threads",
        type=int,
        default=0,
        help="torch threads of the naive replica; 0 (default): torch's own default, as a user would leave it",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load-cpu.json"))
    args = parser.parse_args()
    width, height = parse_size(args.size)
    concurrency = [int(v) for v in args.concurrency.split(",")]
    raw = yaml.safe_load(Path(args.config).read_text())
    model = raw["applications"][0]["args"].get("model", "tiny")
    threads = raw["applications"][0]["args"].get("torch_threads")

    naive = naive_threads = async_jobs = None
    if args.url:
        fluxray = run_levels(args.url, concurrency, args.requests, width, height, args.steps)
        async_jobs = run_async_levels(args.url, concurrency, args.requests, width, height, args.steps)
    else:
        cluster = BenchCluster().start()
        try:
            config = fluxray_config(Path(args.config))
            url = cluster.deploy(config)
            print(f"fluxray up at {url}", file=sys.stderr, flush=True)
            fluxray = run_levels(url, concurrency, args.requests, width, height, args.steps, cluster.metrics_url)
            # The async API on the same app, right after: the same requests as jobs followed over SSE.
            async_jobs = run_async_levels(url, concurrency, args.requests, width, height, args.steps)
            # The same Ray instance, fluxray's application replaced by the naive one.
            url = cluster.deploy(naive_config(model, args.naive_threads or None, config["http_options"]["port"]))
            # Until the naive app has replaced fluxray on the port, /healthz may still be fluxray's.
            deadline = time.monotonic() + 300
            while "torch_threads" not in httpx.get(f"{url}/healthz", timeout=10).text:
                if time.monotonic() > deadline:
                    raise SystemExit("the naive app did not replace fluxray within 300 s")
                time.sleep(1)
            print("naive up", file=sys.stderr, flush=True)
            naive_threads = httpx.get(f"{url}/healthz", timeout=10).json()["torch_threads"]
            naive = run_levels(url, concurrency, args.requests, width, height, args.steps)
        finally:
            cluster.stop()
    # The engine gets the threads each replica gets (the config's torch_threads), so the difference
    # is the graph's cost, not a different CPU budget.
    engine = in_process(width, height, args.steps, images=16, threads=threads)
    single = fluxray[0]
    report = {
        "benchmark": "serve_load",
        "env": {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()},
        "config": {
            "fluxray": args.url or "serve deploy " + Path(args.config).name,
            "naive": None if args.url else f"benchmarks/naive_app.py, 1 replica, torch threads {naive_threads}",
            "size": args.size,
            "steps": args.steps,
            "requests_per_level": args.requests,
        },
        "http": fluxray,
        "naive_http": naive,
        "async_jobs_http": async_jobs,
        "in_process": engine,
        "serve_overhead": {
            "p50_latency_s_at_concurrency_1_minus_in_process": round(
                single["p50_s"] - engine["fluxray_engine"]["p50_s"], 4
            ),
            "latency_ratio_at_concurrency_1": round(single["p50_s"] / engine["fluxray_engine"]["p50_s"], 3),
        },
    }
    if async_jobs:
        # What the async API costs over the synchronous route: a job record, its events and a second GET.
        report["async_vs_sync"] = [
            {
                "concurrency": a["concurrency"],
                "p50_latency_ratio": round(a["p50_s"] / f["p50_s"], 3),
                "p50_latency_added_s": round(a["p50_s"] - f["p50_s"], 4),
                "images_per_s_ratio": round(a["images_per_s"] / f["images_per_s"], 3),
            }
            for a, f in zip(async_jobs, fluxray)
        ]
    if naive:
        report["fluxray_vs_naive"] = [
            {
                "concurrency": f["concurrency"],
                "images_per_s_ratio": round(f["images_per_s"] / n["images_per_s"], 3),
                "p50_ratio": round(f["p50_s"] / n["p50_s"], 3),
            }
            for f, n in zip(fluxray, naive, strict=True)
        ]
        report["naive_overhead"] = {
            "p50_latency_s_at_concurrency_1_minus_in_process": round(
                naive[0]["p50_s"] - engine["diffusers_flux_pipeline"]["p50_s"], 4
            ),
        }
        by_level = {r["concurrency"]: r for r in report["fluxray_vs_naive"]}
        goals = {}
        if 1 in by_level:
            goals["images_per_s_ratio_at_1 >= 1.0"] = by_level[1]["images_per_s_ratio"] >= 1.0
        if 16 in by_level:
            goals["images_per_s_ratio_at_16 >= 1.3"] = by_level[16]["images_per_s_ratio"] >= 1.3
            goals["p50_ratio_at_16 <= 0.8"] = by_level[16]["p50_ratio"] <= 0.8
        report["goals_met"] = goals
    write_report(report, args.out)


if __name__ == "__main__":
    main()

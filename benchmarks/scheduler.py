"""srpt against fifo on one seeded trace: Poisson arrivals, 30% 4-step and 70% 28-step requests of
one image, at offered loads 0.5, 0.8 and 1.0 of measured capacity.

    python benchmarks/scheduler.py                 # tiny model, 256x256, CPU, ~10 minutes
    python benchmarks/scheduler.py --requests 200  # a longer trace
    python benchmarks/scheduler.py --no-serve      # skip the HTTP replay (engine + simulation only)

For each (load, policy) the trace is replayed three ways:
- `serve`: over HTTP through the live Serve app (local.yaml on a Ray instance of this script's own,
  deployed once per policy, `denoiser_max_batch_images: 1` so that the order is all that differs),
  with capacity and standalone latencies measured over HTTP first;
- `engine`: through the Denoiser deployment's own class in this process (its real step loop,
  scheduler and the tiny transformer, no HTTP hops);
- `simulated`: through the pure scheduler on a virtual clock, each step costing the measured step
  time, so live and simulated can be compared.
Reported per policy: mean / p50 / p99 latency per class (short, long, all), mean and p99 slowdown,
SLO attainment at 3x standalone latency, throughput; and srpt/fifo ratios at each load.
JSON: benchmarks/results/scheduler-cpu.json.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from reporting import write_report  # noqa: E402 - benchmarks/ is the script's own folder
from serve_load import BenchCluster, fluxray_config, free_port  # noqa: E402

from deployments.stages.denoiser import DenoiserDeployment  # noqa: E402
from deployments.stages.messages import EncodedPrompt  # noqa: E402
from deployments.stages.request_scheduler import Job, simulate  # noqa: E402
from fluxray.models.sources import resolve_model  # noqa: E402
from fluxray.params import GenerationParams  # noqa: E402
from fluxray.text_encoding import TextEncoder  # noqa: E402

SHORT, LONG, SHORT_SHARE, SLO = 4, 28, 0.3, 3.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def make_trace(seed: int, count: int, load: float, mean_service_s: float) -> list[tuple[float, int]]:
    rng = random.Random(seed)
    t, trace = 0.0, []
    for _ in range(count):
        t += rng.expovariate(load / mean_service_s)
        trace.append((t, SHORT if rng.random() < SHORT_SHARE else LONG))
    return trace


def summarise(records: list[tuple[int, float, float]], span_s: float) -> dict:
    """records: (steps, latency, standalone) per request."""
    out = {}
    for name, chosen in (("short", SHORT), ("long", LONG), ("all", None)):
        lat = [lat for steps, lat, _ in records if chosen is None or steps == chosen]
        if lat:
            out[name] = {
                "count": len(lat),
                "mean_s": round(statistics.mean(lat), 4),
                "p50_s": round(percentile(lat, 0.5), 4),
                "p99_s": round(percentile(lat, 0.99), 4),
            }
    slowdowns = [lat / alone for _, lat, alone in records]
    out["slowdown_mean"] = round(statistics.mean(slowdowns), 3)
    out["slowdown_p99"] = round(percentile(slowdowns, 0.99), 3)
    out["slo_attainment"] = round(sum(s <= SLO for s in slowdowns) / len(slowdowns), 3)
    out["throughput_rps"] = round(len(records) / span_s, 3)
    return out


def replay(policy: str, trace, encoder_out, params_of, standalone_of) -> tuple[list, float, int]:
    """The trace through a DenoiserDeployment in this process; (records, span, preemptions)."""
    denoiser = DenoiserDeployment.func_or_class(
        {
            "model": "tiny",
            "device": "cpu",
            "torch_threads": 1,
            "scheduler": policy,
            "denoiser_max_batch_images": 1,
            "max_queue_wait_s": 1e6,
        }
    )

    async def run():
        start = time.monotonic()

        async def one(at: float, steps: int):
            await asyncio.sleep(max(0.0, start + at - time.monotonic()))
            sent = time.monotonic()
            await denoiser.denoise(encoder_out, params_of(steps))
            done = time.monotonic()
            return steps, done - sent, standalone_of(steps), done

        results = await asyncio.gather(*[one(at, steps) for at, steps in trace])
        return results, max(r[3] for r in results) - start

    results, span = asyncio.run(run())
    return [r[:3] for r in results], span, denoiser.stats()["preemptions"]


PROMPT = "a red circle"
LOCAL = ROOT / "deployments" / "configs" / "local.yaml"


def serve_app(size: int, policy: str, port: int) -> dict:
    """local.yaml with the policy, one image per step and no admission limit in the way. (One port
    for both policies: Serve keeps the HTTP options of its first deploy.)"""
    raw = fluxray_config(LOCAL, max_pending_requests=512)
    raw["http_options"]["port"] = port
    raw["applications"][0]["args"].update(
        default_size=f"{size}x{size}",
        denoiser_max_batch_images=1,
        max_queue_wait_s=3600,
        request_timeout_s=600,
        scheduler=policy,
    )
    # Its own name and route: deploying the other policy's app removes this one, and the new
    # app's /healthz cannot be answered by the old one while it is being replaced.
    raw["applications"][0].update(name=policy, route_prefix=f"/{policy}")
    return raw


def post(url: str, steps: int, seed: int, size: int) -> float:
    body = {"prompt": PROMPT, "size": f"{size}x{size}", "num_inference_steps": steps, "seed": seed}
    started = time.monotonic()
    response = httpx.post(f"{url}/v1/images/generations", json=body, timeout=600)
    if response.status_code != 200:
        raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
    return time.monotonic() - started


def standalone_http(url: str, size: int) -> dict[int, float]:
    """Each class's latency alone over HTTP: the median of five warm requests."""
    post(url, SHORT, 0, size)  # warm-up
    return {steps: statistics.median(post(url, steps, i, size) for i in range(5)) for steps in (SHORT, LONG)}


def replay_http(url: str, trace, size: int, standalone: dict[int, float]) -> tuple[list, float]:
    start = time.monotonic() + 0.5

    def one(item):
        i, (at, steps) = item
        time.sleep(max(0.0, start + at - time.monotonic()))
        latency = post(url, steps, 1000 + i, size)
        return steps, latency, standalone[steps], time.monotonic()

    with ThreadPoolExecutor(len(trace)) as pool:
        results = list(pool.map(one, enumerate(trace)))
    return [r[:3] for r in results], max(r[3] for r in results) - start


def ratios(fifo: dict, srpt: dict) -> dict:
    return {
        "mean_latency": round(srpt["all"]["mean_s"] / fifo["all"]["mean_s"], 3),
        "p99_short": round(srpt["short"]["p99_s"] / fifo["short"]["p99_s"], 3),
        "p99_long": round(srpt["long"]["p99_s"] / fifo["long"]["p99_s"], 3),
        "slo_attainment_points": round(100 * (srpt["slo_attainment"] - fifo["slo_attainment"]), 1),
        "throughput": round(srpt["throughput_rps"] / fifo["throughput_rps"], 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60, help="requests per (load, policy) replay")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--loads", default="0.5,0.8,1.0")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-serve", dest="serve", action="store_false", help="skip the HTTP replay")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scheduler-cpu.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    source = resolve_model("tiny")
    encoder = TextEncoder.load(source, "cpu", torch.float32)

    def params_of(steps: int) -> GenerationParams:
        return GenerationParams(
            prompt="a red circle", width=args.size, height=args.size, num_inference_steps=steps, seed=1
        ).resolve(source.spec)

    encoded = EncodedPrompt(encoder.encode(["a red circle"]), None, 0.0)
    # Standalone latency per class, measured alone (warm), and the step cost it implies.
    probe = DenoiserDeployment.func_or_class({"model": "tiny", "device": "cpu", "torch_threads": 1})

    async def alone(steps: int) -> float:
        """The median of five warm runs: one run is too noisy to set the offered load by."""
        await probe.denoise(encoded, params_of(steps))
        times = []
        for _ in range(5):
            started = time.monotonic()
            await probe.denoise(encoded, params_of(steps))
            times.append(time.monotonic() - started)
        return statistics.median(times)

    standalone = {steps: asyncio.run(alone(steps)) for steps in (SHORT, LONG)}
    step_s = standalone[LONG] / LONG
    mean_service = SHORT_SHARE * standalone[SHORT] + (1 - SHORT_SHARE) * standalone[LONG]
    print(f"standalone: short {standalone[SHORT]:.3f} s, long {standalone[LONG]:.3f} s; step {step_s * 1e3:.1f} ms")

    report = {
        "config": {
            "model": "tiny",
            "size": f"{args.size}x{args.size}",
            "requests": args.requests,
            "short_steps": SHORT,
            "long_steps": LONG,
            "short_share": SHORT_SHARE,
            "slo": f"{SLO:g}x standalone",
            "seed": args.seed,
            "batch": "one image per step (denoiser_max_batch_images 1): the order is all that differs",
            "srpt_over_fifo": "from the serve replay; srpt_over_fifo_engine and _simulated from the others",
        },
        "standalone_s": {"short": round(standalone[SHORT], 4), "long": round(standalone[LONG], 4)},
        "loads": {},
    }
    loads = [float(x) for x in args.loads.split(",")]
    for load in loads:
        trace = make_trace(args.seed, args.requests, load, mean_service)
        entry = {}
        for policy in ("fifo", "srpt"):
            records, span, preemptions = replay(policy, trace, encoded, params_of, standalone.get)
            engine = summarise(records, span)
            engine["preemptions"] = preemptions
            done, _ = simulate(
                [(at, Job((args.size, args.size, 512), 1, 1, steps)) for at, steps in trace],
                lambda shape, rows: step_s,
                policy=policy,
                max_batch_images=1,
            )
            sim_span = max(j.finished for j in done) - min(j.arrival for j in done)
            simulated = summarise([(j.steps, j.finished - j.arrival, j.steps * step_s) for j in done], sim_span)
            entry[policy] = {"engine": engine, "simulated": simulated}
            print(
                f"load {load} {policy}: engine mean {engine['all']['mean_s']} s, "
                f"simulated {simulated['all']['mean_s']} s"
            )
        entry["srpt_over_fifo_engine"] = ratios(entry["fifo"]["engine"], entry["srpt"]["engine"])
        entry["srpt_over_fifo_simulated"] = ratios(entry["fifo"]["simulated"], entry["srpt"]["simulated"])
        print(f"load {load} srpt/fifo (engine): {entry['srpt_over_fifo_engine']}")
        report["loads"][str(load)] = entry
    if args.serve:
        cluster = BenchCluster().start()
        try:
            alone, port = None, free_port()
            for policy in ("fifo", "srpt"):  # the same app redeployed with the other policy
                url = cluster.deploy(serve_app(args.size, policy, port), timeout=900)
                measured = standalone_http(url, args.size)
                alone = alone or measured  # one set of traces for both policies
                report[f"standalone_http_s_{policy}"] = {
                    "short": round(measured[SHORT], 4),
                    "long": round(measured[LONG], 4),
                }
                print(f"{policy} over HTTP alone: short {measured[SHORT]:.3f} s, long {measured[LONG]:.3f} s")
                http_service = SHORT_SHARE * alone[SHORT] + (1 - SHORT_SHARE) * alone[LONG]
                for load in loads:
                    trace = make_trace(args.seed, args.requests, load, http_service)
                    records, span = replay_http(url, trace, args.size, alone)
                    served = report["loads"][str(load)][policy]["serve"] = summarise(records, span)
                    print(f"load {load} {policy}: serve mean {served['all']['mean_s']} s")
            for load in loads:
                entry = report["loads"][str(load)]
                entry["srpt_over_fifo"] = ratios(entry["fifo"]["serve"], entry["srpt"]["serve"])
                print(f"load {load} srpt/fifo (serve): {entry['srpt_over_fifo']}")
        finally:
            cluster.stop()
    report = {"benchmark": "scheduler", **report}
    write_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

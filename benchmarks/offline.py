"""The offline job at 1k and 10k prompts beside a plain in-process loop over the engine, same run.

    python benchmarks/offline.py                       # tiny model, 64x64, 2 steps, local output
    python benchmarks/offline.py --sizes 1000 --steps 4

For each size the job runs as its own process (a local Ray instance, like `python -m jobs.generate`)
while this script samples the resident memory of the driver and of every Ray worker process; then
the engine makes the same number of images in a plain loop here. Reported: images/s for both, and
the peak memory (USS and RSS) of the driver and of each stage's workers, so the growth from 1k to
10k prompts (the goal is none: everything streams) is a measured figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from reporting import write_report  # noqa: E402 - benchmarks/ is the script's own folder

SUBJECTS = ["a red fox", "a lighthouse", "an owl", "a bowl of fruit", "a robot", "a forest house"]


class MemorySampler(threading.Thread):
    """Peak memory of the driver and of each kind of Ray worker, every 0.5 s.

    USS (memory unique to the process) is what grows if a process leaks; RSS also counts the
    shared object-store pages a worker has touched, which belong to Ray's plasma store, not to it.
    USS itself still counts plasma pages that only this worker has touched so far (it wrote the
    objects there), so `own` is USS outside the plasma mapping: the worker's own heap.
    """

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.stop = pid, threading.Event()
        self.peaks: dict[str, dict[str, int]] = {}

    def _record(self, name: str, process: psutil.Process) -> None:
        info = process.memory_full_info()
        own = sum(
            m.private_clean + m.private_dirty
            for m in process.memory_maps(grouped=True)
            if "plasma" not in m.path and not m.path.startswith("/dev/shm")
        )
        peak = self.peaks.setdefault(name, {"uss": 0, "rss": 0, "own": 0})
        peak["uss"], peak["rss"] = max(peak["uss"], info.uss), max(peak["rss"], info.rss)
        peak["own"] = max(peak["own"], own)

    def run(self) -> None:
        while not self.stop.is_set():
            for process in psutil.process_iter(["pid", "cmdline"]):
                try:
                    cmd = " ".join(process.info["cmdline"] or [])
                    if process.info["pid"] == self.pid:
                        self._record("driver", process)
                    elif stage := re.search(r"ray::MapWorker\(MapBatches\((\w+)\)", cmd):
                        self._record(stage[1], process)  # e.g. DenoiseStage
                except (psutil.Error, TypeError, AttributeError):
                    continue
            time.sleep(0.5)

    def mib(self, key: str) -> dict[str, float]:
        return {name: round(p[key] / 2**20, 1) for name, p in sorted(self.peaks.items())}


def write_prompts(path: Path, count: int) -> None:
    with path.open("w") as f:
        for i in range(count):
            f.write(json.dumps({"prompt": f"{SUBJECTS[i % len(SUBJECTS)]}, picture {i}"}) + "\n")


def run_job(count: int, size: int, steps: int, workdir: Path) -> dict:
    prompts, output = workdir / f"prompts-{count}.jsonl", workdir / f"out-{count}"
    write_prompts(prompts, count)
    command = [
        sys.executable,
        "-m",
        "jobs.generate",
        "--input",
        str(prompts),
        "--output",
        str(output),
        "--width",
        str(size),
        "--height",
        str(size),
        "--steps",
        str(steps),
        "--denoise-batch-size",
        "16",
        "--decode-batch-size",
        "16",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local Ray per run
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sampler = MemorySampler(process.pid)
    sampler.start()
    stdout, _ = process.communicate()
    sampler.stop.set()
    sampler.join()
    wall = time.monotonic() - started
    line = [x for x in stdout.splitlines() if x.startswith("written=")]
    if process.returncode != 0 or not line:
        raise SystemExit(f"job failed ({process.returncode}): {stdout[-2000:]}")
    summary = dict(part.split("=", 1) for part in line[-1].split())
    return {
        "prompts": count,
        "written": int(summary["written"]),
        "images_per_s_generation": float(summary["images/s"]),
        "images_per_s_including_startup": round(count / wall, 2),
        "wall_s": round(wall, 1),
        "peak_uss_mib": sampler.mib("uss"),
        "peak_rss_mib": sampler.mib("rss"),
        "peak_own_mib": sampler.mib("own"),
    }


def run_loop(count: int, size: int, steps: int) -> dict:
    import torch

    from fluxray.params import GenerationParams
    from fluxray.pipeline import Pipeline

    torch.set_grad_enabled(False)
    pipeline = Pipeline.load("tiny", device="cpu")
    started = time.monotonic()
    for i in range(count):
        params = GenerationParams(
            prompt=f"{SUBJECTS[i % len(SUBJECTS)]}, picture {i}",
            width=size,
            height=size,
            num_inference_steps=steps,
            seed=i,
        )
        pipeline.generate(params)[0].encode()
    wall = time.monotonic() - started
    return {
        "prompts": count,
        "images_per_s": round(count / wall, 2),
        "wall_s": round(wall, 1),
        "peak_rss_mib_so_far": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="prompt counts")
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--loop-limit", type=int, default=None, help="cap the plain loop's prompt count")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "offline-cpu.json"))
    args = parser.parse_args()
    counts = [int(c) for c in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [run_job(c, args.size, args.steps, Path(tmp)) for c in counts]
    loops = [run_loop(min(c, args.loop_limit or c), args.size, args.steps) for c in counts]
    report = {
        "benchmark": "offline",
        "env": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "config": {"model": "tiny", "size": args.size, "steps": args.steps, "job_defaults": "1 actor per stage"},
        "job": jobs,
        "plain_loop": loops,
        "uss_growth_mib_first_to_last": {
            name: round(jobs[-1]["peak_uss_mib"][name] - jobs[0]["peak_uss_mib"].get(name, 0.0), 1)
            for name in jobs[-1]["peak_uss_mib"]
        },
        "own_growth_mib_first_to_last": {
            name: round(jobs[-1]["peak_own_mib"][name] - jobs[0]["peak_own_mib"].get(name, 0.0), 1)
            for name in jobs[-1]["peak_own_mib"]
        },
        "job_vs_loop_images_per_s": [
            round(j["images_per_s_generation"] / lp["images_per_s"], 3) for j, lp in zip(jobs, loops)
        ],
    }
    write_report(report, args.out)


if __name__ == "__main__":
    main()

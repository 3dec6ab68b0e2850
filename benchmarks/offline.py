"""The offline job at 1k and 10k prompts beside a plain in-process loop over the engine, same run;
then the job resuming fully written outputs of 10k and 100k rows, local and on S3.

    python benchmarks/offline.py                       # tiny model, 64x64, 2 steps, local output
    python benchmarks/offline.py --sizes 1000 --steps 4
    python benchmarks/offline.py --sizes "" --resume-sizes 10000,100000   # resume only

For each size the job runs as its own process (a local Ray instance, like `python -m jobs.generate`)
while this script samples the resident memory of the driver and of every Ray worker process; then
the engine makes the same number of images in a plain loop here. Reported: images/s for both, and
the peak memory (USS and RSS) of the driver and of each stage's workers, so the growth from 1k to
10k prompts (the goal is none: everything streams) is a measured figure.

Resume: an output whose every row is done is laid out first, through the storage API and the
job's own key and fingerprint functions (one metadata object per row: all that a re-run lists;
generating 100k images here would take hours and measure nothing more), on a local directory and on
an S3 API server on loopback (moto). Then the job runs over it; reported: wall time, the driver's
peak RSS, and its growth from the smallest to the largest size (the goal: <= 50 MiB from 10k to
100k, <= 60 s for 100k on S3).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
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
    env = {**os.environ, "RAY_ADDRESS": "local"}  # a fresh local Ray per run, whatever else is running
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


class S3Server:
    """moto's S3 API server on a loopback port, with one bucket."""

    def __init__(self):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.endpoint, self.bucket = f"http://127.0.0.1:{self.port}", "bench"
        self.env = {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.endpoint,
        }

    def __enter__(self):
        server = Path(sys.executable).parent / "moto_server"
        self.process = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        os.environ.update(self.env)
        for _ in range(100):
            try:
                self.client().create_bucket(Bucket=self.bucket)
                return self
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.2)
        raise SystemExit("the S3 server did not start")

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=30)

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")


def lay_out_finished_output(prompts: Path, output: str, size: int, steps: int) -> None:
    """Every row of prompts done, as the job leaves it: one metadata object per row under output."""
    from fluxray.models.sources import resolve_model
    from fluxray.storage import LocalStorage, open_storage
    from jobs.layout import metadata_key, model_identity
    from jobs.prompts import JobDefaults, records

    source = resolve_model("tiny")
    identity = model_identity(source, "none")
    defaults = JobDefaults(spec=source.spec, width=size, height=size, steps=steps, model_identity=identity)
    storage = open_storage(output)
    body = json.dumps({"note": "laid out by benchmarks/offline.py"}).encode()
    with ThreadPoolExecutor(16) as pool:
        done = pool.map(
            lambda r: storage.put(metadata_key(r["id"], r["fingerprint"]), body),
            records(LocalStorage(prompts.parent), prompts.name, defaults),
        )
        for _ in done:
            pass


def run_resume(count: int, size: int, steps: int, workdir: Path, s3: S3Server | None) -> dict:
    prompts = workdir / f"resume-{count}.jsonl"
    write_prompts(prompts, count)
    where = "s3" if s3 else "local"
    output = f"s3://{s3.bucket}/resume-{count}/" if s3 else str(workdir / f"resume-out-{count}")
    started = time.monotonic()
    lay_out_finished_output(prompts, output, size, steps)
    layout_s = time.monotonic() - started
    source = str(prompts)
    if s3:  # the input on S3 too, as a real run would read it
        s3.client().upload_file(str(prompts), s3.bucket, f"inputs/resume-{count}.jsonl")
        source = f"s3://{s3.bucket}/inputs/resume-{count}.jsonl"
    command = [sys.executable, "-m", "jobs.generate", "--input", source, "--output", output]
    command += ["--width", str(size), "--height", str(size), "--steps", str(steps)]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = MemorySampler(process.pid)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.monotonic() - started
    sampler.stop.set()
    sampler.join()
    line = [x for x in stdout.splitlines() if x.startswith("written=")]
    if process.returncode != 0 or not line:
        raise SystemExit(f"resume failed ({process.returncode}): {stderr[-2000:]}")
    summary = dict(part.split("=", 1) for part in line[-1].split())
    if summary["skipped"] != str(count) or summary["written"] != "0":
        raise SystemExit(f"resume did not skip every row: {line[-1]}")
    return {
        "rows": count,
        "storage": where,
        "skipped": int(summary["skipped"]),
        "wall_s": round(wall, 1),
        "rows_per_s": round(count / wall, 1),
        "driver_peak_rss_mib": sampler.mib("rss")["driver"],
        "layout_s": round(layout_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="prompt counts of the generating runs ('' for none)")
    parser.add_argument("--resume-sizes", default="10000,100000", help="row counts of the resume runs ('' for none)")
    parser.add_argument("--size", type=int, default=64, help="image side")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--loop-limit", type=int, default=None, help="cap the plain loop's prompt count")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "offline-cpu.json"))
    args = parser.parse_args()
    counts = [int(c) for c in args.sizes.split(",") if c]
    resume_counts = [int(c) for c in args.resume_sizes.split(",") if c]
    report = {
        "benchmark": "offline",
        "env": {"machine": platform.machine(), "cpus": os.cpu_count()},
        "config": {"model": "tiny", "size": args.size, "steps": args.steps, "job_defaults": "1 actor per stage"},
    }
    if counts:
        with tempfile.TemporaryDirectory() as tmp:
            jobs = [run_job(c, args.size, args.steps, Path(tmp)) for c in counts]
        loops = [run_loop(min(c, args.loop_limit or c), args.size, args.steps) for c in counts]
        report |= {
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
    if resume_counts:
        resumes = []
        with tempfile.TemporaryDirectory() as tmp:
            resumes += [run_resume(c, args.size, args.steps, Path(tmp), None) for c in resume_counts]
            with S3Server() as s3:
                resumes += [run_resume(c, args.size, args.steps, Path(tmp), s3) for c in resume_counts]
        report["resume"] = resumes
        report["resume_driver_growth_mib_first_to_last"] = {
            where: round(runs[-1]["driver_peak_rss_mib"] - runs[0]["driver_peak_rss_mib"], 1)
            for where in ("local", "s3")
            if (runs := [r for r in resumes if r["storage"] == where])
        }
    write_report(report, args.out)


if __name__ == "__main__":
    main()

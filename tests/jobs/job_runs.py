"""Running the offline job from the tests, and reading what it wrote.

`job()` runs `jobs.generate.main(argv)` in one long-lived job driver process per cluster (started on
first use): the same code as `python -m jobs.generate` from its argument parsing to its exit status,
without the ~5 s of a new interpreter importing torch and Ray for every run, and without making the
test process itself a Ray driver (a driver connected and disconnected dozens of times can crash the
interpreter at exit). `job_process()` starts the real command, for what needs a process: killing the
driver, its exit status and output as a shell sees them.
"""

from __future__ import annotations

import atexit
import json
import subprocess
import sys
from pathlib import Path

from cluster.ray_head import MARKER, Driver

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--width", "64", "--height", "64", "--steps", "2", "--denoise-batch-size", "16", "--decode-batch-size", "16"]
# Small batches: a job slow enough to be caught mid-way.
SLOW = [*FAST[:-4], "--denoise-batch-size", "4", "--decode-batch-size", "4"]

# The job driver's loop (run by a cluster.ray_head.Driver): one JSON line in ({"argv", "env"}), one out
# ({"rc", "stdout", "stderr"}). Each run gets the environment it names on top of the process' own, a
# fresh read of Ray's token (Ray caches the first one it read) and its own driver connection, closed
# after the run as a process' would be.
JOB_LOOP = """
import contextlib, io, json, os, sys, traceback
reply = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # what Ray prints outside the capture goes to the log, not into the replies
import ray
from ray._private.authentication_test_utils import reset_auth_token_state
import jobs.generate
base = dict(os.environ)
reply.write(json.dumps({"ready": True}) + "\\n")
for line in sys.stdin:
    request = json.loads(line)
    os.environ.clear()
    os.environ.update({**base, **request["env"]})
    reset_auth_token_state()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = jobs.generate.main(request["argv"])
            except SystemExit as exit:
                code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
                if not isinstance(exit.code, (int, type(None))):
                    print(exit.code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        ray.shutdown()
    reply.write(json.dumps({"rc": code, "stdout": out.getvalue(), "stderr": err.getvalue()}) + "\\n")
"""


_drivers: dict[int, Driver] = {}


def job(cluster, *args: str, endpoint: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The job run to its end against the cluster (and its S3 server, or `endpoint` in front of it):
    exit status, stdout and stderr as `python -m jobs.generate` would give them, with the variables the
    test put in `cluster.env` (fault switches) as they are now. Every run connects as a new driver."""
    driver = _drivers.get(id(cluster))
    if driver is None:
        # In the cluster's environment, marker included: stopping the cluster ends this process too.
        driver = _drivers[id(cluster)] = Driver(cluster.address, cluster.env, cluster.tmp / "job-driver.log", JOB_LOOP)
    env = {k: v for k, v in cluster.env.items() if k != MARKER}
    env["AWS_ENDPOINT_URL"] = endpoint or cluster.s3_endpoint
    answer = driver.call({"argv": list(args), "env": env}, timeout)
    return subprocess.CompletedProcess(["jobs.generate", *args], answer["rc"], answer["stdout"], answer["stderr"])


@atexit.register
def close_job_drivers() -> None:
    """End every cluster's job driver (stopping a cluster ends its driver too: it carries the marker)."""
    for driver in _drivers.values():
        driver.close()
    _drivers.clear()


def job_process(cluster, *args: str, timeout: float = 600, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python -m jobs.generate` as a process of its own; run to its end, or started (`popen` given:
    the Popen's options) for a test that watches or kills it."""
    command = [sys.executable, "-m", "jobs.generate", *args]
    env = {**cluster.env, "AWS_ENDPOINT_URL": cluster.s3_endpoint}
    if popen:
        return subprocess.Popen(command, env=env, cwd=ROOT, **popen)
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def summary(stdout: str) -> dict:
    """The job's last `written=... skipped=... invalid=... failed=...` line, as a dict."""
    line = [x for x in stdout.splitlines() if x.startswith("written=")][-1]
    return dict(part.split("=", 1) for part in line.split())


def prompt_rows(n: int) -> list[dict]:
    """n prompts; every 3rd row has its own seed, every 5th its own id, every 7th its own width (96)."""
    subjects = ["a red fox", "a lighthouse", "an owl", "a bowl of fruit", "a robot", "a forest house"]
    rows = []
    for i in range(n):
        row = {"prompt": f"{subjects[i % len(subjects)]}, picture {i}"}
        if i % 3 == 0:
            row["seed"] = 10_000 + i
        if i % 5 == 0:
            row["id"] = f"row{i}"
        if i % 7 == 0:
            row["width"] = 96
        rows.append(row)
    return rows


def put_rows(cluster, key: str, rows: list[dict]) -> str:
    """rows as a JSONL object in the cluster's bucket; its s3:// URI."""
    body = "\n".join(json.dumps(r) for r in rows) + "\n"
    cluster.s3().put_object(Bucket=cluster.bucket, Key=key, Body=body.encode())
    return f"s3://{cluster.bucket}/{key}"


def keys(s3, bucket: str, prefix: str) -> dict[str, str]:
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out

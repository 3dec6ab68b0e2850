"""Running the offline job from the tests, and reading what it wrote.

`job()` runs `jobs.generate.main(argv)` in this process, as a Ray driver of the session's cluster: the
same code as `python -m jobs.generate` from its argument parsing to its exit status, without the
~5 s of a new interpreter importing torch and Ray. `job_process()` starts the real command, for what
needs a process: killing the driver, its exit status and output as a shell sees them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import ray
from ray._private.authentication_test_utils import reset_auth_token_state

import jobs.generate
from cluster.ray_head import MARKER

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--width", "64", "--height", "64", "--steps", "2", "--denoise-batch-size", "16", "--decode-batch-size", "16"]
# Small batches: a job slow enough to be caught mid-way.
SLOW = [*FAST[:-4], "--denoise-batch-size", "4", "--decode-batch-size", "4"]


@contextlib.contextmanager
def client_environment(cluster, endpoint: str | None = None):
    """This process' environment as the cluster's clients get it (Ray's address and token, the S3
    keys, fault switches the test put in `cluster.env`), `AWS_ENDPOINT_URL` the cluster's S3 server
    or `endpoint`; put back as it was afterwards."""
    changes = {k: v for k, v in cluster.env.items() if os.environ.get(k) != v and k != MARKER}
    changes["AWS_ENDPOINT_URL"] = endpoint or cluster.s3_endpoint
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    # Ray caches the token it read first (at import, from ~/.ray/auth_token or none): read it again
    # from the environment, with Ray's own helper for tests that switch tokens.
    reset_auth_token_state()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_auth_token_state()


def job(cluster, *args: str, endpoint: str | None = None) -> subprocess.CompletedProcess:
    """The job run to its end against the cluster (and its S3 server, or `endpoint` in front of it):
    exit status, stdout and stderr as `python -m jobs.generate` would give them. The driver
    disconnects after each run, so every run starts as a new driver does."""
    out, err = io.StringIO(), io.StringIO()
    with client_environment(cluster, endpoint):
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = jobs.generate.main(list(args))
        finally:
            ray.shutdown()
    return subprocess.CompletedProcess(["jobs.generate", *args], code, out.getvalue(), err.getvalue())


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

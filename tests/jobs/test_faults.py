"""The offline job under faults: a stage worker killed mid-job, and an S3 endpoint that fails a
share of its requests (500 InternalError / 503 SlowDown). Every row must come out exactly once."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import time

import psutil
import pyarrow.parquet as pq
import pytest
from job_runs import FAST, SLOW, job, job_process, keys, prompt_rows, put_rows, summary
from local_cluster import wait_until
from s3_fault_proxy import FaultProxy

from jobs.stages import FAULTS_ENV

# Small batches and 6 steps: slow enough that the kill lands mid-job.
MID_JOB_KILL = [*SLOW, "--steps", "6"]


def put_input(cluster, name: str, n: int) -> str:
    return put_rows(cluster, f"inputs/{name}.jsonl", prompt_rows(n))


def assert_exactly_once(cluster, prefix: str, n: int) -> None:
    """n images and n metadata records, each image's bytes the ones its metadata names; a manifest
    with one `written` row per id."""
    s3, bucket = cluster.s3(), cluster.bucket
    images, metadata = keys(s3, bucket, f"{prefix}images/"), keys(s3, bucket, f"{prefix}metadata/")
    assert len(images) == n and len(metadata) == n, (len(images), len(metadata))
    for key in metadata:
        meta = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        data = s3.get_object(Bucket=bucket, Key=prefix + meta["image"])["Body"].read()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"], key
    manifests = keys(s3, bucket, f"{prefix}manifest/")
    rows = []
    for key in manifests:
        rows += pq.read_table(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())).to_pylist()
    written = [r["id"] for r in rows if r["status"] == "written"]
    assert len(written) == len(set(written)), "a row was written twice in the manifests"


def test_flaky_s3_costs_retries_not_data(ray_cluster):
    n = 40
    source = put_input(ray_cluster, "flaky", n)
    output = f"s3://{ray_cluster.bucket}/runs/flaky/"
    with FaultProxy(ray_cluster.s3_endpoint, rate=0.12, seed=7) as proxy:
        started = time.monotonic()
        result = job(ray_cluster, "--input", source, "--output", output, *FAST, endpoint=proxy.url)
        took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    counts = summary(result.stdout)
    assert counts["written"] == str(n) and counts["failed"] == "0", counts
    faults, forwarded = dict(proxy.faults), dict(proxy.forwarded)
    print(f"S3 faults injected {faults}, requests forwarded {forwarded}, job {took:.1f}s")
    assert sum(faults.values()) >= 10 and faults.get("PUT", 0) >= 3, faults
    assert_exactly_once(ray_cluster, "runs/flaky/", n)


def stage_actors(cluster, stage: str) -> list[dict]:
    """Live Ray Data workers of a stage (their class names name the stage's callable class)."""
    return [a for a in cluster.live_actors() if stage in (a["class"] or "")]


@pytest.mark.parametrize("stage", ["DenoiseStage"])
def test_a_stage_worker_killed_mid_job_and_the_job_still_completes_exactly_once(ray_cluster, stage):
    n = 120
    source = put_input(ray_cluster, "worker-kill", n)
    prefix = "runs/worker-kill/"
    s3, bucket = ray_cluster.s3(), ray_cluster.bucket
    process = job_process(
        ray_cluster,
        *("--input", source, "--output", f"s3://{bucket}/{prefix}", *MID_JOB_KILL),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        victims: list[dict] = []
        # Find the victim early (listing actors takes seconds), kill it once some rows are written.
        while not victims and time.monotonic() < deadline:
            assert process.poll() is None, "the job ended before a worker could be found"
            victims = stage_actors(ray_cluster, stage)
            time.sleep(0.2)
        assert victims, f"no live {stage} actor"
        while len(keys(s3, bucket, f"{prefix}metadata/")) < 10 and time.monotonic() < deadline:
            assert process.poll() is None, "the job ended before a worker could be killed"
            time.sleep(0.2)
        victim = psutil.Process(victims[0]["pid"])
        title = " ".join(victim.cmdline())  # a live Ray worker running the stage: "ray::MapWorker(...DenoiseStage)"
        assert victim.is_running() and title.startswith("ray::") and stage in title, title
        os.kill(victim.pid, signal.SIGKILL)  # the worker process dies, as on a node failure
        done_at_kill = len(keys(s3, bucket, f"{prefix}metadata/"))
        wait_until(
            lambda: not victim.is_running() or victim.status() == psutil.STATUS_ZOMBIE, 30, "the killed worker to die"
        )
        # Ray saw it die: soon no live actor of the stage runs in that process (its listing lags a little).
        wait_until(
            lambda: all(a["pid"] != victim.pid for a in stage_actors(ray_cluster, stage)),
            60,
            "Ray to see the killed worker gone",
            0.5,
        )
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert done_at_kill < n, "the job was done before the kill took effect"
    assert process.returncode == 0, stderr[-3000:]
    counts = summary(stdout)
    assert counts["written"] == str(n) and counts["failed"] == "0", counts
    assert_exactly_once(ray_cluster, prefix, n)
    print(f"killed {victims[0]['class']} pid {victims[0]['pid']} after {done_at_kill} rows; job completed")


def test_a_row_that_kills_its_worker_every_time_is_failed_and_the_rest_written_once(ray_cluster):
    n = 18
    rows = prompt_rows(n)
    rows[11]["prompt"] = "a POISON prompt that crashes the denoiser's process"
    body = "\n".join(json.dumps(r) for r in rows) + "\n"
    ray_cluster.s3().put_object(Bucket=ray_cluster.bucket, Key="inputs/poison.jsonl", Body=body.encode())
    prefix = "runs/poison/"
    env_before = dict(ray_cluster.env)
    ray_cluster.env[FAULTS_ENV] = "denoise:kill:POISON"  # the driver hands it to the stage workers
    try:
        started = time.monotonic()
        result = job(
            ray_cluster,
            "--input",
            f"s3://{ray_cluster.bucket}/inputs/poison.jsonl",
            "--output",
            f"s3://{ray_cluster.bucket}/{prefix}",
            *SLOW,
            "--max-retries",
            "1",
        )
        took = time.monotonic() - started
    finally:
        ray_cluster.env.clear()
        ray_cluster.env.update(env_before)
    assert result.returncode == 1, result.stderr[-3000:]
    poisoned = rows[11].get("id", "poison.jsonl-0000012")
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("jobs.generate: error: 1 rows failed (first: poison.jsonl:12:")
    )
    counts = summary(result.stdout)
    assert counts["written"] == str(n - 1) and counts["failed"] == "1", counts
    assert_exactly_once(ray_cluster, prefix, n - 1)
    manifests = keys(ray_cluster.s3(), ray_cluster.bucket, f"{prefix}manifest/")
    (manifest,) = manifests
    table = pq.read_table(
        io.BytesIO(ray_cluster.s3().get_object(Bucket=ray_cluster.bucket, Key=manifest)["Body"].read())
    )
    (failed,) = [r for r in table.to_pylist() if r["status"] == "failed"]
    assert failed["id"] == poisoned and "died on each of 2 tries" in failed["reason"]
    assert "again in batches of 2" in result.stdout and "again in batches of 1" in result.stdout
    print(f"poison row found and failed in {took:.0f}s")
